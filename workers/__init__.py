"""The natserve worker: a NATS service that loads models and answers inference requests.

* :mod:`.service`: the :class:`Worker` (lifecycle, heartbeats, launches and terminates);
  :mod:`.settings`: the :class:`WorkerSettings` it is configured with; :mod:`.app`: running one
  as a process (:func:`run_worker`);
* :mod:`.endpoints`: the only code that reads requests and writes replies;
* :mod:`.served`: the replicas of one model uid; :mod:`.replicas`: one loaded replica each,
  answering with typed replies (:mod:`.replies`); :mod:`.balancing`: passing requests on;
* :mod:`.builder`: which engine a launch gets, and the replica built around it;
  :mod:`.loading`: finding and loading models; :mod:`.engines`: the engines;
* :mod:`.limits`, :mod:`.chat`, :mod:`.devices`, :mod:`.metrics`: policy, chat prompts, devices
  and their memory, metrics.
"""

from .app import run_worker, stop_on_signals
from .devices import best_device, list_devices
from .replicas import EmbeddingReplica, LLMReplica, Replica
from .served import ServedModel
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
