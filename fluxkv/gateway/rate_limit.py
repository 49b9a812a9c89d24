"""The gateway's rate limit: one token bucket for every request, as Flux-KV's
gateway has (golang.org/x/time/rate's Limiter: `rate` tokens a second, at most
`burst` held). A request takes a token or is refused at once (429); nothing
waits for a token, so an overloaded gateway answers fast rather than queueing.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """`rate` tokens a second, at most `burst` held, full at the start. rate 0: no limit."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if rate < 0 or burst < 1:
            raise ValueError(f"expected rate >= 0 and burst >= 1, got rate {rate} and burst {burst}")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()
        self.refused = 0

    def take(self) -> bool:
        """Take a token if there is one; False (and one more refusal counted) if not."""
        if not self.rate:
            return True
        now = self._clock()
        tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if tokens < 1:
            self._tokens = tokens
            self.refused += 1
            return False
        self._tokens = tokens - 1
        return True
