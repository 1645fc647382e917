"""``natserve status`` without a pool: rendering a status, the watch loop, a bad interval."""

from __future__ import annotations

import io
import time
from typing import Any

import pytest
from rich.console import Console

from natserve import status as status_module
from natserve.cli import main
from natserve.status import render_status, watch_status


def test_render_status_of_a_dead_worker_and_an_empty_pool() -> None:
    now = time.time()
    data = {
        "ts": now,
        "workers": [
            {
                "worker_id": "w1",
                "host": "h1",
                "alive": False,
                "status": "running",
                "last_seen": now - 42,
                "devices": [
                    {
                        "name": "cuda:0",
                        "total_memory": 80 * 2**30,
                        "free_memory": 20 * 2**30,
                        "description": "H100",
                    }
                ],
                "replicas": [
                    {
                        "model_uid": "m",
                        "replica_index": 1,
                        "status": "loading",
                        "device": "cuda:0",
                        "active": 3,
                        "waiting": 7,
                        "request_limits": 16,
                        "requests": 9,
                        "errors": 2,
                        "memory_bytes": 2**30,
                    }
                ],
            }
        ],
        "models": {
            "m": {
                "model_name": "mm",
                "model_type": "LLM",
                "status": "launching",
                "replicas": [{"status": "loading"}, {"status": "ready"}],
            }
        },
        "recent_errors": [
            {
                "ts": now,
                "source": "w1",
                "model_uid": "m",
                "endpoint": "generate",
                "code": 500,
                "message": "internal error on 'x': boom",
            }
        ],
    }
    console = Console(file=io.StringIO(), width=250)
    console.print(render_status(data))
    out = console.file.getvalue()  # type: ignore[attr-defined]
    for text in (
        "0 of 1 worker(s) alive",
        "no",
        "42.",
        "80.0 GiB",
        "20.0 GiB",
        "75%",
        "H100",
        "loading",
        "16",
        "1.0 GiB",
        "1/2",
        "boom",
        "500",
    ):
        assert text in out, f"{text!r} not in:\n{out}"

    console = Console(file=io.StringIO(), width=120)
    console.print(render_status({"ts": now, "workers": [], "models": {}, "recent_errors": []}))
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert "0 of 0 worker(s) alive" in out and "Workers: none" in out and "Recent errors: none" in out


def test_watch_refreshes_until_ctrl_c(monkeypatch: pytest.MonkeyPatch) -> None:
    from broker_client import NoResponders

    calls = []

    def fake_collect(client: Any) -> dict[str, Any]:
        calls.append(time.monotonic())
        if len(calls) == 2:
            raise NoResponders("no natserve registry answers")
        if len(calls) == 4:
            raise KeyboardInterrupt
        return {"ts": time.time(), "workers": [], "models": {}, "recent_errors": []}

    monkeypatch.setattr(status_module, "collect_status", fake_collect)
    console = Console(file=io.StringIO(), width=120, force_terminal=True)
    watch_status(object(), interval=0.01, console=console)  # returns on Ctrl-C
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert len(calls) == 4
    assert "cannot get the status: no natserve registry answers" in out
    assert "worker(s) alive" in out


def test_status_rejects_a_bad_interval(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--watch", "--interval", "0"]) == 2
    assert "--interval must be positive" in capsys.readouterr().err


def test_render_status_shows_models_that_scale_their_state_and_idle_replicas() -> None:
    now = time.time()
    replica = {"model_uid": "warm", "replica_index": 0, "status": "ready", "device": "cpu", "idle_for": 75.0}
    data = {
        "ts": now,
        "workers": [{"worker_id": "w1", "host": "h", "alive": True, "last_seen": now, "replicas": [replica]}],
        "models": {
            "cold": {
                "status": "ready",
                "replicas": [],
                "min_replicas": 0,
                "idle_timeout": 300.0,
                "state": "starting",
                "held_requests": 3,
            },
            "warm": {
                "status": "ready",
                "replicas": [replica],
                "min_replicas": 0,
                "idle_timeout": 60.0,
                "state": "running",
                "held_requests": 0,
            },
            "plain": {"status": "ready", "replicas": []},
        },
    }
    out = io.StringIO()
    Console(file=out, width=250, color_system=None).print(render_status(data))
    text = out.getvalue()
    assert "starting (3 held); min 0, idle 300 s" in text
    assert "running; min 0, idle 60 s" in text
    assert "75 s" in text  # the replica's idleness
    assert status_module.format_scaling({"status": "ready"}) == ""
    assert status_module.format_idle(0.0) == "busy" and status_module.format_idle(600) == "10 min"


def test_natserve_models_says_when_a_model_is_scaled_to_zero_or_starting() -> None:
    from natserve.cli import _status_text

    assert _status_text({"status": "ready"}) == "ready"
    assert _status_text({"status": "ready", "state": "running"}) == "ready"
    assert _status_text({"status": "ready", "state": "scaled_to_zero"}) == "ready, scaled to zero"
    assert _status_text({"status": "ready", "state": "backing_off"}) == "ready, backing off"
    assert (
        _status_text({"status": "ready", "state": "starting", "held_requests": 2})
        == "ready, starting (2 held)"
    )
