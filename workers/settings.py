"""What a worker is configured with: one frozen object, built once and passed down.

``natserve worker`` and ``natserve up`` build a :class:`WorkerSettings` from their flags and
``NATSERVE_*`` variables (``natserve.embedded.worker_settings``); a program of one's own builds it
directly. :func:`workers.app.run_worker` and :class:`workers.service.Worker` take it as it is.
What is not configuration but a live collaborator of the caller (the stop and ready events,
the warm-up's hooks) stays a keyword argument of those two.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from broker_client import DEFAULT_PREFIX, MAX_HEARTBEAT_INTERVAL, NatsAuth, check_name
from broker_client.runtime import KEEPALIVE_SILENCE

from .limits import WorkerLimits

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["CPU_DTYPES", "CPU_KV_LAYOUTS", "WorkerSettings"]

CPU_KV_LAYOUTS = ("slots", "padded")
CPU_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class WorkerSettings:
    """One worker's configuration; the defaults are the library's.

    * ``nats_url``: the NATS server, or a list of a cluster's servers; ``auth`` the NATS
      identity and TLS settings; ``prefix`` the subjects' prefix.
    * ``worker_id``: a name token (``<hostname>-<6 hex>`` by default, made per worker);
      ``device``: ``cuda:N`` or ``cpu`` for launches that name none (the best local one by
      default).
    * ``heartbeat_interval``: seconds between heartbeats; ``drain_timeout``: how long a stop
      lets in-flight requests finish.
    * ``cache_dir``: the Hugging Face cache (default: ``HF_HUB_CACHE`` at launch time, else the
      hub's default).
    * ``limits``: the operator's policy (remote code, model roots, request limits; none by
      default, see :mod:`workers.limits`).
    * ``metrics_registry``: the prometheus_client ``CollectorRegistry`` the worker's metrics go
      to (a private one by default).
    * ``warm_up``: import torch and the model-loading code on a thread once the worker answers
      (:func:`workers.builder.warm_up`), so that a launch after it (3 s or more on two cores)
      pays only for its model; a launch that comes sooner waits for it.
    * ``keepalive_silence``: seconds a stream whose reader asked for the keepalive may go
      unacknowledged (after two windows of chunks) before it stops (``broker_client._keepalive``).
    * ``memory_limit``: bytes of each device this worker offers at most (None: all of it). Its
      heartbeats report a device's total as at most this and its free memory as at most this
      less what its replicas there take, so that a worker sharing a machine leaves the rest
      to others, and the registry places (and evicts idle models) by that.
    * The CPU runner (:mod:`workers.builder`; the measurements are in docs/benchmarks.md):
      ``cpu_kv``: ``"slots"`` (static KV slots, growing with the longest row; the default) or
      ``"padded"`` (the left-padded dynamic cache); ``torch_threads``: torch's intra-op threads
      (torch's default, one per core, when None); ``cpu_dtype``: ``float32`` (default) or
      ``bfloat16`` weights for LLMs on the CPU.
    * ``batch_slots``: batch-job requests each ready replica runs at once beside the online ones
      (:mod:`workers.batches`); 0 takes no batch work. ``batch_pause_at``: online requests in
      flight per replica at which it starts no batch request (0: never pauses).
    """

    nats_url: str | list[str]
    _: KW_ONLY
    prefix: str = DEFAULT_PREFIX
    worker_id: str | None = None
    device: str | None = None
    heartbeat_interval: float = 2.0
    drain_timeout: float = 30.0
    cache_dir: str | Path | None = None
    auth: NatsAuth | None = None
    limits: WorkerLimits = field(default_factory=WorkerLimits)
    metrics_registry: CollectorRegistry | None = None
    warm_up: bool = False
    keepalive_silence: float = KEEPALIVE_SILENCE
    memory_limit: int | None = None
    cpu_kv: str = "slots"
    torch_threads: int | None = None
    cpu_dtype: str | None = None
    batch_slots: int = 2
    batch_pause_at: int = 4

    def __post_init__(self) -> None:
        if self.memory_limit is not None and self.memory_limit <= 0:
            raise ValueError(f"memory_limit must be a positive number of bytes, got {self.memory_limit}")
        if self.cpu_kv not in CPU_KV_LAYOUTS:
            raise ValueError(f"cpu_kv must be one of {list(CPU_KV_LAYOUTS)}, got {self.cpu_kv!r}")
        if self.torch_threads is not None and self.torch_threads <= 0:
            raise ValueError(f"torch_threads must be positive, got {self.torch_threads}")
        if self.cpu_dtype is not None and self.cpu_dtype not in CPU_DTYPES:
            raise ValueError(f"cpu_dtype must be one of {list(CPU_DTYPES)}, got {self.cpu_dtype!r}")
        if self.heartbeat_interval <= 0:
            raise ValueError(f"heartbeat_interval must be positive, got {self.heartbeat_interval}")
        if self.heartbeat_interval > MAX_HEARTBEAT_INTERVAL:
            # The registry takes no heartbeat announcing more (its dead window is three of them).
            raise ValueError(
                f"heartbeat_interval must be at most {MAX_HEARTBEAT_INTERVAL:g} s, "
                f"got {self.heartbeat_interval}"
            )
        if self.keepalive_silence <= 0:
            raise ValueError(f"keepalive_silence must be positive, got {self.keepalive_silence}")
        if self.batch_slots < 0:
            raise ValueError(f"batch_slots must be >= 0, got {self.batch_slots}")
        if self.batch_pause_at < 0:
            raise ValueError(f"batch_pause_at must be >= 0, got {self.batch_pause_at}")
        if self.worker_id:
            check_name(self.worker_id, "worker_id")
