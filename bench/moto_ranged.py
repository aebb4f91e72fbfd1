"""moto's S3 server with one fix for benchmarks: a ranged GET reads only its range.

Stock moto (5.x) answers ``GET`` with ``Range: bytes=a-b`` by copying the *whole*
object out of its buffer and slicing it (``S3Response._handle_range_header``),
so one 8 MiB part of a 1 GiB object costs about as much as the full object
(0.76 s per part, measured here, against 18 s for the whole object). Real
object stores serve a range in time proportional to the range. Benchmarking a
ranged, concurrent downloader against stock moto would therefore measure
moto, not the downloader.

This script starts the stock server (same arguments as ``moto_server``) after
patching two things, nothing else:

* ``FakeKey.value`` returns a lazy, slice-able view of the object while a
  ranged ``GetObject`` is being answered (a thread-local flag, set only
  around ``S3Response.get_object``), and
* slicing that view reads just ``[start, stop)`` from the object's buffer.

Full-object GETs (what Triton's own S3 client does), listings, HEADs and
uploads run stock moto code. Run: ``python bench/moto_ranged.py -H 127.0.0.1 -p PORT``.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

_STATE = threading.local()


class _RangeView:
    """Just enough of ``bytes`` for moto's range handler: ``len()``, truth and slicing."""

    def __init__(self, key: Any) -> None:
        self._key = key
        self._size = int(key.contentsize)

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __getitem__(self, item: slice) -> bytes:
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("only contiguous slices are supported")
        start, stop, _ = item.indices(self._size)
        with self._key.lock:
            self._key._value_buffer.seek(start)
            return bytes(self._key._value_buffer.read(max(0, stop - start)))


def patch_moto() -> None:
    """Install the ranged-read patch into the imported moto modules."""
    from moto.s3.models import FakeKey
    from moto.s3.responses import S3Response

    stock_value = FakeKey.value
    stock_get_object = S3Response.get_object

    def value(self: Any) -> Any:
        if getattr(_STATE, "ranged", False):
            return _RangeView(self)
        return stock_value.fget(self)

    def get_object(self: Any) -> Any:
        ranged = bool(self.headers.get("range")) and not self._get_int_param("partNumber")
        _STATE.ranged = ranged
        try:
            return stock_get_object(self)
        finally:
            _STATE.ranged = False

    FakeKey.value = property(value, stock_value.fset)  # type: ignore[method-assign]
    S3Response.get_object = get_object  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> None:
    """Patch moto, then run its server with moto_server's arguments."""
    patch_moto()
    from moto.server import main as moto_main

    moto_main(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
