"""The requests held for a model that has no replica yet, bounded in count and age (pure).

A :class:`HoldQueue` keeps what arrived, oldest first, with the time it arrived. Past
``max_requests`` a new request is refused with a 429 naming the bound; a request older than
``max_age`` seconds is taken out by :meth:`HoldQueue.expired`, for its caller to answer it
with a 504 naming the wait; :meth:`HoldQueue.take` takes out the ones a cancel names. Times
are the caller's (``time.monotonic()``): no clock here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from broker_client import Overloaded

__all__ = ["DEFAULT_HOLD_MAX_AGE", "DEFAULT_HOLD_MAX_REQUESTS", "Held", "HoldQueue"]

T = TypeVar("T")

# Requests held per model while it starts. Each is one NATS message (a few hundred bytes to
# the max_payload of 1 MiB), so 1,000 cost at most a few MB; beyond that a caller is better
# told at once (429) than queued behind a load that may take a minute.
DEFAULT_HOLD_MAX_REQUESTS = 1000
# Seconds a request waits for its model to start: loading a 7B model from local disk takes
# 10 to 60 s; a first download takes longer, and its waiters get a 504 naming this bound.
DEFAULT_HOLD_MAX_AGE = 300.0


@dataclass(frozen=True)
class Held(Generic[T]):
    item: T
    arrived: float


class HoldQueue(Generic[T]):
    """The requests held for one model uid, oldest first."""

    def __init__(
        self,
        uid: str,
        *,
        max_requests: int = DEFAULT_HOLD_MAX_REQUESTS,
        max_age: float = DEFAULT_HOLD_MAX_AGE,
    ) -> None:
        if max_requests < 1:
            raise ValueError(f"max_requests must be at least 1, got {max_requests}")
        if not max_age > 0:
            raise ValueError(f"max_age must be positive, got {max_age}")
        self.uid = uid
        self.max_requests = max_requests
        self.max_age = max_age
        self._items: deque[Held[T]] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Held[T]]:
        return iter(self._items)

    def add(self, item: T, now: float) -> None:
        """Hold ``item``; ``Overloaded`` (429) when ``max_requests`` are held already."""
        if len(self._items) >= self.max_requests:
            raise Overloaded(
                f"model {self.uid!r} is starting and already holds {len(self._items)} requests, "
                f"the most it holds (hold max_requests={self.max_requests}); retry later"
            )
        self._items.append(Held(item, now))

    def next_deadline(self) -> float | None:
        """When the oldest held request runs out of time, or None when none is held."""
        return self._items[0].arrived + self.max_age if self._items else None

    def expired(self, now: float) -> list[Held[T]]:
        """Take out the requests held for ``max_age`` seconds or more, oldest first."""
        out: list[Held[T]] = []
        items = self._items
        while items and now - items[0].arrived >= self.max_age:
            out.append(items.popleft())
        return out

    def take(self, picked: Callable[[T], bool]) -> list[Held[T]]:
        """Take out the held requests ``picked`` says yes to (a cancelled one), oldest first."""
        out = [h for h in self._items if picked(h.item)]
        if out:
            self._items = deque(h for h in self._items if not picked(h.item))
        return out

    def take_all(self) -> list[Held[T]]:
        """Take out every held request, oldest first."""
        out = list(self._items)
        self._items.clear()
        return out
