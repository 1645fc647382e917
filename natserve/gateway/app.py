"""The gateway's HTTP layer: a Starlette app over a :class:`~natserve.gateway.service.GatewayService`.

Routes (OpenAI's and the part of Xinference's REST API its client uses for the custom-model
workflow; where both name one route, one answer serves both)::

    GET    /                                        the pool page (HTML)
    GET    /v1/models                               OpenAI's model list, with natserve's descriptions
    POST   /v1/models                               Xinference: launch, {"model_uid"}
    GET    /v1/models/{model_uid}                   OpenAI's model object on the description
    DELETE /v1/models/{model_uid}                   terminate
    POST   /v1/completions | /v1/chat/completions   generate / chat; SSE with "stream": true
    POST   /v1/embeddings                           embeddings, float or base64
    POST   /v1/model_registrations/{model_type}     Xinference: register
    GET    /v1/model_registrations/{model_type}     Xinference: list registrations
    GET    /v1/model_registrations/{model_type}/{model_name}     the definition
    DELETE /v1/model_registrations/{model_type}/{model_name}     unregister
    GET    /v1/cluster/auth                         Xinference: {"auth": whether keys are on}
    GET    /healthz                                 {"status": "ok"} for load balancers

The three inference routes are the hot path: they are plain ASGI endpoints inside Starlette's
routing, with no Request and Response objects, one pass over the headers and the body decoded
by orjson (``bench/asgi_stack.py``: a Starlette ``Route`` with ``Request`` and ``Response``
served 0.7-0.8 of what the same endpoint without them did, FastAPI 0.4-0.5). The others
are ordinary Starlette endpoints. Every answer carries ``X-Request-Id``; every error is an
OpenAI error object (:mod:`natserve.gateway.errors`), 404 and 405 of unknown routes included.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from broker_client import NatserveError, PayloadTooLarge

from .auth import ApiKeys
from .batches import batch_routes
from .errors import InvalidField, error_body, error_reply
from .metrics import GatewayMetrics, RouteSeries
from .pool_page import refresh_seconds, render_pool_page
from .request_ids import new_request_id, request_id
from .service import GatewayService, Reply
from .sse import send_events

__all__ = ["DEFAULT_MAX_BODY_BYTES", "GatewayApp", "create_app"]

# Above NATS's usual max_payload (1 MiB by default, 8 MiB the recommended most): a body the
# gateway takes can still be too large for the server, and then the natserve client says so.
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
_JSON = (b"content-type", b"application/json")
_PAGE_CHALLENGE = {"www-authenticate": 'Basic realm="natserve"'}
_API_CHALLENGE = {"www-authenticate": 'Bearer realm="natserve"'}


class _Gate:
    """What every route checks before its work: the API key and the size of the body."""

    __slots__ = ("api_keys", "max_body_bytes")

    def __init__(self, api_keys: ApiKeys, max_body_bytes: int) -> None:
        self.api_keys = api_keys
        self.max_body_bytes = max_body_bytes


def _scan(headers: list[tuple[bytes, bytes]]) -> tuple[bytes | None, bytes | None, bytes | None]:
    """One pass: the Authorization, X-Request-Id and Content-Length headers (ASGI lower-cases names)."""
    authorization = rid = length = None
    for name, value in headers:
        if name == b"authorization":
            authorization = value
        elif name == b"x-request-id":
            rid = value
        elif name == b"content-length":
            length = value
    return authorization, rid, length


def _check_length(length: bytes, limit: int) -> None:
    """Refuse a body whose Content-Length is above ``limit`` before reading any of it."""
    try:
        declared = int(length)
    except ValueError:
        raise InvalidField(
            f"Content-Length {length[:40]!r} is not a number", param="Content-Length"
        ) from None
    if declared > limit:
        raise PayloadTooLarge(
            f"the request body of {declared} bytes is above the gateway's limit of {limit} bytes "
            "(NATSERVE_HTTP_MAX_BODY_BYTES)"
        )


async def _rest_of_body(receive: Receive, first: bytes, more: bool, limit: int) -> bytes:
    """The body whose first message was ``first`` (``more``: more follow), refused past
    ``limit`` bytes: a chunked body has no Content-Length to refuse it by, and its first
    message alone (one socket read) may already be past the limit."""
    parts, size = [first], len(first)
    while True:
        if size > limit:
            raise PayloadTooLarge(
                f"the request body is above the gateway's limit of {limit} bytes "
                "(NATSERVE_HTTP_MAX_BODY_BYTES)"
            )
        if not more:
            return b"".join(parts)
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        parts.append(chunk)
        more = message.get("more_body", False)


def _decode(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        what = "empty" if not data else "not valid JSON"
        raise InvalidField(f"the request body is {what}: {exc}", param=None, code="invalid_json") from None


async def _json_body(receive: Receive, length: bytes | None, limit: int) -> Any:
    """The request's JSON body, refused (a 400 naming the limit) past ``limit`` bytes, before
    it is all read when the Content-Length says so."""
    if length is not None:
        _check_length(length, limit)
    message = await receive()
    data, more = message.get("body", b""), message.get("more_body", False)
    if more or len(data) > limit:
        data = await _rest_of_body(receive, data, more, limit)
    return _decode(data)


async def _send_json(
    send: Send, status: int, payload: Any, rid: str, extra: dict[str, str] | None = None
) -> None:
    data = orjson.dumps(payload)
    headers = [_JSON, (b"content-length", b"%d" % len(data)), (b"x-request-id", rid.encode())]
    if extra:
        headers += [(k.encode(), v.encode()) for k, v in extra.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class _Inference:
    """``POST`` of one inference operation, as a plain ASGI endpoint: the hot path."""

    __slots__ = ("gate", "operation", "series")

    def __init__(self, operation: Callable[[Any, str], Awaitable[Reply]], gate: _Gate, series: RouteSeries):
        self.operation = operation
        self.gate = gate
        self.series = series

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        series = self.series
        gate = self.gate
        authorization, rid_header, length = _scan(scope["headers"])
        rid = None
        try:
            rid = request_id(rid_header)
            gate.api_keys.check(authorization)
            # The body, read here rather than in a helper: one coroutine less per request.
            if length is not None:
                _check_length(length, gate.max_body_bytes)
            message = await receive()
            data, more = message.get("body", b""), message.get("more_body", False)
            if more or len(data) > gate.max_body_bytes:
                data = await _rest_of_body(receive, data, more, gate.max_body_bytes)
            body = _decode(data)
            reply = await self.operation(body, rid)
        except Exception as exc:
            status, payload = error_reply(exc)
            await _send_json(
                send, status, payload, rid or new_request_id(), _API_CHALLENGE if status == 401 else None
            )
            series.done(status, time.perf_counter() - started)
            return
        if isinstance(reply, dict):
            data = orjson.dumps(reply)
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        _JSON,
                        (b"content-length", b"%d" % len(data)),
                        (b"x-request-id", rid.encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": data})
            series.done(200, time.perf_counter() - started)
            return
        # The handle returned once the first chunk was in: the stream has started.
        series.first_event.observe(time.perf_counter() - started)
        series.streams += 1
        try:
            outcome = await send_events(send, receive, reply, [(b"x-request-id", rid.encode())])
        finally:
            series.streams -= 1
        series.done(outcome.code, time.perf_counter() - started)


Handler = Callable[[Request, str], Awaitable[Any]]


def _endpoint(
    handler: Handler, gate: _Gate, series: RouteSeries, *, page: bool = False, keyless: bool = False
) -> Callable[[Request], Awaitable[Response]]:
    """A Starlette endpoint around ``handler(request, request_id)``: key, id, errors, metrics.

    ``handler`` returns what to send as JSON (None is ``null``) or a ready Response; ``page``: a
    401 asks a browser for Basic credentials; ``keyless``: no key needed (health, auth probe).
    """

    async def endpoint(request: Request) -> Response:
        started = time.perf_counter()
        authorization, rid_header, _ = _scan(request.scope["headers"])
        rid = None
        try:
            rid = request_id(rid_header)
            if not keyless:
                gate.api_keys.check(authorization)
            result = await handler(request, rid)
            response = (
                result
                if isinstance(result, Response)
                else Response(orjson.dumps(result), media_type="application/json")
            )
        except Exception as exc:
            status, payload = error_reply(exc)
            challenge = (_PAGE_CHALLENGE if page else _API_CHALLENGE) if status == 401 else None
            response = Response(
                orjson.dumps(payload), status_code=status, media_type="application/json", headers=challenge
            )
        response.headers["x-request-id"] = rid or new_request_id()
        series.done(response.status_code, time.perf_counter() - started)
        return response

    return endpoint


def create_app(
    service: GatewayService,
    *,
    api_keys: ApiKeys | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    metrics: GatewayMetrics | None = None,
) -> GatewayApp:
    """The gateway's ASGI app; ``metrics`` counts its requests (a private one when not given)."""
    gate = _Gate(api_keys or ApiKeys(), max_body_bytes)
    metrics = metrics or GatewayMetrics()

    async def body_of(request: Request) -> Any:
        _, _, length = _scan(request.scope["headers"])
        return await _json_body(request.receive, length, gate.max_body_bytes)

    async def pool_page(request: Request, rid: str) -> Response:
        refresh = refresh_seconds(request.query_params.get("refresh"))
        try:
            status = await service.pool_status()
        except NatserveError as exc:
            return HTMLResponse(render_pool_page(None, refresh=refresh, problem=exc.message), status_code=503)
        return HTMLResponse(render_pool_page(status, refresh=refresh))

    async def list_models(request: Request, rid: str) -> Any:
        return await service.list_models()

    async def launch(request: Request, rid: str) -> Any:
        wait = request.query_params.get("wait_ready", "true").lower() not in ("false", "0", "no")
        return await service.launch(await body_of(request), wait=wait)

    async def describe(request: Request, rid: str) -> Any:
        return await service.describe_model(request.path_params["model_uid"])

    async def terminate(request: Request, rid: str) -> Any:
        return await service.terminate(request.path_params["model_uid"])

    async def register(request: Request, rid: str) -> Any:
        return await service.register(request.path_params["model_type"], await body_of(request))

    async def registrations(request: Request, rid: str) -> Any:
        return await service.list_registrations(request.path_params["model_type"])

    async def registration(request: Request, rid: str) -> Any:
        p = request.path_params
        return await service.get_registration(p["model_type"], p["model_name"])

    async def unregister(request: Request, rid: str) -> Any:
        p = request.path_params
        return await service.unregister(p["model_type"], p["model_name"])

    async def cluster_auth(request: Request, rid: str) -> Any:
        return {"auth": gate.api_keys.enabled}

    async def healthz(request: Request, rid: str) -> Any:
        return {"status": "ok"}

    def route(path: str, name: str, handler: Handler, method: str, **options: bool) -> Route:
        return Route(path, _endpoint(handler, gate, metrics.route(name), **options), methods=[method])

    def inference(path: str, name: str, operation: Callable[[Any, str], Awaitable[Reply]]) -> Route:
        return Route(path, _Inference(operation, gate, metrics.route(name)), methods=["POST"])

    routes = [
        route("/", "pool_page", pool_page, "GET", page=True),
        inference("/v1/completions", "completions", service.complete),
        inference("/v1/chat/completions", "chat_completions", service.chat),
        inference("/v1/embeddings", "embeddings", service.embed),
        route("/v1/models", "list_models", list_models, "GET"),
        route("/v1/models", "launch", launch, "POST"),
        route("/v1/models/{model_uid}", "describe_model", describe, "GET"),
        route("/v1/models/{model_uid}", "terminate", terminate, "DELETE"),
        route("/v1/model_registrations/{model_type}", "register", register, "POST"),
        route("/v1/model_registrations/{model_type}", "registrations", registrations, "GET"),
        route("/v1/model_registrations/{model_type}/{model_name}", "registration", registration, "GET"),
        route("/v1/model_registrations/{model_type}/{model_name}", "unregister", unregister, "DELETE"),
        route("/v1/cluster/auth", "cluster_auth", cluster_auth, "GET", keyless=True),
        route("/healthz", "healthz", healthz, "GET", keyless=True),
        *batch_routes(service.batches, route, body_of, gate.max_body_bytes),
    ]

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        status = exc.status_code
        message = (
            f"no route {request.method} {request.url.path}"
            if status == 404
            else f"{request.method} is not allowed on {request.url.path}"
            if status == 405
            else str(exc.detail)
        )
        headers = dict(exc.headers or {})
        headers["x-request-id"] = new_request_id()
        return Response(
            orjson.dumps(error_body(status, message)),
            status_code=status,
            media_type="application/json",
            headers=headers,
        )

    async def server_error(request: Request, exc: Exception) -> Response:
        status, payload = error_reply(exc)
        return Response(orjson.dumps(payload), status_code=status, media_type="application/json")

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.service = service
    app.state.metrics = metrics
    hot = {route.path: route.endpoint for route in routes if isinstance(route.endpoint, _Inference)}
    return GatewayApp(app, hot)


class GatewayApp:
    """The gateway's ASGI app: a ``POST`` to an inference route goes straight to its endpoint,
    everything else to the Starlette app (``.app``).

    Starlette's middleware stack and router cost a request about as much as the rest of the
    gateway's own work (``bench/gateway.py``); its routes still answer every other method on
    these paths (a 405) and everything else. ``hot`` (path to endpoint) is also what the
    gateway's uvicorn protocol serves on its lean cycle (:mod:`natserve.gateway.protocol`);
    this dispatch serves those paths under any other ASGI server, and the requests the lean
    cycle leaves to uvicorn (a pipelined one).
    """

    __slots__ = ("app", "hot")

    def __init__(self, app: Starlette, hot: dict[str, Any]) -> None:
        self.app = app
        self.hot = hot

    @property
    def state(self) -> Any:
        return self.app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self.hot.get(scope["path"])
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
        await self.app(scope, receive, send)  # type: ignore[arg-type]
