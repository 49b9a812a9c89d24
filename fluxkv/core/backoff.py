"""Exponential backoff with jitter, for every loop that tries again: the CDC
publisher's and consumer's reconnects, etcd discovery and registration, the
workers' restarts, and the client SDK's Retry, which draws with
jittered_delay alone (its documented first wait, 0.05-0.1 s, has no floor).

The n-th wait in a row (n = 0, 1, ...) has the cap min(max_s, base_s * 2**n)
and is drawn with "equal jitter" (AWS Architecture Blog, "Exponential Backoff
and Jitter"): between half and all of the cap, at random, so that nodes that
lost the same broker or etcd at once do not try again in step. Equal rather
than full jitter (anywhere from 0 to the cap): full jitter spreads the tries a
little more, but may try again almost at once, and these loops want a least
wait: a worker that crashes at start must not be restarted in a busy loop, nor
a broker or etcd that just went away be called again at once. `Backoff` also
never waits less than its minimum, so each loop's MIN and MAX constants bound
every wait: the first wait is the minimum, the later ones are jittered.

Not a library: tenacity, stamina and backoff retry a call (a decorator or an
attempt loop around a function that raises); these loops run for ever, reset
after a success that is theirs to define (a connection made, a watch event, a
worker that ran a minute) and log each wait, which takes this module's few
lines, not a dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

__all__ = ["Backoff", "jittered_delay", "wait_or_stop"]

# 2.0 ** 1024 overflows; past 1023 doublings every cap is max_s anyway.
_MAX_DOUBLINGS = 1023
_random = random.Random()


def jittered_delay(base_s: float, max_s: float, failures: int, rng: random.Random = _random) -> float:
    """The wait after `failures` earlier waits in a row: between half and all of
    min(max_s, base_s * 2 ** failures), at random."""
    cap = min(max_s, base_s * 2.0 ** min(failures, _MAX_DOUBLINGS))
    return rng.uniform(cap / 2, cap)


class Backoff:
    """The waits of a loop that tries again until it succeeds: `min_s`, then
    doubling up to `max_s`, jittered (jittered_delay) and never below `min_s`.
    `reset()` after a success starts again from `min_s`."""

    def __init__(self, min_s: float, max_s: float, rng: random.Random = _random) -> None:
        if not 0 < min_s <= max_s:
            raise ValueError(f"expected 0 < min_s <= max_s, got {min_s} and {max_s}")
        self._min_s = min_s
        self._max_s = max_s
        self._rng = rng
        self._failures = 0  # waits since the last reset

    def next_delay(self) -> float:
        """Seconds to wait before the next try."""
        delay = max(self._min_s, jittered_delay(self._min_s, self._max_s, self._failures, self._rng))
        self._failures += 1
        return delay

    def reset(self) -> None:
        self._failures = 0


async def wait_or_stop(seconds: float, stop: asyncio.Event) -> bool:
    """Wait `seconds`, or less if `stop` is set first; True if it was."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
    return stop.is_set()


def stop_if_cancelling() -> None:
    """For a retry loop, after an attempt: raise CancelledError if the task
    was asked to stop. aiormq connects in a task of its own, and a
    cancellation that arrives as that task ends is lost: the caller sees the
    connection, or its error, instead. Without this check the loop would
    retry forever with nobody left to cancel it again."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
