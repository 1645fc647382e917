"""The launch plan: what a model launch asks of workers, one replica at a time.

A :class:`LaunchPlan` is built either from a launch request and its registration
(:meth:`LaunchPlan.from_request`) or from the model's stored row (:meth:`LaunchPlan.from_row`,
when liveness re-places a lost replica). Both give the same plan, so a re-placed replica is
created exactly as its launch created it: :meth:`LaunchPlan.row` is what the launch stores, and
every field of the :class:`~broker_client.WorkerLaunch` command (:meth:`LaunchPlan.command`)
comes from the plan but the replica index and the device, which are the placement's. A plan is
pure data: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broker_client import BadRequest, LaunchRequest, WorkerLaunch, parse_definition

from .memory import estimate_bytes
from .models import ModelRow, Registration
from .placement import Placement

__all__ = ["DEFAULT_IDLE_TIMEOUT", "LaunchPlan", "on_demand_options"]

# The idle timeout of a model given only min_replicas: five minutes, the order of what the
# serverless platforms default to (Knative's scale-to-zero grace and retention are 30 s to
# minutes); long enough that a conversation's pauses do not reload the model.
DEFAULT_IDLE_TIMEOUT = 300.0


def on_demand_options(
    req: LaunchRequest, definition: dict[str, Any], replica: int
) -> tuple[int | None, float | None]:
    """``(min_replicas, idle_timeout)`` of a launch: the request's, else the definition's
    ``launch`` key. Either one makes the model scale (the other then defaults: 0 replicas, or
    :data:`DEFAULT_IDLE_TIMEOUT`); neither: ``(None, None)``, a model that never scales.
    ``BadRequest`` when min_replicas is above ``replica``."""
    defaults = definition.get("launch") or {}
    min_replicas = req.min_replicas if req.min_replicas is not None else defaults.get("min_replicas")
    idle_timeout = req.idle_timeout if req.idle_timeout is not None else defaults.get("idle_timeout")
    if min_replicas is None and idle_timeout is None:
        return None, None
    min_replicas = 0 if min_replicas is None else int(min_replicas)
    idle_timeout = DEFAULT_IDLE_TIMEOUT if idle_timeout is None else float(idle_timeout)
    if min_replicas > replica:
        where = "" if req.min_replicas is not None else " (the definition's launch.min_replicas)"
        raise BadRequest(
            f"min_replicas {min_replicas}{where} is more than replica {replica}: a model keeps at "
            "most its replica count"
        )
    return min_replicas, idle_timeout


def _size(spec: dict[str, Any]) -> str:
    size = spec.get("model_size_in_billions")
    return f"{size:g}B parameters" if isinstance(size, int | float) else "size unknown"


@dataclass(frozen=True)
class LaunchPlan:
    """One model uid to launch: its definition, the chosen spec and the launch options."""

    model_uid: str
    model_type: str
    model_name: str
    definition: dict[str, Any]
    spec: dict[str, Any]
    quantization: str
    replica: int
    request_limits: int | None
    max_batch_size: int | None
    max_tokens_limit: int | None
    rate_limit: float | None
    # Seconds a worker may take to load one replica.
    timeout: float
    # On demand: the replicas kept while idle and the idle timeout (None: never scales).
    min_replicas: int | None = None
    idle_timeout: float | None = None
    # The placement the launch asked for: a pinned worker (None: any) and the GPUs per replica
    # ("auto", or a count; 0 also stands for the request's None, which places alike: no GPU).
    launch_worker_id: str | None = None
    launch_n_gpu: int | str = "auto"

    @classmethod
    def from_request(
        cls,
        req: LaunchRequest,
        registration: Registration,
        *,
        timeout: float,
        prefer_format: str | None = None,
    ) -> LaunchPlan:
        """The plan for ``req``; ``timeout`` applies when the request gives none. Raises
        ``BadRequest`` when the definition has no spec matching the request. ``prefer_format``:
        when the request names no format, a matching spec of that format wins if there is one."""
        definition = parse_definition(registration.model_type, registration.definition)
        model_format: str | None = req.model_format
        if model_format is None and prefer_format is not None:
            if any(s.model_format == prefer_format for s in definition.model_specs or ()):
                try:
                    definition.spec_for(prefer_format, req.model_size_in_billions, req.quantization)
                    model_format = prefer_format
                except BadRequest:
                    pass
        spec, quantization = definition.spec_for(model_format, req.model_size_in_billions, req.quantization)
        min_replicas, idle_timeout = on_demand_options(req, registration.definition, req.replica)
        return cls(
            model_uid=req.model_uid or req.model_name,
            model_type=registration.model_type,
            model_name=registration.model_name,
            definition=registration.definition,
            spec=spec.model_dump(mode="json", exclude_none=True),
            quantization=quantization,
            replica=req.replica,
            request_limits=req.request_limits,
            max_batch_size=req.max_batch_size,
            max_tokens_limit=req.max_tokens_limit,
            rate_limit=req.rate_limit,
            timeout=req.timeout or timeout,
            min_replicas=min_replicas,
            idle_timeout=idle_timeout,
            launch_worker_id=req.worker_id,
            launch_n_gpu=0 if req.n_gpu is None else req.n_gpu,
        )

    @classmethod
    def from_row(cls, row: ModelRow, *, timeout: float) -> LaunchPlan:
        """The plan a launch stored as ``row`` (see :meth:`row`)."""
        return cls(
            model_uid=row.model_uid,
            model_type=row.model_type,
            model_name=row.model_name,
            definition=row.definition,
            spec=row.spec,
            quantization=row.quantization,
            replica=row.replica,
            request_limits=row.request_limits,
            max_batch_size=row.max_batch_size,
            max_tokens_limit=row.max_tokens_limit,
            rate_limit=row.rate_limit,
            timeout=timeout,
            min_replicas=row.min_replicas,
            idle_timeout=row.idle_timeout,
            launch_worker_id=row.launch_worker_id,
            launch_n_gpu="auto" if row.launch_n_gpu is None else row.launch_n_gpu,
        )

    def row(self, status: str = "launching") -> ModelRow:
        """The model's row, without its replicas: everything :meth:`from_row` reads back."""
        return ModelRow(
            model_uid=self.model_uid,
            model_name=self.model_name,
            model_type=self.model_type,
            definition=self.definition,
            spec=self.spec,
            quantization=self.quantization,
            replica=self.replica,
            request_limits=self.request_limits,
            max_batch_size=self.max_batch_size,
            max_tokens_limit=self.max_tokens_limit,
            rate_limit=self.rate_limit,
            min_replicas=self.min_replicas,
            idle_timeout=self.idle_timeout,
            launch_worker_id=self.launch_worker_id,
            launch_n_gpu=self.launch_n_gpu if isinstance(self.launch_n_gpu, int) else None,
            status=status,
        )

    @property
    def scales(self) -> bool:
        """Whether idle replicas stop (down to ``min_replicas``) and the model starts on demand."""
        return self.idle_timeout is not None

    @property
    def starts_on_demand(self) -> bool:
        """Whether the model may have no replica: its launch loads none, a request starts it."""
        return self.scales and self.min_replicas == 0

    @property
    def label(self) -> str:
        """The model as placement errors name it: ``'uid' (2B parameters, 4-bit)``."""
        return f"{self.model_uid!r} ({_size(self.spec)}, {self.quantization})"

    def need(self, kind: str) -> int:
        """The estimated bytes of one replica on a ``cuda`` or ``cpu`` device."""
        return estimate_bytes(
            self.spec,
            quantization=self.quantization,
            device_kind=kind,
            model_type=self.model_type,
            context_length=self.definition.get("context_length"),
            max_batch_size=self.max_batch_size,
        )

    def command(self, placement: Placement) -> WorkerLaunch:
        """The command that asks ``placement``'s worker to load its replica."""
        return WorkerLaunch(
            model_uid=self.model_uid,
            replica_index=placement.replica_index,
            model_type=self.model_type,  # type: ignore[arg-type]
            model_name=self.model_name,
            definition=self.definition,
            spec=self.spec,
            quantization=self.quantization,  # type: ignore[arg-type]
            device=placement.device,
            request_limits=self.request_limits,
            max_batch_size=self.max_batch_size,
            max_tokens_limit=self.max_tokens_limit,
            rate_limit=self.rate_limit,
        )
