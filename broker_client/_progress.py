"""Launch progress: the model events of one launch, to a callback or a progress bar.

``launch_model`` subscribes to every model's events before it asks (so the first ones cannot be
missed) and a :class:`LaunchFollower` picks those of its launch: by uid when the caller gave one,
else by the model name until an event names the uid the registry chose. ``make_progress`` turns
the ``progress=`` argument into the watcher: the caller's callable, a rich bar on a terminal, or
nothing.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from ._messages import ModelEvent

__all__ = ["LaunchFollower", "ProgressCallback", "RichProgress", "make_progress"]

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[ModelEvent], None]


def make_progress(progress: bool | ProgressCallback | None) -> ProgressCallback | None:
    """The watcher for ``progress``: None shows a bar when stderr is a terminal, True always,
    False never; a callable is the watcher itself."""
    if callable(progress):
        return progress
    if progress is None:
        isatty = getattr(sys.stderr, "isatty", None)
        progress = bool(isatty and isatty())
    return RichProgress() if progress else None


class LaunchFollower:
    """An event handler that passes the events of one launch to ``watcher``."""

    def __init__(self, watcher: ProgressCallback, model_name: str, model_uid: str | None) -> None:
        self.watcher = watcher
        self.model_name = model_name
        self.model_uid = model_uid
        # Without a uid given, the registry picks one: follow the name until an event names it.
        self.followed = {model_uid} if model_uid is not None else set()

    async def __call__(self, subject: str, body: Any) -> None:
        try:
            event = ModelEvent.model_validate(body)
        except ValidationError as exc:
            logger.debug("ignoring malformed model event on %s: %r", subject, exc)
            return
        if event.model_uid not in self.followed:
            if self.model_uid is not None or event.model_name != self.model_name:
                return
            self.followed.add(event.model_uid)
        try:
            self.watcher(event)
        except Exception:
            logger.exception("progress callback failed")

    def close(self) -> None:
        close = getattr(self.watcher, "close", None)
        if close is not None:
            close()


class RichProgress:
    """A rich progress bar on stderr, one line per replica, fed by ModelEvents."""

    def __init__(self) -> None:
        self._progress: Any = None
        self._tasks: dict[int, Any] = {}

    def __call__(self, event: ModelEvent) -> None:
        if self._progress is None:
            # rich is imported only when a bar is shown.
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                Progress,
                SpinnerColumn,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )
            self._progress.start()
        replica = event.replica_index or 0
        label = f"{event.model_uid}" + (f" #{replica}" if event.replica_index is not None else "")
        description = f"{label} {event.stage}" + (f": {event.message}" if event.message else "")
        task = self._tasks.get(replica)
        if task is None:
            task = self._tasks[replica] = self._progress.add_task(description, total=None)
        if event.stage == "ready":
            self._progress.update(task, description=description, total=1.0, completed=1.0)
        elif event.fraction is not None:
            self._progress.update(task, description=description, total=1.0, completed=event.fraction)
        else:
            self._progress.update(task, description=description)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
