"""The adaptive request limit and part sizes, driven by a simulated link."""

from __future__ import annotations

import pytest

from cacheagent.remote.pacing import (
    GAIN,
    MIN_PART,
    START,
    AdaptiveLimit,
    MiB,
    gain_needed,
    part_size_for,
)


class Link:
    """A link with a per-connection cap and a total cap, stepped part by part."""

    def __init__(self, per_conn: float, total: float) -> None:
        self.per_conn, self.total, self.now = per_conn, total, 0.0

    def clock(self) -> float:
        return self.now

    def run(self, limit: AdaptiveLimit, parts: int, part: int) -> None:
        """Complete ``parts`` parts, ``limit.limit`` at a time, at the link's speed."""
        left = parts
        while left:
            batch = min(limit.limit, left)
            rate = min(self.per_conn, self.total / batch)  # each connection's share
            began = self.now
            self.now += part / rate
            for _ in range(batch):
                limit.done(part, began)
            left -= batch


@pytest.mark.parametrize(
    ("per_conn", "expected_at_least"),
    [(2e6, 64), (5e6, 32), (20e6, 8)],
)
def test_the_limit_grows_until_the_link_is_full(per_conn: float, expected_at_least: int) -> None:
    """On a 160 MB/s link, a lower per-connection cap ends with more requests in flight."""
    link = Link(per_conn, 160e6)
    limit = AdaptiveLimit(128, clock=link.clock)
    link.run(limit, 2000, MiB)
    assert limit.settled
    assert limit.limit >= expected_at_least
    assert limit.limit * per_conn >= 160e6  # enough in flight to fill the link


def test_a_fast_connection_keeps_the_starting_number() -> None:
    """When a few connections fill the link, the first doubling brings no gain and is
    taken back: the limit ends where it started, never at the doubled number."""
    link = Link(100e6, 160e6)
    limit = AdaptiveLimit(128, clock=link.clock)
    link.run(limit, 500, MiB)
    assert limit.settled and limit.limit == START
    assert limit.peak == 2 * START  # it tried once


def test_set_up_before_the_first_request_is_not_taken_for_a_slow_link() -> None:
    """Time between the limit's creation and its first request (threads starting, the
    download's own set-up) is not link time: a fast link still keeps the starting
    number and tries one doubling, where counting it would look like a gain and
    double twice."""
    link = Link(100e6, 64e6)
    limit = AdaptiveLimit(256, clock=link.clock)
    link.now += 0.25  # half a round of 32 MiB at 64 MB/s passes before any request
    link.run(limit, 500, MiB)
    assert limit.settled and limit.limit == START and limit.peak == 2 * START


def test_a_round_is_timed_from_its_start_when_its_parts_began_earlier() -> None:
    """Parts completing in a later round were sent during the one before: that round
    is timed from its own start, so its rate is not diluted by the previous one."""
    now = [0.0]
    limit = AdaptiveLimit(256, start=2, clock=lambda: now[0])
    now[0] = 1.0
    limit.done(MiB, 0.0)
    limit.done(MiB, 0.0)  # round 1: 2 MiB in 1 s; doubles to 4
    assert limit.limit == 4
    now[0] = 2.0
    for _ in range(4):
        limit.done(MiB, 0.0)  # round 2: 4 MiB in its 1 s, 2x the rate (from 0 s: no gain)
    assert limit.limit == 8


def test_a_slow_link_ends_at_the_last_doubling_that_paid() -> None:
    """64 connections fill 160 MB/s at 2.5 MB/s each; 128 bring nothing more and are
    taken back to 64."""
    link = Link(2.5e6, 160e6)
    limit = AdaptiveLimit(256, clock=link.clock)
    link.run(limit, 3000, MiB)
    assert limit.settled and limit.limit == 64 and limit.peak == 128


def test_a_doubling_onto_the_cap_that_brings_nothing_is_taken_back() -> None:
    """On a link that 32 requests fill, a noisy first round lets the second pass for a
    gain and double onto the cap; the round at the cap is judged like any other, so
    it brings nothing and goes back, instead of being kept because it is the cap."""
    now = [0.0]
    limit = AdaptiveLimit(128, clock=lambda: now[0])

    def round_of(parts: int, seconds: float) -> None:
        began = now[0]
        now[0] += seconds
        for _ in range(parts):
            limit.done(MiB, began)

    round_of(START, 0.6)  # 53 MiB/s: the link's 64 with a noisy start
    assert limit.limit == 2 * START
    round_of(2 * START, 1.0)  # 64 MiB/s: passes for a gain over the noisy round
    assert limit.limit == 128 and not limit.settled
    round_of(128, 2.0)  # still 64 MiB/s, at the cap
    assert limit.settled and limit.limit == 2 * START and limit.peak == 128


@pytest.mark.parametrize("cap", [36, 72, 140])
def test_a_cap_no_doubling_reaches_is_kept_on_a_link_that_needs_it(cap: int) -> None:
    """The step onto a cap like 72 (from 64) cannot bring a doubling's gain; it needs
    a gain in proportion, so a link that needs every request keeps the cap."""
    link = Link(1e6, 1e9)  # needs 1000 connections
    limit = AdaptiveLimit(cap, clock=link.clock)
    link.run(limit, 3000, MiB)
    assert limit.settled and limit.limit == cap == limit.peak


def test_a_short_step_onto_the_cap_that_brings_nothing_is_taken_back() -> None:
    """32 requests fill the link: the step to a cap of 36 brings nothing and goes back."""
    link = Link(5e6, 160e6)
    limit = AdaptiveLimit(36, clock=link.clock)
    link.run(limit, 500, MiB)
    assert limit.settled and limit.limit == START and limit.peak == 36


@pytest.mark.parametrize(
    ("before", "after", "needed"),
    [(32, 64, GAIN), (64, 100, 1 + (GAIN - 1) * 36 / 64), (32, 36, 1 + (GAIN - 1) / 8)],
)
def test_the_gain_a_step_needs_is_in_proportion_to_it(
    before: int, after: int, needed: float
) -> None:
    """A doubling needs :data:`GAIN`; a shorter step needs that share of its gain."""
    assert gain_needed(before, after) == pytest.approx(needed)


def test_the_cap_is_never_exceeded() -> None:
    """``concurrency`` is the cap, whatever the link."""
    link = Link(1e6, 1e9)
    limit = AdaptiveLimit(16, clock=link.clock)
    link.run(limit, 1000, MiB)
    assert limit.limit == 16 == limit.peak and limit.settled


def test_throttling_halves_and_stops_growth() -> None:
    """A 429/503 SlowDown halves the limit for the rest of the download."""
    link = Link(2e6, 1e9)
    limit = AdaptiveLimit(128, clock=link.clock)
    link.run(limit, 100, MiB)
    before = limit.limit
    limit.throttled()
    assert limit.limit == max(1, before // 2) and limit.settled
    link.run(limit, 500, MiB)
    assert limit.limit == max(1, before // 2)


@pytest.mark.parametrize(
    ("cap", "largest", "size"),
    [
        (128, 8 * MiB, MIN_PART),
        (32, 8 * MiB, 2 * MiB),
        (4, 8 * MiB, 8 * MiB),
        (8, 64 * 1024, 64 * 1024),
    ],
)
def test_part_size_shrinks_as_the_cap_grows(cap: int, largest: int, size: int) -> None:
    """Parts in flight share one memory budget; never below 1 MiB nor above part_size."""
    assert part_size_for(cap, largest) == size
