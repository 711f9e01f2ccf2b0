"""Per-key rate limits: requests and tokens per minute, in a moving window (the ``limits``
library, in memory: one endpoint process). The caller is the API key's id, or the client
address when no keys are configured.

Requests are counted when they arrive. Tokens are counted when an answer is done (prompt +
generated tokens); a request is refused while the caller's remaining tokens would not cover
its prompt. A refusal carries the seconds until the window has room (Retry-After). A request
that is not a client's own (a shadow copy, a smoke test: serving/rollout.py) is neither
counted nor refused.
"""
from __future__ import annotations

import math
import time

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from serving.records import SYNTHETIC


class Quota:
    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None):
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self.requests = RateLimitItemPerMinute(requests_per_minute) if requests_per_minute else None
        self.tokens = RateLimitItemPerMinute(tokens_per_minute) if tokens_per_minute else None

    def _retry_after(self, item, caller: str) -> int:
        reset = self._limiter.get_window_stats(item, caller).reset_time
        return max(1, math.ceil(reset - time.time()))

    def admit(self, caller: str) -> tuple[str, int] | None:
        """Count one request; (what ran out, retry after s) when the caller is over a limit."""
        if SYNTHETIC.get():
            return None
        if self.requests is not None and not self._limiter.hit(self.requests, caller):
            return f"{self.requests.amount} requests per minute", self._retry_after(self.requests, caller)
        return None

    def admit_tokens(self, caller: str, prompt_tokens: int) -> tuple[str, int] | None:
        """Whether the caller's remaining tokens this minute cover ``prompt_tokens``."""
        if SYNTHETIC.get():
            return None
        if self.tokens is not None and not self._limiter.test(self.tokens, caller, cost=prompt_tokens):
            return f"{self.tokens.amount} tokens per minute", self._retry_after(self.tokens, caller)
        return None

    def spend(self, caller: str, tokens: int) -> None:
        """Count the tokens of a finished request (it may overdraw; the next ones wait)."""
        if self.tokens is not None and tokens > 0 and not SYNTHETIC.get():
            # a hit larger than what is left fails without counting: take what is left instead
            if not self._limiter.hit(self.tokens, caller, cost=tokens):
                left = self._limiter.get_window_stats(self.tokens, caller).remaining
                if left > 0:
                    self._limiter.hit(self.tokens, caller, cost=left)
