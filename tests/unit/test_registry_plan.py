"""The registry's pure parts, without a server: the launch plan and the worker directory."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from broker_client import BadRequest, LaunchRequest, WorkerInfo, WorkerLaunch
from registry_service import MIN_DEAD_AFTER, LaunchPlan, ModelRow, Placement, Registration, WorkerDirectory
from registry_service.memory import estimate_bytes

# ---------------------------------------------------------------------------- the launch plan


def registration(name: str = "m", **extra: Any) -> Registration:
    definition = {
        "version": 1,
        "model_name": name,
        "model_lang": ["en"],
        "model_ability": ["generate"],
        "context_length": 1024,
        "model_specs": [
            {
                "model_format": "pytorch",
                "model_size_in_billions": 2,
                "quantizations": ["4-bit", "none"],
                "model_id": "org/m",
            }
        ],
        **extra,
    }
    return Registration(model_type="LLM", model_name=name, definition=definition, persist=False)


def request(**options: Any) -> LaunchRequest:
    return LaunchRequest.model_validate({"model_name": "m", **options})


def test_a_plan_from_a_request_carries_every_launch_option() -> None:
    req = request(
        model_uid="u1",
        quantization="4-bit",
        replica=2,
        request_limits=3,
        max_batch_size=4,
        max_tokens_limit=5,
        rate_limit=2.5,
        timeout=30,
    )
    plan = LaunchPlan.from_request(req, registration(), timeout=600)
    assert (plan.model_uid, plan.model_name, plan.model_type) == ("u1", "m", "LLM")
    assert (plan.quantization, plan.replica, plan.timeout) == ("4-bit", 2, 30)
    assert (plan.request_limits, plan.max_batch_size, plan.max_tokens_limit, plan.rate_limit) == (
        3,
        4,
        5,
        2.5,
    )
    assert plan.spec["model_id"] == "org/m"
    assert plan.label == "'u1' (2B parameters, 4-bit)"
    # No uid: the model's name; no timeout: the registry's.
    plain = LaunchPlan.from_request(request(), registration(), timeout=600)
    assert (plain.model_uid, plain.timeout, plain.max_tokens_limit, plain.rate_limit) == (
        "m",
        600,
        None,
        None,
    )
    with pytest.raises(BadRequest):
        LaunchPlan.from_request(request(quantization="8-bit"), registration(), timeout=600)


def test_the_row_a_launch_stores_gives_the_same_plan_back() -> None:
    req = request(replica=3, request_limits=7, max_batch_size=8, max_tokens_limit=9, rate_limit=0.5)
    plan = LaunchPlan.from_request(req, registration(), timeout=120)
    row = plan.row()
    assert row.status == "launching"
    # What liveness re-places a replica from: equal in every field, so created the same way.
    assert LaunchPlan.from_row(row, timeout=120) == plan


def test_every_option_of_a_worker_launch_is_in_the_plan_and_in_sql() -> None:
    # A launch option added to WorkerLaunch but not to the plan and the models table would be
    # lost when a replica is re-placed from its row.
    per_replica = {"replica_index", "device"}
    plan_fields = {f.name for f in dataclasses.fields(LaunchPlan)}
    assert set(WorkerLaunch.model_fields) - per_replica <= plan_fields
    columns = set(ModelRow.__table__.columns.keys())
    assert plan_fields - {"timeout"} <= columns


def test_the_command_is_the_plan_on_one_placement() -> None:
    plan = LaunchPlan.from_request(
        request(max_batch_size=4, max_tokens_limit=5, rate_limit=2.5), registration(), timeout=60
    )
    command = plan.command(Placement(replica_index=1, worker_id="w1", device="cuda:0"))
    assert (command.replica_index, command.device) == (1, "cuda:0")
    assert (command.max_batch_size, command.max_tokens_limit, command.rate_limit) == (4, 5, 2.5)
    assert command.definition == plan.definition and command.spec == plan.spec
    assert plan.need("cuda") == estimate_bytes(
        plan.spec, quantization=plan.quantization, device_kind="cuda", context_length=1024, max_batch_size=4
    )


# ---------------------------------------------------------------------------- the directory


def info(worker_id: str = "w1", *, interval: float = 2.0, status: str | None = None) -> WorkerInfo:
    extra = {"status": status} if status else {}
    return WorkerInfo.model_validate(
        {
            "worker_id": worker_id,
            "host": "h",
            "pid": 1,
            "version": "0",
            "devices": [],
            "started_at": 0,
            "last_seen": 0,
            "heartbeat_interval": interval,
            **extra,
        }
    )


def test_the_dead_window_is_three_beats_and_at_least_the_minimum() -> None:
    directory = WorkerDirectory()
    assert directory.window(info(interval=0.5)) == MIN_DEAD_AFTER == 6.0
    assert directory.window(info(interval=5)) == 15
    # No worker yet: the minimum; then the longest window of the workers heard from.
    assert directory.grace() == MIN_DEAD_AFTER
    directory.heard(info("slow", interval=10))
    assert directory.grace() == 30
    # A configured dead window applies to every worker.
    assert WorkerDirectory(dead_after=2).window(info(interval=10)) == 2
    assert WorkerDirectory(dead_after=2).grace() == 2


def test_states_follow_the_heartbeats_and_the_dead_window() -> None:
    directory = WorkerDirectory(dead_after=2)
    assert directory.state_of("w1") == "unknown"
    entry, changed = directory.heard(info("w1"))
    assert changed and directory.state_of("w1") == "alive" and directory.is_worker_alive("w1")
    assert directory.alive() == [entry.info] and directory.ids() == ["w1"]
    # Past the dead window with no heartbeat: dead (the clock is passed in, nothing sleeps).
    assert directory.state_of("w1", entry.received + 1.9) == "alive"
    assert directory.state_of("w1", entry.received + 2.1) == "dead"
    assert not directory.is_alive(entry, entry.received + 2.1)
    # Another beat in the same state changes nothing for liveness; a new state does.
    assert directory.heard(info("w1"))[1] is False
    assert directory.heard(info("w1", status="stopping"))[1] is True
    assert directory.state_of("w1") == "stopping"
    stopped, changed = directory.heard(info("w1", status="stopped"))
    assert changed and directory.state_of("w1") == "stopped"
    # A stopped worker is stopped at once, and stays stopped, not dead, once its window ends.
    assert directory.state_of("w1", stopped.received + 10) == "stopped"
    assert [e.info.worker_id for e in directory.entries()] == ["w1"]


async def test_a_launch_waits_for_the_first_worker_only_inside_the_resync_window() -> None:
    # Never settled (or the window is over): nothing to wait for.
    assert await WorkerDirectory().first_workers() is False
    directory = WorkerDirectory()
    directory.settle(30.0)
    waiting = asyncio.create_task(directory.first_workers())
    await asyncio.sleep(0)  # let the waiter start: it is waiting on the directory's event
    assert not waiting.done()
    directory.heard(info("w1"))
    assert await asyncio.wait_for(waiting, 5.0) is True
    # Once a worker is known, placement's answer stands: no second wait.
    assert await directory.first_workers() is False
    # A window that runs out without a heartbeat: False, after at most the window.
    quiet = WorkerDirectory()
    quiet.settle(0.05)
    assert await asyncio.wait_for(quiet.first_workers(), 5.0) is False
