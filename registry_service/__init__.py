"""The natserve registry: model registrations, launches and placement, live workers."""

from .app import Registry, run_registry
from .db import check, downgrade, make_engine, migrations_config, upgrade
from .models import Base, ModelRow, Registration, ReplicaRow, WorkerRow
from .placement import Placement, place_replicas
from .repository import NewReplica, RegistryRepository
from .service import SERVICE_NAME, RegistryService

__all__ = [
    "SERVICE_NAME",
    "Base",
    "ModelRow",
    "NewReplica",
    "Placement",
    "Registration",
    "Registry",
    "RegistryRepository",
    "RegistryService",
    "ReplicaRow",
    "WorkerRow",
    "check",
    "downgrade",
    "make_engine",
    "migrations_config",
    "place_replicas",
    "run_registry",
    "upgrade",
]
