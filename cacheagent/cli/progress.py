"""``cacheagent warm``'s progress bar: tqdm on a terminal, nothing elsewhere.

tqdm sizes the bar to the terminal (and follows it when resized), so a narrow
terminal gets a shorter bar instead of wrapped, repeated lines, and it shows the
rate and the time left.
"""

from __future__ import annotations

import threading
from typing import Any, TextIO


class Progress:
    """Byte progress of one fetch; a no-op unless ``enabled`` (stderr is a terminal)."""

    def __init__(self, stream: TextIO, enabled: bool) -> None:
        self.stream, self.enabled = stream, enabled
        self._bar: Any = None
        # The fetch reports from its download threads; tqdm's counter is not atomic.
        self._lock = threading.Lock()

    def plan(self, files: int, total: int) -> None:
        """Learn what a miss will download: start the bar (a hit never calls this)."""
        if not self.enabled or total <= 0:
            return
        from tqdm import tqdm  # only a terminal pays for the import

        with self._lock:
            self._bar = tqdm(
                total=total,
                desc=f"{files} file{'s' if files != 1 else ''}",
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                dynamic_ncols=True,
                file=self.stream,
                mininterval=0.2,
                leave=True,
            )

    def advance(self, amount: int) -> None:
        """Count ``amount`` more bytes."""
        with self._lock:
            if self._bar is not None:
                self._bar.update(amount)

    def close(self) -> None:
        """Finish the bar's line."""
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
