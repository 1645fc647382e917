"""The pool page, ``GET /``: a small read-only HTML view of the pool that refreshes itself.

Workers, their devices and free memory, models, replicas with their load, and the recent errors:
what ``natserve status`` prints, from the same status dict (:func:`natserve.status.build_status`).
:func:`pool_view` turns that dict into rows of plain strings (pure, tested without a server) and
``templates/pool.html`` lays them out; Jinja2 escapes every value. The page reloads itself with
``<meta http-equiv="refresh">`` (``?refresh=N`` seconds, 0 for never): no JavaScript, no build step.
"""

from __future__ import annotations

import time
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from ..status import RECENT_ERRORS_SHOWN, format_age, format_bytes, format_clock

__all__ = ["DEFAULT_REFRESH", "pool_view", "refresh_seconds", "render_pool_page"]

DEFAULT_REFRESH = 5
_MAX_REFRESH = 3600

_environment: Environment | None = None


def _template_environment() -> Environment:
    global _environment
    if _environment is None:
        _environment = Environment(
            loader=PackageLoader("natserve.gateway", "templates"),
            autoescape=select_autoescape(["html"]),
            trim_blocks=True,
            lstrip_blocks=True,
        )
    return _environment


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def pool_view(status: dict[str, Any], *, errors_shown: int = RECENT_ERRORS_SHOWN) -> dict[str, Any]:
    """The page's rows, every cell a string, from a status dict (``natserve status --json``'s)."""
    now = float(status.get("ts") or time.time())
    workers, devices, replicas = [], [], []
    for w in status.get("workers") or []:
        wid = str(w.get("worker_id") or "?")
        reps = w.get("replicas") or []
        state = str(w.get("state") or ("alive" if w.get("alive", True) else "dead"))
        workers.append(
            {
                "worker_id": wid,
                "host": str(w.get("host") or ""),
                "state": state,
                "version": str(w.get("version") or ""),
                "last_seen": format_age(w.get("last_seen"), now),
                "replicas": str(len(reps)),
                "in_flight": str(sum(_int(r.get("active")) + _int(r.get("waiting")) for r in reps)),
            }
        )
        for d in w.get("devices") or []:
            total, free = _int(d.get("total_memory")), _int(d.get("free_memory"))
            devices.append(
                {
                    "worker_id": wid,
                    "name": str(d.get("name") or ""),
                    "description": str(d.get("description") or ""),
                    "total": format_bytes(total),
                    "free": format_bytes(free),
                    "used_pct": f"{100 * (total - free) / total:.0f}" if total else "",
                }
            )
        for r in reps:
            limit = r.get("request_limits")
            replicas.append(
                {
                    "model_uid": str(r.get("model_uid") or ""),
                    "index": str(r.get("replica_index", 0)),
                    "worker_id": wid,
                    "device": str(r.get("device") or ""),
                    "status": str(r.get("status") or "?"),
                    "running": str(_int(r.get("active"))),
                    "waiting": str(_int(r.get("waiting"))),
                    "limit": "" if limit is None else str(limit),
                    "requests": str(_int(r.get("requests"))),
                    "errors": str(_int(r.get("errors"))),
                    "memory": format_bytes(r.get("memory_bytes")),
                }
            )
    models = []
    for uid, m in sorted((status.get("models") or {}).items()):
        reps = [r for r in m.get("replicas") or [] if isinstance(r, dict)]
        ready = sum(1 for r in reps if r.get("status") == "ready")
        models.append(
            {
                "model_uid": str(uid),
                "model_name": str(m.get("model_name") or ""),
                "model_type": str(m.get("model_type") or ""),
                "abilities": ", ".join(str(a) for a in m.get("model_ability") or []),
                "status": str(m.get("status") or ""),
                "ready": f"{ready}/{len(reps)}",
                "error": " ".join(str(m.get("error") or "").split())[:300],
            }
        )
    errors = [
        {
            "time": format_clock(e.get("ts")),
            "source": str(e.get("source") or ""),
            "model_uid": str(e.get("model_uid") or ""),
            "endpoint": str(e.get("endpoint") or ""),
            "code": "" if e.get("code") is None else str(e.get("code")),
            "message": " ".join(str(e.get("message") or "").split())[:300],
        }
        for e in list(status.get("recent_errors") or [])[-errors_shown:][::-1]
    ]
    alive = sum(1 for w in workers if w["state"] == "alive")
    return {
        "clock": format_clock(now),
        "summary": (
            f"{alive} of {len(workers)} worker(s) alive, {len(models)} model(s), {len(replicas)} replica(s)"
        ),
        "workers": workers,
        "devices": devices,
        "replicas": replicas,
        "models": models,
        "errors": errors,
    }


def refresh_seconds(value: str | None) -> int:
    """The ``?refresh=`` query value, bounded; the default when missing or not a number."""
    try:
        seconds = int(value) if value is not None else DEFAULT_REFRESH
    except ValueError:
        return DEFAULT_REFRESH
    return max(0, min(seconds, _MAX_REFRESH))


def render_pool_page(
    status: dict[str, Any] | None, *, refresh: int = DEFAULT_REFRESH, problem: str | None = None
) -> str:
    """The HTML page; with ``status`` None it says ``problem`` (the registry did not answer)."""
    view = pool_view(status) if status is not None else None
    return (
        _template_environment()
        .get_template("pool.html")
        .render(view=view, refresh=refresh, problem=problem, clock=format_clock(time.time()))
    )
