"""When a model whose start on demand failed is tried again (pure: no I/O, no clock).

After a failed start the model is not started again for a window that doubles with each failure
in a row, from :data:`FIRST_BACKOFF` to :data:`MAX_BACKOFF` seconds, and is reset by a start that
succeeds. Within the window a request is answered at once with a 503 (:meth:`StartBackoff.refusal`)
naming the model, the last failure and when the next try is, instead of a launch being tried on
every request. Times are the caller's (``time.monotonic()``).
"""

from __future__ import annotations

from dataclasses import dataclass

from broker_client import Unavailable

__all__ = ["FIRST_BACKOFF", "MAX_BACKOFF", "StartBackoff"]

# Seconds before the first retry of a failed start: a worker's heartbeat interval (2 s by
# default), so a start that failed for want of room is tried again on the memory the next
# heartbeat reports, and a request storm against a broken model launches at most once per beat.
FIRST_BACKOFF = 2.0
# The longest window: a model that keeps failing (a bad URI, a file that is not there) is
# tried once a minute, which bounds the wasted loads to 60 an hour while a fix (a worker
# with room, a file put in place) is still picked up within a minute.
MAX_BACKOFF = 60.0


@dataclass
class StartBackoff:
    """The failed starts in a row of one model, and until when it is not started again."""

    uid: str
    first: float = FIRST_BACKOFF
    longest: float = MAX_BACKOFF
    failures: int = 0
    last_error: str | None = None
    until: float = 0.0

    def __post_init__(self) -> None:
        if not self.first > 0:
            raise ValueError(f"the first backoff must be positive, got {self.first}")
        if self.longest < self.first:
            raise ValueError(f"the longest backoff {self.longest} is shorter than the first {self.first}")

    def failed(self, error: str, now: float) -> float:
        """Count a failed start at ``now``; returns the window's length in seconds."""
        self.failures += 1
        self.last_error = error
        window = min(self.first * 2 ** (self.failures - 1), self.longest)
        self.until = now + window
        return window

    def succeeded(self) -> None:
        """A start succeeded: the next failure waits the first window again."""
        self.failures = 0
        self.last_error = None
        self.until = 0.0

    def waiting(self, now: float) -> bool:
        """Whether no start may be tried at ``now``."""
        return self.failures > 0 and now < self.until

    def refusal(self, now: float) -> Unavailable:
        """The 503 a request gets within the window."""
        return Unavailable(
            f"model {self.uid!r} is not started: its last start failed ({self.last_error}); "
            f"the next try is in {max(0.0, self.until - now):.1f} s, on the first request after "
            f"that ({self.failures} failed start(s) in a row; the wait doubles from "
            f"{self.first:g} s to {self.longest:g} s)"
        )
