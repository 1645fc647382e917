"""natserve's HTTP gateway: the OpenAI API and Xinference's REST routes over the NATS subjects.

A stateless process (``natserve gateway``; ``natserve up`` starts one on 127.0.0.1:9997) that
any number of can run behind a load balancer: openai-python, LangChain, curl and Xinference's
``RESTfulClient`` work against it with no change but their base URL. It talks to the pool only
through ``broker_client``'s public API.

Layers, each its own module:

- :mod:`.openai`, :mod:`.xinference`: the translation of bodies and replies (pure);
- :mod:`.service`: the operations over one ``AsyncClient`` (no HTTP);
- :mod:`.app`: the Starlette routes (thin), with :mod:`.sse` (event streams), :mod:`.auth`
  (API keys), :mod:`.request_ids`, :mod:`.errors` (natserve errors as OpenAI error objects),
  :mod:`.metrics` (Prometheus) and :mod:`.pool_page` (the HTML page at ``/``);
- :mod:`.server`: the listening socket and uvicorn, run as one of natserve's services.
"""

from .app import DEFAULT_MAX_BODY_BYTES, GatewayApp, create_app
from .auth import ApiKeys, load_api_keys
from .errors import InvalidField, Unauthorized, error_body, error_reply
from .metrics import GatewayMetrics
from .pool_page import pool_view, render_pool_page
from .server import DEFAULT_HTTP_PORT, HttpListener, bind_listener, is_loopback, run_gateway
from .service import GatewayService

__all__ = [
    "DEFAULT_HTTP_PORT",
    "DEFAULT_MAX_BODY_BYTES",
    "ApiKeys",
    "GatewayApp",
    "GatewayMetrics",
    "GatewayService",
    "HttpListener",
    "InvalidField",
    "Unauthorized",
    "bind_listener",
    "create_app",
    "error_body",
    "error_reply",
    "is_loopback",
    "load_api_keys",
    "pool_view",
    "render_pool_page",
    "run_gateway",
]
