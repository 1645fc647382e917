"""The NATS runtime that natserve's services are built on, under public names.

Workers, the registry and the CLI import from here (and from ``broker_client`` itself for
errors, wire models, definitions, subjects and auth); nothing outside this package imports
one of its private modules.

- ``connect``: a NATS connection with natserve's reconnect and refusal rules (``_connect``).
- ``NatsTransport``: the client side, every request of a connection over one inbox
  (``_multiplexer``, ``_nats_transport``).
- ``Responder``: one incoming request, answered in its encoding, in parts or as a stream
  (``_responder``).
- ``ServiceHost``: a NATS micro service of bounded request tasks that answers the micro
  protocol itself (``_service_host``, ``_micro``); ``current_request`` and ``RequestTask``
  say which task runs a request (``_request_task``).
- ``Keepalives``: the streams whose readers acknowledge them, and ``StreamAbandoned``, raised
  by a chunk whose reader went silent (``_keepalive``).
- the wire headers natserve reads and writes (``wire``).
"""

from ._connect import NATSConnection, connect
from ._keepalive import DEFAULT_SILENCE as KEEPALIVE_SILENCE
from ._keepalive import Keepalives, StreamAbandoned
from ._micro import INFO_RESPONSE_TYPE, PING_RESPONSE_TYPE, STATS_RESPONSE_TYPE
from ._nats_transport import NatsTransport
from ._request_task import RequestTask, current_request
from ._responder import ACK_DELAY, Responder
from ._service_host import EndpointInfo, Handler, RequestObserver, RequestOutcome, ServiceHost
from .wire import (
    ACCEPTED_HEADER,
    ACK_HEADER,
    ERROR_CODE_HEADER,
    ERROR_HEADER,
    HOPS_HEADER,
    KEEPALIVE_HEADER,
    PART_HEADER,
    PARTS_HEADER,
    REQUEST_ID_HEADER,
    SEQ_HEADER,
)

__all__ = [
    "ACCEPTED_HEADER",
    "ACK_DELAY",
    "ACK_HEADER",
    "ERROR_CODE_HEADER",
    "ERROR_HEADER",
    "HOPS_HEADER",
    "INFO_RESPONSE_TYPE",
    "KEEPALIVE_HEADER",
    "KEEPALIVE_SILENCE",
    "PARTS_HEADER",
    "PART_HEADER",
    "PING_RESPONSE_TYPE",
    "REQUEST_ID_HEADER",
    "SEQ_HEADER",
    "STATS_RESPONSE_TYPE",
    "EndpointInfo",
    "Handler",
    "Keepalives",
    "NATSConnection",
    "NatsTransport",
    "RequestObserver",
    "RequestOutcome",
    "RequestTask",
    "Responder",
    "ServiceHost",
    "StreamAbandoned",
    "connect",
    "current_request",
]
