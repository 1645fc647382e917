"""The natserve worker: a NATS service that loads models and answers inference requests."""

from .app import run_worker, stop_on_signals
from .devices import best_device, list_devices
from .replica import EmbeddingReplica, LLMReplica, Replica, ServedModel
from .service import SERVICE_NAME, Worker, default_worker_id
from .settings import WorkerSettings

__all__ = [
    "SERVICE_NAME",
    "EmbeddingReplica",
    "LLMReplica",
    "Replica",
    "ServedModel",
    "Worker",
    "WorkerSettings",
    "best_device",
    "default_worker_id",
    "list_devices",
    "run_worker",
    "stop_on_signals",
]
