"""How many requests a download keeps in flight, and how big each part is: adapted to the link.

No fixed number fills every link. One that caps each connection at 2 MB/s needs
80 connections to carry 160 MB/s; one at 100 MB/s per connection is full with two,
and more only add overhead. So a download starts with :data:`START` requests and
doubles the number in flight while the bytes per second keep growing (by at
least :data:`GAIN`), up to ``concurrency``, the cap. A doubling that brings no
gain is taken back, and a throttling answer (429, 503 SlowDown) halves it.

Why start at 32 and not at 1 or 4: each round of measurement lasts as long as a
part takes to arrive, 0.4 s for 1 MiB on a 2.5 MB/s connection, so every
doubling a download must climb costs a fraction of a second at a fraction of
the link (measured on SeaweedFS, 256 MiB over a link of 64 x 2.5 MB/s: starting
at 4, 1.65x the link's bound; at 16, 1.37x; at 32, 1.25x). Thirty-two requests
in flight cost a link that needs two nothing but 32 MiB of memory and sockets.

Part sizes follow from the same number: the bytes in flight are bounded by a
memory budget, so the more parts run at once, the smaller each one is (never
below 1 MiB, where the request's own latency starts to dominate; never above the
``part_size`` setting).

The controller sees only completed parts, so it measures what the link really
delivers, whatever the reason a connection is slow.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # a worker answering hits never builds a pool
    from concurrent.futures import Future, ThreadPoolExecutor

_log = logging.getLogger(__name__)

MiB = 1024 * 1024
START = 32  # requests in flight at first: cheap on any link (see above)
GAIN = 1.15  # a doubling must bring at least this much more throughput to go on
MIN_PART = 1 * MiB
# Bytes of parts in flight at once (requested, received, or waiting to be hashed).
# It sets the part size: 128 requests of 1 MiB fit, so RSS stays far under 300 MiB.
MEMORY_BUDGET = 160 * MiB


class AdaptiveLimit:
    """The number of requests to keep in flight, doubled while throughput grows.

    Like TCP's slow start: a *round* ends when as many parts have completed as
    were allowed in flight when it began; if the round moved at least
    :data:`GAIN` times the bytes per second of the best round so far, the limit
    doubles, else it goes back to the limit of that best round (the link was
    full: more requests would only queue) and stays there. A step onto the cap
    (when the cap is above the starting number) is judged too, so it is kept
    only if it paid; a step shorter than a doubling (a cap of 72 after 64) needs
    a gain in proportion (:func:`gain_needed`), or a cap a full doubling cannot
    reach would never be kept even on a link that needs it. Threads call
    :meth:`done` for each completed part; the download loop reads :attr:`limit`
    before it starts another request. Thread-safe.
    """

    def __init__(
        self,
        cap: int,
        *,
        start: int = START,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cap = max(1, cap)
        self._limit = min(self.cap, max(1, start))
        self._clock = clock
        self._lock = threading.Lock()
        self._round_start = clock()
        self._round_bytes = 0
        self._round_parts = 0
        self._round_first_began = float("inf")
        self._best_rate = 0.0
        self._best_limit = self._limit
        self._growing = self._limit < self.cap
        self.peak = self._limit

    @property
    def limit(self) -> int:
        """How many requests may be in flight now."""
        return self._limit

    @property
    def settled(self) -> bool:
        """True once the limit stopped growing: the link is full, the round at the cap
        was judged (or the cap is the starting number), or storage throttled."""
        return not self._growing

    def done(self, nbytes: int, began: float | None = None) -> None:
        """Count one completed part of ``nbytes``; at the end of a round, maybe double.

        ``began`` is when that part's request was sent (this limit's clock). A
        round is timed from the later of its start and its earliest request: the
        first round would otherwise also count what came before any request was
        sent (threads starting, the download's own set-up), read that as a slow
        link, and take the second round's plain noise for a gain.
        """
        with self._lock:
            self._round_bytes += nbytes
            self._round_parts += 1
            if began is not None:
                self._round_first_began = min(self._round_first_began, began)
            if not self._growing or self._round_parts < self._limit:
                return
            now = self._clock()
            anchor = self._round_start  # parts that say nothing of when they were sent
            if self._round_first_began <= now:
                anchor = max(anchor, self._round_first_began)
            self._judge(self._round_bytes / max(now - anchor, 1e-6))
            self._round_start = now
            self._round_bytes = 0
            self._round_parts = 0
            self._round_first_began = float("inf")

    def _judge(self, rate: float) -> None:
        if rate < self._best_rate * gain_needed(self._best_limit, self._limit):
            self._growing = False
            self._limit = self._best_limit
            _log.debug("fetch: %.1f MB/s, no gain; back to %d in flight", rate / 1e6, self._limit)
            return
        self._best_rate, self._best_limit = rate, self._limit
        if self._limit >= self.cap:
            # The round at the cap paid too: stay. It is judged like any other, so
            # a doubling onto the cap that brought nothing is taken back as well.
            self._growing = False
            _log.debug("fetch: %.1f MB/s at the cap of %d in flight", rate / 1e6, self._limit)
            return
        self._limit = min(self.cap, self._limit * 2)
        self.peak = max(self.peak, self._limit)
        _log.debug("fetch: %.1f MB/s; now %d in flight", rate / 1e6, self._limit)

    def throttled(self) -> None:
        """Storage asked us to slow down (429, 503 SlowDown): halve, and stop growing."""
        with self._lock:
            self._limit = max(1, self._limit // 2)
            self._growing = False
        _log.info("fetch: storage is throttling; down to %d requests in flight", self._limit)


def gain_needed(before: int, after: int) -> float:
    """How much more throughput a step from ``before`` to ``after`` requests in flight
    must bring to be kept: :data:`GAIN` for a doubling, in proportion for a shorter
    step (64 -> 72: 1 + 0.15 x 0.125), since on a link that needs them all the
    best it can bring is ``after / before``."""
    if before <= 0 or after <= before:
        return GAIN
    return 1 + (GAIN - 1) * min(1.0, after / before - 1)


def part_size_for(in_flight: int, largest: int) -> int:
    """Bytes per ranged part when ``in_flight`` requests may run at once.

    The memory budget shared by the parts in flight (and those waiting to be
    hashed) sets the size: more requests at once, smaller parts, never below
    1 MiB (where a request's latency starts to weigh) nor above ``largest``
    (the ``part_size`` setting). Whole MiB.
    """
    if largest < MIN_PART:
        return max(1, largest)
    share = MEMORY_BUDGET // max(1, 2 * in_flight)
    return max(MIN_PART, (min(largest, share) // MiB) * MiB)


_POLL_S = 0.2
# The most threads a link's pool may start: the largest ``concurrency`` setting.
POOL_THREADS = 256


class Link:
    """What every download to one storage endpoint shares in a process.

    Concurrent downloads (a LOAD and the prefetch of its siblings, several
    models of one start) draw request slots from one :class:`AdaptiveLimit`,
    memory from one budget and threads from one pool, so together they fill the
    link once instead of each pretending to own it (and a start fetching eight
    models runs as many threads as requests in flight, not eight pools' worth:
    threads beyond that only fight over the GIL).
    """

    def __init__(self, cap: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self.limit = AdaptiveLimit(cap, clock=clock)
        self._in_flight = 0
        self._held_bytes = 0
        self._downloads = 0
        self._pool: ThreadPoolExecutor | None = None

    @property
    def in_flight(self) -> int:
        """Requests running now, over every download sharing this link."""
        return self._in_flight

    def begin(self, cap: int) -> None:
        """A download starts. The first of a batch measures the link afresh.

        Downloads that overlap share what the first one learnt; one that starts
        when none runs begins small again, so a link that changed is measured as
        it is now.
        """
        with self._cond:
            if self._downloads == 0:
                self.limit = AdaptiveLimit(cap, clock=self._clock)
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                # Threads start as requests need them (an idle one is reused), so
                # the pool holds about as many as were ever in flight at once.
                self._pool = ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="cacheagent-fetch")
            self._downloads += 1

    def submit(self, fn: Callable[..., None], *args: Any) -> Future[None]:
        """Run ``fn(*args)`` on the link's pool (between :meth:`begin` and :meth:`end`)."""
        with self._cond:
            assert self._pool is not None, "submit() outside begin()/end()"
            return self._pool.submit(fn, *args)

    def end(self) -> None:
        """A download ended (whatever its outcome); the last one lets the pool's threads go."""
        with self._cond:
            self._downloads = max(0, self._downloads - 1)
            pool = self._pool if self._downloads == 0 else None
            if pool is not None:
                self._pool = None
        if pool is not None:
            pool.shutdown(wait=False)  # its work is done: every download waited for its parts

    def acquire(self, nbytes: int, stop: threading.Event) -> bool:
        """Wait for a request slot and ``nbytes`` of memory; False if ``stop`` was set.

        Waits in short steps so a failed download stops at once; the memory
        budget never blocks a lone request (a part bigger than the budget still
        goes, alone).
        """
        with self._cond:
            while not stop.is_set():
                room = self._held_bytes == 0 or self._held_bytes + nbytes <= MEMORY_BUDGET
                if self._in_flight < self.limit.limit and room:
                    self._in_flight += 1
                    self._held_bytes += nbytes
                    return True
                self._cond.wait(_POLL_S)
            return False

    def now(self) -> float:
        """The link's clock: when a request is sent, for :meth:`request_done`."""
        return self._clock()

    def request_done(self, nbytes: int | None, began: float | None = None) -> None:
        """A request sent at ``began`` ended with ``nbytes`` (None: it failed); free its slot."""
        if nbytes is not None:
            self.limit.done(nbytes, began)
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()

    def release_bytes(self, nbytes: int) -> None:
        """Memory of a part that has been hashed (or dropped) is free again."""
        with self._cond:
            self._held_bytes = max(0, self._held_bytes - nbytes)
            self._cond.notify_all()


_LINKS: dict[str, Link] = {}
_LINKS_LOCK = threading.Lock()


def link_for(endpoint: str) -> Link:
    """The process's one :class:`Link` to ``endpoint`` (e.g. a bucket's URL)."""
    with _LINKS_LOCK:
        link = _LINKS.get(endpoint)
        if link is None:
            link = _LINKS[endpoint] = Link(START)
        return link
