"""Load-aware balancing on top of NATS queue groups.

NATS hands each request on ``<prefix>.model.<uid>.<op>`` to a random member of the uid's queue
group: it does not know that one replica is busy and another idle, so a slow or saturated
replica would keep receiving its share and queue it while a neighbour waits for work.

The rule here: a worker whose replicas of the uid are all **saturated** (every ready replica
has as many requests in flight as its capacity, the engine's batch size) does not queue a new
request; it **passes it on**, unchanged, with the client's reply subject, on
``<prefix>.model.<uid>.overflow.<op>``, which every replica of the uid also serves in a queue
group. The reply still goes straight to the client. A ``Natserve-Hops`` header counts the
passes; after :data:`MAX_HOPS` the worker that holds it queues it, saturated or not. So:

* a request that lands on a saturated replica while another has room reaches a free one with
  probability ``1 - (1 - f) ** (MAX_HOPS + 1)``, ``f`` being the share of replicas with room
  (one of two: 99.8 %; one of four: 92 %), for a few hundred microseconds per hop, which is
  nothing next to a generation;
* when every replica is saturated, a request is queued after at most ``MAX_HOPS`` passes, never
  dropped and never answered "no responders" (no replica ever leaves the queue group);
* ``nats req`` and other clients see nothing of it: the same subject, the same reply.

A worker only ever publishes on the ``overflow`` subjects, so the NATS permissions can keep
workers from publishing on the public request subjects (``deploy/nats-server.conf``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol

from nats.aio.msg import Msg

from broker_client.runtime import HOPS_HEADER, NATSConnection

__all__ = ["MAX_HOPS", "hops", "pass_on", "saturated"]

logger = logging.getLogger(__name__)

# Passes before a request is queued where it is. Each one costs a publish of the request (a few
# hundred microseconds on a LAN). Measured with a fast and a 4x slower replica
# (tests/pool/test_balancing.py): 4 hops reached about 80 % of their summed throughput, 6 and 8
# about 90 %; 8 also serves larger pools, where a free replica is rarer.
MAX_HOPS = 8


class _Loaded(Protocol):
    @property
    def accepting(self) -> bool: ...

    @property
    def load(self) -> int: ...

    @property
    def capacity(self) -> int: ...


def saturated(replicas: Iterable[_Loaded]) -> bool:
    """Whether every ready replica runs as many requests as it can (an empty set is not)."""
    ready = [r for r in replicas if r.accepting]
    return bool(ready) and all(r.load >= r.capacity for r in ready)


def hops(msg: Msg) -> int:
    try:
        return int((msg.headers or {}).get(HOPS_HEADER, 0))
    except ValueError:
        return MAX_HOPS  # a mangled count: stop passing it around


async def pass_on(nc: NATSConnection, msg: Msg, overflow_subject: str, replicas: Iterable[_Loaded]) -> bool:
    """Pass ``msg`` (received on ``nc``) on to the uid's other replicas when ours are saturated;
    True if it was."""
    count = hops(msg)
    if count >= MAX_HOPS or not msg.reply or not saturated(replicas):
        return False
    headers = dict(msg.headers or {})
    headers[HOPS_HEADER] = str(count + 1)
    await nc.publish(overflow_subject, msg.data, reply=msg.reply, headers=headers)
    logger.debug("saturated: passed a request on to %s (hop %d)", overflow_subject, count + 1)
    return True
