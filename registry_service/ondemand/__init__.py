"""Models that start on demand and stop when idle.

backoff.py     when a start that failed is tried again (pure)
hold.py        the requests held for a model with no replica, bounded in count and age (pure)
decisions.py   which idle replicas stop, which are evicted for a launch (pure)
service.py     the registry answering a model's subjects while it has no replica, starts on
               demand, idle stops, evictions (NATS and SQL)
"""

from .backoff import FIRST_BACKOFF, MAX_BACKOFF, StartBackoff
from .decisions import IdleReplica, choose_evictions, eviction_candidates, idle_replicas, idle_stops
from .hold import DEFAULT_HOLD_MAX_AGE, DEFAULT_HOLD_MAX_REQUESTS, Held, HoldQueue
from .service import OnDemand

__all__ = [
    "DEFAULT_HOLD_MAX_AGE",
    "DEFAULT_HOLD_MAX_REQUESTS",
    "FIRST_BACKOFF",
    "MAX_BACKOFF",
    "Held",
    "HoldQueue",
    "IdleReplica",
    "OnDemand",
    "StartBackoff",
    "choose_evictions",
    "eviction_candidates",
    "idle_replicas",
    "idle_stops",
]
