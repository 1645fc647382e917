"""Subject names: the one place that spells them.

Every subject starts with a configurable prefix (``natserve`` by default) so that
several pools can share one NATS account without seeing each other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ._errors import BadRequest

__all__ = ["DEFAULT_PREFIX", "NAME_PATTERN", "Subjects", "check_name"]

DEFAULT_PREFIX = "natserve"
# Names become subject tokens, so no dots, spaces, wildcards or leading punctuation.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$"
_NAME_RE = re.compile(NAME_PATTERN)

MODEL_OPERATIONS = ("generate", "chat", "embed", "cancel")


def check_name(value: object, field: str) -> str:
    """Return ``value`` if it is a valid model name or uid, else raise BadRequest naming the field."""
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise BadRequest(
            f"{field} {value!r} is invalid: it must start with a letter or digit and hold only "
            "letters, digits, '_' and '-' (at most 128 characters)"
        )
    return value


@dataclass(frozen=True)
class Subjects:
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not re.match(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$", self.prefix):
            raise ValueError(f"subject prefix {self.prefix!r} is not a valid NATS subject prefix")

    # registry ---------------------------------------------------------------
    @property
    def registry_register(self) -> str:
        return f"{self.prefix}.registry.register"

    @property
    def registry_unregister(self) -> str:
        return f"{self.prefix}.registry.unregister"

    @property
    def registry_list(self) -> str:
        return f"{self.prefix}.registry.list"

    @property
    def registry_get(self) -> str:
        return f"{self.prefix}.registry.get"

    @property
    def models_launch(self) -> str:
        return f"{self.prefix}.models.launch"

    @property
    def models_list(self) -> str:
        return f"{self.prefix}.models.list"

    @property
    def models_describe(self) -> str:
        return f"{self.prefix}.models.describe"

    @property
    def models_terminate(self) -> str:
        return f"{self.prefix}.models.terminate"

    @property
    def workers_list(self) -> str:
        return f"{self.prefix}.workers.list"

    # batch jobs (the JetStream names: _batches.BatchNames) ------------------
    @property
    def batches_create(self) -> str:
        return f"{self.prefix}.batches.create"

    @property
    def batches_get(self) -> str:
        return f"{self.prefix}.batches.get"

    @property
    def batches_list(self) -> str:
        return f"{self.prefix}.batches.list"

    @property
    def batches_cancel(self) -> str:
        return f"{self.prefix}.batches.cancel"

    # workers ----------------------------------------------------------------
    def worker_heartbeat(self, worker_id: str) -> str:
        """Where worker ``worker_id`` publishes its WorkerInfo on every beat: a subject per worker,
        so that NATS permissions can tie a worker's credentials to its id
        (``deploy/nats-server.conf``); the registry takes a beat only when the body's
        ``worker_id`` is the subject's."""
        return f"{self.prefix}.workers.{worker_id}.heartbeat"

    @property
    def workers_heartbeats(self) -> str:
        """Every worker's heartbeat subject: what the registry subscribes to."""
        return f"{self.prefix}.workers.*.heartbeat"

    def heartbeat_worker(self, subject: str) -> str | None:
        """The worker id a heartbeat subject names, or None for another subject."""
        head, tail = f"{self.prefix}.workers.", ".heartbeat"
        if subject.startswith(head) and subject.endswith(tail):
            worker_id = subject[len(head) : -len(tail)]
            if worker_id and "." not in worker_id:
                return worker_id
        return None

    @property
    def workers_events(self) -> str:
        """The registry publishes ``{worker_id, host, state, ts}`` here when a worker turns
        ``alive``, ``dead`` (no heartbeat for the dead window) or ``stopped`` (it said so)."""
        return f"{self.prefix}.workers.events"

    @property
    def workers_resync(self) -> str:
        """The registry asks every worker for an immediate heartbeat (after it starts)."""
        return f"{self.prefix}.workers.resync"

    def worker(self, worker_id: str, verb: str) -> str:
        """Commands for one worker: ``launch``, ``terminate``, ``info``."""
        return f"{self.prefix}.worker.{worker_id}.{verb}"

    # models -----------------------------------------------------------------
    def model(self, model_uid: str, operation: str) -> str:
        """``generate``, ``chat``, ``embed`` (queue group of the replicas) and ``cancel`` (all replicas)."""
        if operation not in MODEL_OPERATIONS:
            raise ValueError(f"unknown model operation {operation!r}")
        return f"{self.prefix}.model.{model_uid}.{operation}"

    def model_overflow(self, model_uid: str, operation: str) -> str:
        """Where a saturated replica passes a request on to the uid's other replicas
        (``workers/balancing.py``): a subject of its own, so that workers never need the right
        to publish on the public request subjects."""
        if operation not in MODEL_OPERATIONS or operation == "cancel":
            raise ValueError(f"unknown model operation {operation!r}")
        return f"{self.prefix}.model.{model_uid}.overflow.{operation}"

    def model_keepalive(self, model_uid: str, worker_id: str) -> str:
        """Where the readers of a worker's streams of ``model_uid`` acknowledge them
        (``Natserve-Keepalive`` names it on a stream's first chunk)."""
        return f"{self.prefix}.model.{model_uid}.keepalive.{worker_id}"

    def model_queue_group(self, model_uid: str) -> str:
        return f"{self.prefix}.model.{model_uid}"

    def events(self, model_uid: str) -> str:
        return f"{self.prefix}.events.models.{model_uid}"
