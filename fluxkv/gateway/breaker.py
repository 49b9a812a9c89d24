"""The gateway's circuit breaker, with the rules of Flux-KV's (hystrix-go's
defaults): over a rolling window, once at least `min_requests` requests were
seen and at least `failure_ratio` of them failed, it opens; open, it refuses
every request for `open_s`, then lets one trial request through (half-open):
its success closes the breaker and clears the window, its failure opens it
again. Apart from that, it refuses a request while `max_in_flight` are in flight.

What counts as a failure is the caller's call (the gateway: a node unavailable
or past its deadline, or a 5xx); a refusal by the breaker itself is not one.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(
        self,
        *,
        min_requests: int = 10,
        failure_ratio: float = 0.5,
        window_s: float = 10.0,
        open_s: float = 5.0,
        max_in_flight: int = 100,
        buckets: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if min_requests < 1 or not 0 < failure_ratio <= 1 or window_s <= 0 or open_s < 0 or max_in_flight < 1:
            raise ValueError(
                "expected min_requests >= 1, 0 < failure_ratio <= 1, window_s > 0, open_s >= 0, max_in_flight >= 1"
            )
        self.min_requests = min_requests
        self.failure_ratio = failure_ratio
        self.open_s = open_s
        self.max_in_flight = max_in_flight
        self._bucket_s = window_s / buckets
        self._clock = clock
        # The window: per bucket (its number since the epoch), [requests, failures].
        self._window: dict[int, list[int]] = {}
        self._buckets = buckets
        self.state = State.CLOSED
        self._opened_at = 0.0
        self._trial_out = False
        self.in_flight = 0
        self.opened = 0  # times it opened
        self.refused_open = 0  # requests refused while open or half-open
        self.refused_busy = 0  # requests refused for max_in_flight

    def admit(self) -> bool:
        """May a request go ahead? If so, the caller must call done() when it ends."""
        if self.in_flight >= self.max_in_flight:
            self.refused_busy += 1
            return False
        if self.state is State.OPEN:
            if self._clock() - self._opened_at < self.open_s:
                self.refused_open += 1
                return False
            self.state = State.HALF_OPEN
        if self.state is State.HALF_OPEN:
            if self._trial_out:
                self.refused_open += 1
                return False
            self._trial_out = True
        self.in_flight += 1
        return True

    def done(self, failed: bool) -> None:
        """An admitted request ended; `failed` says whether it counts as a failure."""
        self.in_flight -= 1
        if self.state is State.HALF_OPEN:
            self._trial_out = False
            if failed:
                self._open()
            else:
                self.state = State.CLOSED
                self._window.clear()
            return
        if self.state is State.OPEN:  # admitted before it opened: its outcome is old news
            return
        now = math.floor(self._clock() / self._bucket_s)
        for old in [b for b in self._window if b <= now - self._buckets]:
            del self._window[old]
        counts = self._window.setdefault(now, [0, 0])
        counts[0] += 1
        counts[1] += failed
        requests = sum(c[0] for c in self._window.values())
        failures = sum(c[1] for c in self._window.values())
        if requests >= self.min_requests and failures >= self.failure_ratio * requests:
            self._open()

    def _open(self) -> None:
        self.state = State.OPEN
        self._opened_at = self._clock()
        self._window.clear()
        self.opened += 1
