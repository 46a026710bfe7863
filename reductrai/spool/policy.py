"""
When to send again: retry delays, C{Retry-After}, the per-upstream circuit
and the drain rate limit.  Every class here takes the time as an argument,
so that it is driven by the reactor's clock (or L{twisted.internet.task.Clock}).
"""

from __future__ import annotations

import email.utils
import random
from typing import Callable, Optional

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"


def backoff_delay(failures: int, base: float, cap: float, rng: Callable[[], float] = random.random) -> float:
    """
    Return the delay before the next attempt after C{failures}
    consecutive failures: exponential backoff with full jitter, a value
    drawn uniformly from M{[0, min(cap, base * 2 ** (failures - 1))]}.

    @param failures: consecutive failures so far (1 after the first).
    @param rng: returns a float in M{[0, 1)}.
    """
    if failures <= 0:
        return 0.0
    exponent = min(failures - 1, 62)
    ceiling = min(cap, base * (2 ** exponent))
    return rng() * ceiling


def retryable_status(status: Optional[int]) -> bool:
    """
    Whether an upstream outcome is worth retrying: no answer (L{None}),
    408, 429 or any 5xx.
    """
    return status is None or status in (408, 429) or 500 <= status <= 599


def parse_retry_after(value: Optional[bytes | str], now_wall: float) -> Optional[float]:
    """
    Parse a C{Retry-After} value into seconds from now: delta-seconds or
    an HTTP-date (RFC 9110, section 10.2.3).

    @param now_wall: the current time, seconds since the epoch, which an
        HTTP-date is measured against.
    @return: the delay (0 for a date in the past), or L{None} when the
        value is missing or malformed.
    """
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    text = value.strip()
    if not text:
        return None
    if text.isdigit():
        return float(int(text))
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if moment is None:
        return None
    return max(0.0, moment.timestamp() - now_wall)


class Circuit:
    """
    A circuit breaker for one upstream.

    Closed: requests flow; C{threshold} consecutive failures open it.
    Open: nothing is sent until C{reopen_at}; then it is half-open.
    Half-open: exactly one probe may be sent; its success closes the
    circuit, its failure opens it again with a longer delay.

    @ivar state: L{CLOSED}, L{OPEN} or L{HALF_OPEN}.
    @ivar failures: consecutive failures.
    @ivar reopen_at: when an open circuit lets a probe through.
    @ivar not_before: earliest time of the next send in any state
        (backoff or C{Retry-After}).
    """

    def __init__(self, threshold: int, base: float, cap: float, rng: Callable[[], float] = random.random) -> None:
        self.threshold = threshold
        self.base = base
        self.cap = cap
        self.rng = rng
        self.state = CLOSED
        self.failures = 0
        self.reopen_at = 0.0
        self.not_before = 0.0
        self.probing = False

    def allows(self, now: float) -> bool:
        """
        Whether a request may be sent now.  An open circuit whose delay has
        passed turns half-open and allows one probe at a time.
        """
        if now < self.not_before:
            return False
        if self.state == OPEN:
            if now < self.reopen_at:
                return False
            self.state = HALF_OPEN
        if self.state == HALF_OPEN:
            return not self.probing
        return True

    def sending(self) -> None:
        """
        Note that a request is being sent (the probe, when half-open).
        """
        if self.state == HALF_OPEN:
            self.probing = True

    def next_allowed(self) -> float:
        """
        The earliest time L{allows} can return true.
        """
        if self.state == OPEN:
            return max(self.reopen_at, self.not_before)
        return self.not_before

    def succeeded(self) -> Optional[str]:
        """
        Record a delivered request.

        @return: the previous state when this changed it, else L{None}.
        """
        previous = self.state
        self.failures = 0
        self.probing = False
        self.not_before = 0.0
        self.state = CLOSED
        return previous if previous != CLOSED else None

    def failed(self, now: float, retry_after: Optional[float] = None) -> Optional[str]:
        """
        Record a failed attempt: set the next send time from the backoff
        (or C{retry_after} when it is longer) and open the circuit when
        the threshold is reached or a probe failed.

        @return: L{OPEN} when this opened a closed circuit, else L{None}
            (a failed probe reopens a half-open circuit quietly).
        """
        self.failures += 1
        self.probing = False
        delay = backoff_delay(self.failures, self.base, self.cap, self.rng)
        if retry_after is not None:
            delay = max(delay, retry_after)
        self.not_before = now + delay
        previous = self.state
        if self.state == HALF_OPEN or self.failures >= self.threshold:
            self.state = OPEN
            self.reopen_at = now + delay
        return OPEN if previous == CLOSED and self.state == OPEN else None

    def aborted(self) -> None:
        """
        A probe ended without an upstream outcome (the spool stopped).
        """
        self.probing = False


class TokenBucket:
    """
    Allow C{rate} events per second on average with bursts of C{burst}.
    A rate of 0 allows everything.
    """

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = max(1.0, burst)
        self.tokens = self.burst
        self.updated = now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def take(self, now: float) -> bool:
        """
        Take one token if there is one.
        """
        if self.rate <= 0:
            return True
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def next_token(self, now: float) -> float:
        """
        When the next token will be available.
        """
        if self.rate <= 0:
            return now
        self._refill(now)
        if self.tokens >= 1.0:
            return now
        return now + (1.0 - self.tokens) / self.rate
