"""fluxkv/core/backoff.py as pure logic: the waits' bounds, their caps, reset, and
the wait that a stop event ends (without sleeping)."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fluxkv.client import Retry
from fluxkv.core.backoff import Backoff, jittered_delay, wait_or_stop

seconds = st.floats(0.001, 100.0)


def cap(first_s: float, max_s: float, n: int) -> float:
    return min(max_s, first_s * 2**n)


@given(seconds, seconds, st.integers(0, 2000), st.randoms(use_true_random=False))
def test_a_jittered_delay_is_between_half_and_all_of_its_cap(
    base_s: float, max_s: float, failures: int, rng: random.Random
) -> None:
    c = cap(base_s, max_s, min(failures, 1023))
    assert c / 2 <= jittered_delay(base_s, max_s, failures, rng) <= c


@given(st.tuples(seconds, seconds).map(sorted), st.integers(1, 200), st.randoms(use_true_random=False))
def test_every_wait_is_within_the_bounds_and_under_its_doubling_cap(
    bounds: list[float], count: int, rng: random.Random
) -> None:
    min_s, max_s = bounds
    backoff = Backoff(min_s, max_s, rng)
    delays = [backoff.next_delay() for _ in range(count)]
    assert delays[0] == min_s
    for n, delay in enumerate(delays):
        assert max(min_s, cap(min_s, max_s, n) / 2) <= delay <= cap(min_s, max_s, n)


@given(st.integers(0, 50), st.randoms(use_true_random=False))
def test_reset_starts_again_from_the_minimum(failures: int, rng: random.Random) -> None:
    backoff = Backoff(0.5, 5.0, rng)
    for _ in range(failures):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() == 0.5
    assert 0.5 <= backoff.next_delay() <= 1.0
    assert 1.0 <= backoff.next_delay() <= 2.0


def test_the_waits_are_spread_over_the_lower_half_of_their_cap() -> None:
    backoff = Backoff(1.0, 30.0, random.Random(15))
    delays = [backoff.next_delay() for _ in range(1000)]
    at_max = delays[5:]  # 1 * 2 ** 5 passes 30 s
    assert len(set(at_max)) == len(at_max)  # jittered, not a fixed schedule
    assert 15.0 <= min(at_max) < 15.5 and 29.5 < max(at_max) <= 30.0


def test_an_outage_of_any_length_keeps_waiting_at_most_the_maximum() -> None:
    backoff = Backoff(0.5, 5.0, random.Random(1))
    for _ in range(5000):  # far past 2.0 ** 1024, which would overflow
        delay = backoff.next_delay()
    assert 2.5 <= delay <= 5.0


@pytest.mark.parametrize(("min_s", "max_s"), [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0)])
def test_bounds_that_make_no_backoff_are_refused(min_s: float, max_s: float) -> None:
    with pytest.raises(ValueError, match="0 < min_s <= max_s"):
        Backoff(min_s, max_s)


def test_the_clients_retry_waits_what_its_docs_say() -> None:
    # README: 0.05-0.1, 0.1-0.2 and 0.2-0.4 s; then at most max_backoff_s (1 s).
    retry = Retry()
    for failed, (low, high) in enumerate([(0.05, 0.1), (0.1, 0.2), (0.2, 0.4), (0.4, 0.8), (0.5, 1.0)], 1):
        assert all(low <= retry.delay(failed) <= high for _ in range(100))
    assert Retry(backoff_s=0).delay(3) == 0


async def test_wait_or_stop_ends_when_stop_is_set() -> None:
    stop = asyncio.Event()
    assert not await wait_or_stop(0, stop)
    waiting = asyncio.create_task(wait_or_stop(3600, stop))
    await asyncio.sleep(0)  # let it start waiting
    assert not waiting.done()
    stop.set()
    assert await waiting
    assert await wait_or_stop(3600, stop)  # already set: at once
