"""What the registry publishes for subscribers: model events and worker notices.

* ``events.models.<uid>``: a :class:`~broker_client.ModelEvent` for launch progress and status
  changes (``placing``, ``loading``, ``ready``, ``failed``, ``terminated``). Events about one
  replica carry ``replica_index``; the model-wide ones do not, and carry ``status``.
* ``workers.events``: ``{worker_id, host, state, ts, last_seen, dead_after}`` on each change of a
  worker's state (``alive``, ``dead``, ``stopped``); clients end the requests that worker had
  accepted when it turns dead or stopped.

Both are progress reports: losing one must not fail the operation that published it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from broker_client import ModelEvent, Subjects, WorkerInfo
from broker_client.runtime import NatsTransport

__all__ = ["RegistryEvents"]

logger = logging.getLogger(__name__)

# The longest message an event carries.
_MESSAGE_CHARS = 4000


class RegistryEvents:
    """Publishes the registry's events over ``transport``, on the subjects of ``subjects``."""

    def __init__(self, transport: NatsTransport, subjects: Subjects) -> None:
        self.transport = transport
        self.subjects = subjects

    async def model(self, uid: str, stage: str, **fields: Any) -> None:
        """A :class:`~broker_client.ModelEvent` of ``stage`` about model ``uid``."""
        message = fields.get("message")
        if isinstance(message, str) and len(message) > _MESSAGE_CHARS:
            # A worker's error can be huge (a validation error lists every item): an event
            # above max_payload would be lost.
            fields["message"] = (
                f"{message[:_MESSAGE_CHARS]} ... ({len(message) - _MESSAGE_CHARS} more characters)"
            )
        event = ModelEvent(model_uid=uid, stage=stage, ts=time.time(), **fields)
        try:
            await self.transport.publish(
                self.subjects.events(uid), event.model_dump(mode="json", exclude_none=True)
            )
        except Exception as exc:
            logger.debug("cannot publish %s event for %r: %s", stage, uid, exc)

    async def worker(self, info: WorkerInfo, state: str, seen_at: float, dead_after: float) -> None:
        """The notice that the worker of ``info`` is now ``state``."""
        notice = {
            "worker_id": info.worker_id,
            "host": info.host,
            "state": state,
            "ts": time.time(),
            "last_seen": seen_at,
            "dead_after": dead_after,
        }
        try:
            await self.transport.publish(self.subjects.workers_events, notice)
        except Exception as exc:
            logger.debug("cannot publish the %s notice of worker %s: %s", state, info.worker_id, exc)
