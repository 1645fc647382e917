"""``natserve status``: the pool at a glance, once or refreshed with ``--watch``.

Everything comes from the registry in two requests: ``workers.list`` (the workers' last
heartbeats: devices, replicas with their running and waiting requests and counters, each
worker's ``recent_errors``, and the registry's own ``recent_failures`` of launches) and
``models.list``. :func:`collect_status` gathers them into one dict (what ``--json`` prints),
:func:`render_status` turns that into rich tables.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

__all__ = [
    "RECENT_ERRORS_SHOWN",
    "build_status",
    "collect_status",
    "format_age",
    "format_bytes",
    "format_clock",
    "print_status",
    "render_status",
    "watch_status",
]

RECENT_ERRORS_SHOWN = 10


def collect_status(client: Any) -> dict[str, Any]:
    """The raw status from the registry ``client`` (a sync ``broker_client.Client``) talks to."""
    return build_status(client.pool_report(), client.list_models())


def build_status(reply: Any, models: dict[str, Any]) -> dict[str, Any]:
    """The status dict from a raw ``workers.list`` reply and ``list_models()``: what
    ``natserve status --json`` prints and the gateway's pool page shows."""
    if isinstance(reply, dict):
        workers = list(reply.get("workers") or [])
        failures = list(reply.get("recent_failures") or [])
    else:  # a registry from before recent_failures
        workers, failures = list(reply or []), []
    errors: list[dict[str, Any]] = []
    for worker in workers:
        for error in worker.get("recent_errors") or []:
            errors.append({"source": worker.get("worker_id"), **error})
    for failure in failures:
        errors.append({"source": "registry", "endpoint": "launch", "code": None, **failure})
    errors.sort(key=lambda e: e.get("ts") or 0)
    return {"ts": time.time(), "workers": workers, "models": models, "recent_errors": errors}


# ---------------------------------------------------------------------------- rendering


def format_bytes(n: Any) -> str:
    try:
        value = float(n)
    except (TypeError, ValueError):
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return "?"


def format_age(ts: Any, now: float) -> str:
    try:
        return f"{max(0.0, now - float(ts)):.1f} s ago"
    except (TypeError, ValueError):
        return ""


def format_clock(ts: Any) -> str:
    try:
        return datetime.fromtimestamp(float(ts)).strftime("%H:%M:%S")
    except (TypeError, ValueError, OverflowError, OSError):
        return ""


def format_idle(seconds: Any) -> str:
    """How long a replica has had no request: ``busy`` while it has one, ``12 s``, ``3 min``."""
    if not isinstance(seconds, int | float):
        return ""
    if seconds <= 0:
        return "busy"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def format_scaling(model: dict[str, Any]) -> str:
    """A model that scales: its state, held requests and options (``scaled to zero; min 0,
    idle 300 s``); empty for one that does not."""
    if model.get("idle_timeout") is None:
        return ""
    state = str(model.get("state") or "").replace("_", " ")
    held = _int(model.get("held_requests"))
    if held:
        state += f" ({held} held)"
    return f"{state}; min {_int(model.get('min_replicas'))}, idle {model['idle_timeout']:g} s"


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], empty: str) -> RenderableType:
    rows = list(rows)
    if not rows:
        return Text(f"{title}: {empty}", style="dim")
    table = Table(title=title, title_justify="left", show_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(v if isinstance(v, Text) else Text("" if v is None else str(v)) for v in row))
    return table


def render_status(data: dict[str, Any], *, errors_shown: int = RECENT_ERRORS_SHOWN) -> Group:
    """Rich tables: workers, devices, replicas with their load, models, recent errors."""
    now = float(data.get("ts") or time.time())
    workers = data.get("workers") or []
    worker_rows, device_rows, replica_rows = [], [], []
    for w in workers:
        wid = w.get("worker_id")
        alive = w.get("alive", True)
        replicas = w.get("replicas") or []
        in_flight = sum(_int(r.get("active")) + _int(r.get("waiting")) for r in replicas)
        worker_rows.append(
            [
                wid,
                w.get("host"),
                Text("yes", style="green") if alive else Text("no", style="bold red"),
                w.get("status") or "",
                format_age(w.get("last_seen"), now),
                len(replicas),
                in_flight,
            ]
        )
        for d in w.get("devices") or []:
            total, free = _int(d.get("total_memory")), _int(d.get("free_memory"))
            used = f"{100 * (total - free) / total:.0f}%" if total else ""
            device_rows.append(
                [
                    wid,
                    d.get("name"),
                    d.get("description") or "",
                    format_bytes(total),
                    format_bytes(free),
                    used,
                ]
            )
        for r in replicas:
            status = str(r.get("status") or "?")
            style = {"ready": "green", "loading": "yellow"}.get(status, "red")
            limit = r.get("request_limits")
            replica_rows.append(
                [
                    r.get("model_uid"),
                    r.get("replica_index", 0),
                    wid,
                    r.get("device"),
                    Text(status, style=style),
                    _int(r.get("active")),
                    _int(r.get("waiting")),
                    limit if limit is not None else "",
                    _int(r.get("requests")),
                    _int(r.get("errors")),
                    format_bytes(r.get("memory_bytes")),
                    format_idle(r.get("idle_for")),
                ]
            )
    model_rows = []
    for uid, m in sorted((data.get("models") or {}).items()):
        reps = [r for r in m.get("replicas") or [] if isinstance(r, dict)]
        ready = sum(1 for r in reps if r.get("status") == "ready")
        model_rows.append(
            [
                uid,
                m.get("model_name"),
                m.get("model_type"),
                m.get("status") or "",
                f"{ready}/{len(reps)}",
                format_scaling(m),
            ]
        )
    errors = list(data.get("recent_errors") or [])[-errors_shown:][::-1]
    error_rows = [
        [
            format_clock(e.get("ts")),
            e.get("source") or "",
            e.get("model_uid") or "",
            e.get("endpoint") or "",
            e.get("code") if e.get("code") is not None else "",
            Text(" ".join(str(e.get("message") or "").split())[:200], style="red"),
        ]
        for e in errors
    ]
    alive = sum(1 for w in workers if w.get("alive", True))
    header = Text(
        f"natserve at {format_clock(now)}: {alive} of {len(workers)} worker(s) alive, "
        f"{len(model_rows)} model(s), {len(replica_rows)} replica(s)",
        style="bold",
    )
    return Group(
        header,
        _table(
            "Workers",
            ["WORKER", "HOST", "ALIVE", "STATUS", "LAST SEEN", "REPLICAS", "IN FLIGHT"],
            worker_rows,
            "none",
        ),
        _table("Devices", ["WORKER", "DEVICE", "DESCRIPTION", "TOTAL", "FREE", "USED"], device_rows, "none"),
        _table(
            "Replicas",
            [
                "MODEL UID",
                "#",
                "WORKER",
                "DEVICE",
                "STATUS",
                "RUNNING",
                "WAITING",
                "LIMIT",
                "REQUESTS",
                "ERRORS",
                "MEMORY",
                "IDLE",
            ],
            replica_rows,
            "none",
        ),
        _table("Models", ["UID", "NAME", "TYPE", "STATUS", "READY", "ON DEMAND"], model_rows, "none"),
        _table(
            "Recent errors", ["TIME", "SOURCE", "MODEL", "ENDPOINT", "CODE", "MESSAGE"], error_rows, "none"
        ),
    )


def print_status(data: dict[str, Any], console: Console) -> None:
    console.print(render_status(data))


def watch_status(
    client: Any, *, interval: float, as_json: bool = False, console: Console | None = None
) -> None:
    """Refresh every ``interval`` seconds until Ctrl-C; a failed refresh is shown, not fatal."""
    import json

    from rich.live import Live

    console = console or Console(highlight=False)
    try:
        if as_json:
            while True:
                print(json.dumps(collect_status(client), ensure_ascii=False, default=str), flush=True)
                time.sleep(interval)  # the refresh period, not a synchronisation
        with Live(Text("asking the registry..."), console=console, auto_refresh=False) as live:
            while True:
                try:
                    view: RenderableType = render_status(collect_status(client))
                except Exception as exc:  # a registry restarting: keep watching
                    message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
                    view = Text(
                        f"{format_clock(time.time())} cannot get the status: {message}", style="bold red"
                    )
                live.update(view, refresh=True)
                time.sleep(interval)
    except KeyboardInterrupt:
        return
