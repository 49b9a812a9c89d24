"""The gateway's rate limit, circuit breaker and read coalescing, as pure logic on a clock the test moves."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fluxkv.gateway.breaker import CircuitBreaker, State
from fluxkv.gateway.coalesce import Coalescer
from fluxkv.gateway.rate_limit import TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the token bucket


def test_the_bucket_allows_its_burst_then_its_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=1000, burst=2000, clock=clock)
    assert sum(bucket.take() for _ in range(2500)) == 2000
    assert bucket.refused == 500
    clock.now += 0.1  # 100 tokens
    assert sum(bucket.take() for _ in range(150)) == 100
    clock.now += 60  # never more than the burst
    assert sum(bucket.take() for _ in range(5000)) == 2000


def test_rate_zero_is_no_limit() -> None:
    bucket = TokenBucket(rate=0, burst=1, clock=Clock())
    assert all(bucket.take() for _ in range(10_000)) and bucket.refused == 0


@given(st.lists(st.floats(min_value=0, max_value=2), min_size=1, max_size=200))
def test_the_bucket_never_allows_more_than_burst_plus_rate_times_time(gaps: list[float]) -> None:
    clock = Clock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock)
    allowed = 0
    for gap in gaps:
        clock.now += gap
        allowed += bucket.take()
    assert allowed <= 5 + 10 * sum(gaps) + 1e-6  # the clock's float sums round


def test_bad_bucket_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="rate >= 0 and burst >= 1"):
        TokenBucket(rate=-1, burst=1)


# -- the circuit breaker


def run(breaker: CircuitBreaker, outcomes: str) -> None:
    """One request per character: `f` fails, `s` succeeds."""
    for outcome in outcomes:
        assert breaker.admit()
        breaker.done(failed=outcome == "f")


def test_the_breaker_opens_at_half_failures_of_ten_requests_and_not_before() -> None:
    clock = Clock()
    breaker = CircuitBreaker(clock=clock)
    run(breaker, "fffffffff")  # 9 failures: too few requests to judge
    assert breaker.state is State.CLOSED
    run(breaker, "f")
    assert breaker.state is State.OPEN and breaker.opened == 1
    assert not breaker.admit() and breaker.refused_open == 1


def test_under_half_failures_keeps_it_closed() -> None:
    breaker = CircuitBreaker(clock=Clock())
    run(breaker, "sfsfsfsfss" * 3)  # 40% failures
    assert breaker.state is State.CLOSED


def test_old_failures_leave_the_window() -> None:
    clock = Clock()
    breaker = CircuitBreaker(window_s=10, clock=clock)
    run(breaker, "fffff")
    clock.now += 11  # the five failures are out of the window
    run(breaker, "sssssfffff")  # 5 of 10 in the window: opens
    assert breaker.state is State.OPEN
    breaker = CircuitBreaker(window_s=10, clock=clock)
    run(breaker, "fffff")
    clock.now += 11
    run(breaker, "sssssffff")  # 4 of 9: not enough requests, and under half
    run(breaker, "s")
    assert breaker.state is State.CLOSED


def test_after_open_s_one_trial_request_decides() -> None:
    clock = Clock()
    breaker = CircuitBreaker(open_s=5, clock=clock)
    run(breaker, "f" * 10)
    clock.now += 4.9
    assert not breaker.admit()
    clock.now += 0.2
    assert breaker.admit() and breaker.state is State.HALF_OPEN
    assert not breaker.admit()  # one trial at a time
    breaker.done(failed=True)
    assert breaker.state is State.OPEN and breaker.opened == 2
    clock.now += 5
    assert breaker.admit()
    breaker.done(failed=False)
    assert breaker.state is State.CLOSED
    run(breaker, "fffffffff")  # the window was cleared: 9 failures do not open it again
    assert breaker.state is State.CLOSED


def test_requests_over_max_in_flight_are_refused_without_counting_as_failures() -> None:
    breaker = CircuitBreaker(max_in_flight=2, clock=Clock())
    assert breaker.admit() and breaker.admit()
    assert not breaker.admit() and breaker.refused_busy == 1
    breaker.done(failed=False)
    assert breaker.admit()
    assert breaker.in_flight == 2 and breaker.state is State.CLOSED


def test_requests_admitted_before_it_opened_do_not_count_after() -> None:
    breaker = CircuitBreaker(clock=Clock())
    assert breaker.admit()  # still in flight when the breaker opens
    run(breaker, "f" * 10)
    breaker.done(failed=False)
    assert breaker.state is State.OPEN and breaker.in_flight == 0


# -- coalescing


async def test_reads_of_one_key_and_scope_share_one_call() -> None:
    reads: Coalescer[str] = Coalescer()
    calls = 0
    release = asyncio.Event()

    async def call() -> str:
        nonlocal calls
        calls += 1
        await release.wait()
        return f"answer {calls}"

    waiting = [asyncio.create_task(reads.do("k", None, call)) for _ in range(5)]
    other_scope = asyncio.create_task(reads.do("k", "token", call))
    other_key = asyncio.create_task(reads.do("j", None, call))
    await asyncio.sleep(0)
    release.set()
    answers = await asyncio.gather(*waiting)
    assert set(answers) == {"answer 1"} and calls == 3 and reads.shared == 4
    assert {await other_scope, await other_key} == {"answer 2", "answer 3"}
    assert await reads.do("k", None, call) == "answer 4"  # nothing in flight any more


async def test_a_read_after_forget_makes_its_own_call_and_failures_are_shared() -> None:
    reads: Coalescer[str] = Coalescer()
    release = asyncio.Event()
    calls = 0

    async def call() -> str:
        nonlocal calls
        calls += 1
        mine = calls
        await release.wait()
        raise LookupError(f"failed {mine}")

    first = asyncio.create_task(reads.do("k", None, call))
    joined = asyncio.create_task(reads.do("k", None, call))
    await asyncio.sleep(0)
    reads.forget("k")  # a write of k began
    after_write = asyncio.create_task(reads.do("k", None, call))
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(first, joined, after_write, return_exceptions=True)
    assert [str(r) for r in results] == ["failed 1", "failed 1", "failed 2"]


async def test_a_cancelled_reader_leaves_the_call_to_the_others() -> None:
    reads: Coalescer[str] = Coalescer()
    release = asyncio.Event()

    async def call() -> str:
        await release.wait()
        return "value"

    leader = asyncio.create_task(reads.do("k", None, call))
    follower = asyncio.create_task(reads.do("k", None, call))
    await asyncio.sleep(0)
    leader.cancel()
    await asyncio.sleep(0)
    release.set()
    assert await follower == "value"
    assert leader.cancelled()
