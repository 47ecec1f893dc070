"""Per-key limits: requests at once, requests and tokens per sliding minute.

``Limiter.admit(name, limits)`` runs when a request has named its model (and
is allowed it), before it queues for the model: it returns a :class:`Slot`
or a :class:`~llamaswap.principal.Refusal` (429 with ``Retry-After``).

* ``concurrent``: slots held across every model, from admission until the
  response ends, however it ends: :meth:`Slot.release` is called from the
  request's ``finally`` (served, failed, refused by the router, or cancelled
  because the client went away), and releasing twice is harmless, so a slot
  is never leaked.
* ``requestsPerMinute``: admissions in the last 60 s.  A request refused (by
  any limit) is not counted.
* ``tokensPerMinute``: input plus output tokens of responses that finished in
  the last 60 s, as the activity parser read them from ``usage``; a request
  is admitted while the window is below the limit (what it will use is not
  known yet), so one large answer can overshoot it once.  Tokens are kept
  per second (at most 60 entries per key).

Driven by an injectable clock (``seconds()``), no reactor: unit-tested with
``twisted.internet.task.Clock``.  State lives per key *name*, so it survives
reloads: a reload that changes a key's limits applies them to the next
admission, and requests in flight keep (and release) their slots.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Union

from .config import defaults as D
from .config.types import KeyLimits
from .principal import Refusal


class _KeyState:
    __slots__ = ("active", "requests", "tokens", "token_sum")

    def __init__(self) -> None:
        self.active = 0
        self.requests: deque[float] = deque()  # admission times (only with requestsPerMinute)
        self.tokens: deque[list] = deque()  # [time, tokens], one entry per second at most
        self.token_sum = 0

    def idle(self) -> bool:
        return not (self.active or self.requests or self.tokens)


class Slot:
    """One admitted request's share of its key's limits."""

    __slots__ = ("_limiter", "_name", "released")

    def __init__(self, limiter: "Limiter | None", name: str):
        self._limiter = limiter
        self._name = name
        self.released = limiter is None

    def release(self) -> None:
        """Give the concurrency slot back (idempotent)."""
        if self.released:
            return
        self.released = True
        self._limiter._release(self._name)


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds - 1e-9)))


class Limiter:
    def __init__(self, clock, window: float = D.RATE_WINDOW):
        self.clock = clock
        self.window = window
        self._keys: dict[str, _KeyState] = {}

    def active(self, name: str) -> int:
        """Requests of ``name`` admitted and not yet released."""
        state = self._keys.get(name)
        return state.active if state is not None else 0

    def admit(self, name: str, limits: KeyLimits) -> Union[Slot, Refusal]:
        if not limits:
            return Slot(None, name)  # nothing to count
        now = self.clock.seconds()
        state = self._keys.get(name)
        if state is None:
            state = self._keys[name] = _KeyState()
        self._prune(state, now)
        refusal = self._refusal(state, limits, now)
        if refusal is not None:
            if state.idle():
                del self._keys[name]
            return refusal
        state.active += 1
        if limits.requests_per_minute:
            state.requests.append(now)
        return Slot(self, name)

    def _refusal(self, state: _KeyState, limits: KeyLimits, now: float):
        window = self.window
        if limits.concurrent and state.active >= limits.concurrent:
            return Refusal(429, f"too many concurrent requests for this API key (limit {limits.concurrent})",
                           {"Retry-After": "1"}, "concurrency_limit")
        rpm = limits.requests_per_minute
        if rpm and len(state.requests) >= rpm:
            wait = state.requests[len(state.requests) - rpm] + window - now
            return Refusal(429, f"too many requests for this API key (limit {rpm} per minute)",
                           {"Retry-After": retry_after(wait)}, "rate_limit_exceeded")
        tpm = limits.tokens_per_minute
        if tpm and state.token_sum >= tpm:
            total = state.token_sum
            wait = window
            for when, tokens in state.tokens:  # the oldest go first: when is the window under the limit?
                total -= tokens
                if total < tpm:
                    wait = when + window - now
                    break
            return Refusal(429, f"too many tokens for this API key (limit {tpm} per minute)",
                           {"Retry-After": retry_after(wait)}, "rate_limit_exceeded")
        return None

    def add_tokens(self, name: str, tokens: int) -> None:
        """Count ``tokens`` a finished response of ``name`` used."""
        if tokens <= 0 or not name:
            return
        now = self.clock.seconds()
        state = self._keys.get(name)
        if state is None:
            state = self._keys[name] = _KeyState()
        self._prune(state, now)
        if state.tokens and now - state.tokens[-1][0] < 1.0:
            state.tokens[-1][1] += tokens
        else:
            state.tokens.append([now, tokens])
        state.token_sum += tokens

    def _release(self, name: str) -> None:
        state = self._keys.get(name)
        if state is None:
            return
        state.active = max(0, state.active - 1)
        self._prune(state, self.clock.seconds())
        if state.idle():
            del self._keys[name]

    def _prune(self, state: _KeyState, now: float) -> None:
        horizon = now - self.window
        while state.requests and state.requests[0] <= horizon:
            state.requests.popleft()
        while state.tokens and state.tokens[0][0] <= horizon:
            state.token_sum -= state.tokens.popleft()[1]
