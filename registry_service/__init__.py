"""The natserve registry: model registrations, launches and placement, live workers.

SQL (``db``, ``models``, ``repository``); the worker directory, the launcher with its plans
and placement, liveness, views and events; the endpoints; and ``service``, which puts them
together over one NATS connection (``app`` runs it with its own connection and engine).
"""

from .app import Registry, run_registry
from .batches import BatchJobs, BatchLimits
from .db import check, downgrade, make_engine, migrations_config, upgrade
from .directory import MIN_DEAD_AFTER, WorkerDirectory, WorkerEntry
from .launcher import DEFAULT_LAUNCH_TIMEOUT, Launcher
from .liveness import Liveness
from .models import Base, ModelRow, Registration, ReplicaRow, WorkerRow
from .placement import MemoryReservations, Placement, place_replicas
from .plan import LaunchPlan
from .repository import NewReplica, RegistryRepository
from .service import SERVICE_NAME, RegistryService, other_registries

__all__ = [
    "DEFAULT_LAUNCH_TIMEOUT",
    "MIN_DEAD_AFTER",
    "SERVICE_NAME",
    "Base",
    "BatchJobs",
    "BatchLimits",
    "LaunchPlan",
    "Launcher",
    "Liveness",
    "MemoryReservations",
    "ModelRow",
    "NewReplica",
    "Placement",
    "Registration",
    "Registry",
    "RegistryRepository",
    "RegistryService",
    "ReplicaRow",
    "WorkerDirectory",
    "WorkerEntry",
    "WorkerRow",
    "check",
    "downgrade",
    "make_engine",
    "migrations_config",
    "other_registries",
    "place_replicas",
    "run_registry",
    "upgrade",
]
