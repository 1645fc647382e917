"""The NATS runtime that natserve's services are built on, under public names.

Workers, the registry and the CLI import from here (and from ``broker_client`` itself for
errors, wire models, definitions, subjects and auth); nothing outside this package imports
one of its private modules.

- ``connect``: a NATS connection with natserve's reconnect and refusal rules.
- ``Transport``: the client side, every request of a connection over one inbox.
- ``Responder``: one incoming request, answered in its encoding, in parts or as a stream.
- ``ServiceHost``: a NATS micro service of bounded request tasks.
- the wire headers natserve reads and writes.
"""

from ._transport import (
    ACCEPTED_HEADER,
    ACK_DELAY,
    ACK_HEADER,
    ERROR_CODE_HEADER,
    ERROR_HEADER,
    HOPS_HEADER,
    PART_HEADER,
    PARTS_HEADER,
    REQUEST_ID_HEADER,
    SEQ_HEADER,
    EndpointInfo,
    NATSConnection,
    RequestOutcome,
    RequestTask,
    Responder,
    ServiceHost,
    Transport,
    connect,
    current_request,
)

__all__ = [
    "ACCEPTED_HEADER",
    "ACK_DELAY",
    "ACK_HEADER",
    "ERROR_CODE_HEADER",
    "ERROR_HEADER",
    "HOPS_HEADER",
    "PARTS_HEADER",
    "PART_HEADER",
    "REQUEST_ID_HEADER",
    "SEQ_HEADER",
    "EndpointInfo",
    "NATSConnection",
    "RequestOutcome",
    "RequestTask",
    "Responder",
    "ServiceHost",
    "Transport",
    "connect",
    "current_request",
]
