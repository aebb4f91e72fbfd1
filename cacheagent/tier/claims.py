"""Claims: one node downloads each blob from the origin, the others follow it.

A claim is an object created with the tier's conditional create, so among
all the nodes that miss a blob at once exactly one creates it and leads. Its
leader keeps it alive with a heartbeat (:class:`Heartbeats` rewrites it every
:data:`HEARTBEAT_S` with a growing ``beat``). A claim is taken over when

- its leader released it (it failed: the record says ``released``), or
- its ``beat`` has not changed for :data:`CLAIM_TTL_S` by the *observer's*
  monotonic clock (the leader died or lost the tier; clocks that disagree
  across machines never matter).

A takeover is itself a conditional create, of the next *generation*
(``claims/<id>/<g + 1>``): of all the nodes that saw the claim go stale,
again exactly one wins. No claim is ever overwritten by a node that does not
own it.

The same machinery bounds how many nodes fall back to the origin at once
while the tier still answers (:class:`FallbackGate`, a few slots that are
claims too).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

from cacheagent.tier.backend import Backend
from cacheagent.tier.errors import TierAccessDeniedError, TierConfigError, TierUnavailableError
from cacheagent.tier.layout import ClaimRecord, slot_key

_log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
# A claim whose beat stood still this long is dead. Five missed heartbeats: a
# leader's slow PUT is not mistaken for a death, and a killed leader costs its
# followers a few seconds.
CLAIM_TTL_S = 5.0
# Takeovers of one blob before its nodes stop trying and use the origin.
MAX_GENERATIONS = 16
# How many nodes may fetch from the origin at once while the tier is slow.
FALLBACK_SLOTS = 2
# The longest a release waits for a heartbeat's write of the same claim to end (that
# write is bounded by the backend's timeout and retries, well under this).
RELEASE_WAIT_S = 60.0

TierError = (TierUnavailableError, TierAccessDeniedError, TierConfigError)


@dataclass
class HeldClaim:
    """A claim this process owns, kept alive by :class:`Heartbeats` until released.

    ``lock`` orders a heartbeat's write against the release: a beat that read the
    claim as held just before it was released must not write it again after the
    release deleted it (a claim back from the dead, left behind), nor overwrite its
    ``released`` mark (which tells followers to take over at once, instead of
    waiting out :data:`CLAIM_TTL_S`).
    """

    key: str
    record: ClaimRecord
    released: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)


class Heartbeats:
    """The one thread of a tier that rewrites every claim its process holds."""

    def __init__(self, backend: Backend, interval: float = HEARTBEAT_S) -> None:
        self.backend, self.interval = backend, interval
        self._held: dict[str, HeldClaim] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, key: str, record: ClaimRecord) -> HeldClaim:
        """Keep the claim at ``key`` (just created with ``record``) alive."""
        held = HeldClaim(key, record)
        with self._lock:
            self._held[key] = held
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="cacheagent-tier-heartbeat", daemon=True
                )
                self._thread.start()
        return held

    def release(self, held: HeldClaim, *, done: bool, older: Iterable[str] = ()) -> None:
        """Stop beating ``held``. ``done``: delete it (and the ``older`` generations);
        else mark it released, so that followers take over at once. Best effort."""
        with self._lock:
            self._held.pop(held.key, None)
        locked = held.lock.acquire(blocking=False)
        if not locked:
            # A heartbeat is writing this claim now: one tier operation, bounded by the
            # backend's own timeout and retries, so this wait is a formality's bound.
            _log.debug("releasing tier claim %s waits for its heartbeat's write", held.key)
            locked = held.lock.acquire(timeout=RELEASE_WAIT_S)
            if not locked:
                _log.warning(
                    "a heartbeat of tier claim %s has been writing for %.0f s; releasing "
                    "it anyway (the claim may outlive this release and then expire)",
                    held.key,
                    RELEASE_WAIT_S,
                )
        try:
            held.released = True
            if done:
                self.backend.delete(held.key)
                for key in older:
                    self.backend.delete(key)
            else:
                self.backend.put(held.key, replace(held.record, released=True).to_json())
        except TierError as exc:
            _log.info(
                "could not release the tier claim %s (%s); it expires by itself", held.key, exc
            )
        finally:
            if locked:
                held.lock.release()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval)
            with self._lock:
                claims = list(self._held.values())
            for held in claims:
                self._beat(held)

    def _beat(self, held: HeldClaim) -> None:
        with held.lock:
            if held.released:  # released since this round began: leave it be
                return
            record = replace(held.record, beat=held.record.beat + 1, time=time.time())
            try:
                self.backend.put(held.key, record.to_json())
            except TierError as exc:
                # Followers may take over: the work is then done twice, never wrongly.
                _log.debug("heartbeat of tier claim %s failed: %s", held.key, exc)
                return
            held.record = record


class ClaimView:
    """What one node sees of a claim's generations: the current one, and whether it lives."""

    def __init__(self, backend: Backend, key: Callable[[int], str]) -> None:
        self.backend, self.key = backend, key
        self.generation = -1
        self.record: ClaimRecord | None = None
        self._beat_seen: tuple[int, int] | None = None  # (generation, beat)
        self._seen_at = 0.0

    def refresh(self) -> ClaimRecord | None:
        """Read the newest generation; None when there is no claim at all."""
        generation = max(self.generation, 0)
        record = ClaimRecord.parse(self.backend.get(self.key(generation)))
        if record is None and generation > 0:
            # Our generation is gone (its leader finished and cleaned up, or we
            # looked ahead of a deletion): start again from the first one.
            generation = 0
            record = ClaimRecord.parse(self.backend.get(self.key(0)))
        if record is None:
            self.generation, self.record = -1, None
            return None
        while generation + 1 < MAX_GENERATIONS:
            newer = ClaimRecord.parse(self.backend.get(self.key(generation + 1)))
            if newer is None:
                break
            generation, record = generation + 1, newer
        self.generation, self.record = generation, record
        if self._beat_seen != (generation, record.beat):
            self._beat_seen = (generation, record.beat)
            self._seen_at = time.monotonic()
        return record

    def stale(self, ttl: float = CLAIM_TTL_S) -> bool:
        """True if the current claim was released, or its beat stood still for ``ttl`` s."""
        if self.record is None:
            return False
        if self.record.released:
            return True
        return time.monotonic() - self._seen_at >= ttl

    def older_keys(self, generation: int) -> Iterator[str]:
        """The keys of the generations before ``generation``, newest first."""
        for g in range(generation - 1, -1, -1):
            yield self.key(g)


def try_claim(backend: Backend, view: ClaimView, record: ClaimRecord) -> tuple[int, bool]:
    """Create the claim's next generation (0 when there is none); (generation, won)."""
    generation = 0 if view.record is None else view.generation + 1
    if generation >= MAX_GENERATIONS:
        return generation, False
    return generation, backend.create(view.key(generation), record.to_json())


class FallbackGate:
    """At most :data:`FALLBACK_SLOTS` nodes of the fleet fetch from the origin at once.

    Used when the tier answers but a blob's leader is too slow to follow; when
    the tier does not answer at all, no gate can be kept and nodes go to the
    origin directly (with the origin client's jittered backoff on 503).
    """

    def __init__(self, backend: Backend, heartbeats: Heartbeats, node: str) -> None:
        self.backend, self.heartbeats, self.node = backend, heartbeats, node
        self._views = [ClaimView(backend, _slot_keys(slot)) for slot in range(FALLBACK_SLOTS)]

    @contextlib.contextmanager
    def slot(self, wait: float) -> Iterator[bool]:
        """Hold a slot for the block; wait at most ``wait`` s for one. Yields whether one
        was held: past the wait, or with the tier down, the block runs anyway."""
        held = self._acquire(wait)
        try:
            yield held is not None
        finally:
            if held is not None:
                claim, view, generation = held
                self.heartbeats.release(claim, done=True, older=view.older_keys(generation))

    def _acquire(self, wait: float) -> tuple[HeldClaim, ClaimView, int] | None:
        deadline = time.monotonic() + wait
        record = ClaimRecord(self.node, 0, 1, 0, time.time())
        while True:
            try:
                for view in self._views:
                    current = view.refresh()
                    if current is not None and not view.stale():
                        continue
                    generation, won = try_claim(self.backend, view, record)
                    if won:
                        key = view.key(generation)
                        return self.heartbeats.hold(key, record), view, generation
            except TierError as exc:
                _log.info("no fallback slot on the tier (%s); fetching from the origin", exc)
                return None
            if time.monotonic() >= deadline:
                _log.warning(
                    "every origin fallback slot of the tier %s stayed busy for %.0f s; "
                    "fetching from the origin anyway",
                    self.backend.url,
                    wait,
                )
                return None
            time.sleep(0.25)


def _slot_keys(slot: int) -> Callable[[int], str]:
    def key(generation: int) -> str:
        return slot_key(slot, generation)

    return key
