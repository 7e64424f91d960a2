"""The connect back-off of the network runners (redis, amqp): one shape for both.

After a failed connection attempt a runner does not try again (jobs for that target fail
at once, naming the last error) for a window that starts at ``BACKOFF_INITIAL`` and
doubles per failure up to ``BACKOFF_MAX``; a connection that comes up starts over.
"""

from __future__ import annotations

__all__ = ["BACKOFF_INITIAL", "BACKOFF_MAX", "Backoff"]

#: Back-off after a failed connection attempt: first window and cap, in seconds.
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0


class Backoff:
    """When to try connecting again after failures: ``initial`` doubling to ``maximum``.

    ``failed(now)`` opens a window (and returns its length); ``remaining(now)`` is what is
    left of it (0 once it has passed); ``succeeded()`` starts over from ``initial``.
    """

    def __init__(self, initial: float = BACKOFF_INITIAL, maximum: float = BACKOFF_MAX) -> None:
        self.initial = initial
        self.maximum = maximum
        self.failures = 0
        self.retry_at = 0.0

    def failed(self, now: float) -> float:
        """Record a failed attempt at ``now``; return the window before the next one."""
        delay = min(self.initial * 2.0**self.failures, self.maximum)
        self.failures += 1
        self.retry_at = now + delay
        return delay

    def succeeded(self) -> None:
        """A connection worked: the next failure waits ``initial`` again."""
        self.failures = 0
        self.retry_at = 0.0

    def remaining(self, now: float) -> float:
        """Seconds left before a new attempt is allowed (0 when allowed now)."""
        return max(0.0, self.retry_at - now)
