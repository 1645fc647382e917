"""The pure parts of models that start on demand: the hold queue's bounds, the backoff after a
failed start, the launch options (request, definition, checks), the idle-stop and eviction
decisions, and the wire fields."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from broker_client import (
    BadRequest,
    LaunchRequest,
    Overloaded,
    ReplicaInfo,
    Unavailable,
    WorkerInfo,
    WorkerTerminate,
    parse_definition,
)
from registry_service import ModelRow, Registration
from registry_service.memory import estimate_bytes
from registry_service.models import ReplicaRow
from registry_service.ondemand import (
    FIRST_BACKOFF,
    MAX_BACKOFF,
    HoldQueue,
    IdleReplica,
    choose_evictions,
    eviction_candidates,
    idle_replicas,
    idle_stops,
)
from registry_service.ondemand.backoff import StartBackoff
from registry_service.placement import place_replicas
from registry_service.plan import DEFAULT_IDLE_TIMEOUT, LaunchPlan, on_demand_options

GB = 10**9

# ---------------------------------------------------------------------------- the hold queue


def test_the_hold_queue_refuses_past_its_count_naming_the_bound() -> None:
    queue: HoldQueue[str] = HoldQueue("m", max_requests=2, max_age=10)
    queue.add("a", 0.0)
    queue.add("b", 1.0)
    with pytest.raises(Overloaded, match=r"'m' is starting and already holds 2 requests.*max_requests=2"):
        queue.add("c", 2.0)
    assert [h.item for h in queue] == ["a", "b"]
    assert [h.item for h in queue.take_all()] == ["a", "b"]
    assert len(queue) == 0 and queue.next_deadline() is None
    queue.add("c", 3.0)  # room again once they are handed over


def test_the_hold_queue_lets_out_what_waited_too_long_oldest_first() -> None:
    queue: HoldQueue[str] = HoldQueue("m", max_requests=10, max_age=5)
    for i, t in enumerate((0.0, 1.0, 4.0)):
        queue.add(f"r{i}", t)
    assert queue.next_deadline() == 5.0
    assert queue.expired(4.9) == []
    assert [h.item for h in queue.expired(6.0)] == ["r0", "r1"]
    assert queue.next_deadline() == 9.0
    assert [h.item for h in queue.take_all()] == ["r2"]


def test_the_hold_queue_takes_out_what_a_cancel_names_and_keeps_the_rest_in_order() -> None:
    queue: HoldQueue[tuple[str, str | None]] = HoldQueue("m", max_requests=10, max_age=5)
    for i, rid in enumerate(("a", None, "b", "a")):
        queue.add((f"r{i}", rid), float(i))
    assert queue.take(lambda item: item[1] == "zzz") == []
    assert [h.item[0] for h in queue.take(lambda item: item[1] == "a")] == ["r0", "r3"]
    assert [h.item[0] for h in queue] == ["r1", "r2"]
    assert queue.next_deadline() == 6.0  # r1, the oldest left
    assert len(queue) == 2


@pytest.mark.parametrize(("count", "age"), [(0, 1.0), (1, 0.0), (1, float("nan"))])
def test_the_hold_queue_takes_only_sane_bounds(count: int, age: float) -> None:
    with pytest.raises(ValueError, match="max_"):
        HoldQueue("m", max_requests=count, max_age=age)


# ---------------------------------------------------------------------------- the backoff


def test_a_failed_start_backs_off_doubling_to_the_longest_window_and_a_success_resets_it() -> None:
    backoff = StartBackoff("m")
    assert not backoff.waiting(0.0)
    windows = [backoff.failed(f"boom {i}", now=100.0 * i) for i in range(8)]
    assert windows == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    assert (FIRST_BACKOFF, MAX_BACKOFF) == (2.0, 60.0)
    # The last failure came at 700: no start before 760, one at 760.
    assert backoff.waiting(759.9) and not backoff.waiting(760.0)
    refusal = backoff.refusal(745.0)
    assert isinstance(refusal, Unavailable) and refusal.code == 503
    assert "model 'm' is not started: its last start failed (boom 7)" in refusal.message
    assert "the next try is in 15.0 s" in refusal.message
    assert "8 failed start(s) in a row" in refusal.message
    backoff.succeeded()
    assert not backoff.waiting(760.0)
    assert backoff.failed("again", 800.0) == 2.0


@pytest.mark.parametrize(("first", "longest", "what"), [(0.0, 60.0, "positive"), (5.0, 1.0, "shorter")])
def test_the_backoff_takes_only_sane_windows(first: float, longest: float, what: str) -> None:
    with pytest.raises(ValueError, match=what):
        StartBackoff("m", first=first, longest=longest)


# ---------------------------------------------------------------------------- launch options


def registration(**launch: Any) -> Registration:
    definition: dict[str, Any] = {
        "model_name": "m",
        "model_ability": ["generate"],
        "model_specs": [{"model_size_in_billions": 1, "model_uri": "echo:"}],
    }
    if launch:
        definition["launch"] = launch
    return Registration(model_type="LLM", model_name="m", definition=definition, persist=False)


def request(**options: Any) -> LaunchRequest:
    return LaunchRequest.model_validate({"model_name": "m", **options})


@pytest.mark.parametrize(
    ("options", "worker_id", "n_gpu", "stored"),
    [
        ({}, None, "auto", (None, None)),
        ({"worker_id": "w-b", "n_gpu": 2}, "w-b", 2, ("w-b", 2)),
        ({"n_gpu": 0}, None, 0, (None, 0)),
        ({"n_gpu": None}, None, 0, (None, 0)),  # None and 0 both place on no GPU
    ],
)
def test_a_start_on_demand_places_as_its_launch_asked(
    options: dict[str, Any], worker_id: str | None, n_gpu: int | str, stored: tuple[Any, Any]
) -> None:
    req = request(min_replicas=0, **options)
    plan = LaunchPlan.from_request(req, registration(), timeout=60)
    row = plan.row("ready")
    assert (row.launch_worker_id, row.launch_n_gpu) == stored
    # What Launcher.start_replicas places by, read back from the stored row.
    again = LaunchPlan.from_row(row, timeout=60)
    assert (again.launch_worker_id, again.launch_n_gpu) == (worker_id, n_gpu)
    assert again == plan


def test_launch_options_come_from_the_request_else_the_definition() -> None:
    assert on_demand_options(request(), {}, 1) == (None, None)
    assert on_demand_options(request(min_replicas=0), {}, 1) == (0, DEFAULT_IDLE_TIMEOUT)
    assert on_demand_options(request(idle_timeout=5.0), {}, 3) == (0, 5.0)
    defaults = {"launch": {"min_replicas": 1, "idle_timeout": 60.0}}
    assert on_demand_options(request(), defaults, 2) == (1, 60.0)
    assert on_demand_options(request(min_replicas=0), defaults, 2) == (0, 60.0)
    plan = LaunchPlan.from_request(
        request(replica=2), registration(min_replicas=0, idle_timeout=9), timeout=60
    )
    assert (plan.min_replicas, plan.idle_timeout, plan.starts_on_demand) == (0, 9, True)
    row = plan.row()
    assert (row.min_replicas, row.idle_timeout) == (0, 9)
    again = LaunchPlan.from_row(row, timeout=60)
    assert (again.min_replicas, again.idle_timeout) == (0, 9)
    kept = LaunchPlan.from_request(request(replica=2, min_replicas=1), registration(), timeout=60)
    assert kept.scales and not kept.starts_on_demand
    assert not LaunchPlan.from_request(request(), registration(), timeout=60).scales


def test_min_replicas_above_replica_is_a_400_naming_both_and_where_it_came_from() -> None:
    with pytest.raises(BadRequest, match=r"min_replicas 3 is more than replica 2"):
        on_demand_options(request(replica=2, min_replicas=3), {}, 2)
    with pytest.raises(BadRequest, match=r"min_replicas 2 \(the definition's launch.min_replicas\) is more"):
        LaunchPlan.from_request(request(), registration(min_replicas=2), timeout=60)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"min_replicas": -1}, "min_replicas"),
        ({"min_replicas": 64}, "min_replicas"),
        ({"min_replicas": "0"}, "min_replicas"),
        ({"idle_timeout": 0}, "idle_timeout"),
        ({"idle_timeout": float("inf")}, "idle_timeout"),
        ({"idle_timeout": 31 * 86400}, "idle_timeout"),
    ],
)
def test_bad_launch_options_are_refused_naming_the_field(options: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        request(**options)
    with pytest.raises(BadRequest, match=rf"launch\.{field}"):
        parse_definition("LLM", {**registration().definition, "launch": options})


def test_the_wire_carries_idleness_and_the_conditional_terminate() -> None:
    assert WorkerTerminate(model_uid="m", replica_index=0, if_idle_for=2.5).if_idle_for == 2.5
    with pytest.raises(ValidationError, match="if_idle_for"):
        WorkerTerminate.model_validate({"model_uid": "m", "if_idle_for": -1})
    info = replica_info("m", 0, idle_for=3.0)
    assert info.idle_for == 3.0
    with pytest.raises(ValidationError, match="idle_for"):
        ReplicaInfo.model_validate({**info.model_dump(), "idle_for": -1.0})


def test_an_echo_model_needs_the_memory_its_uri_names() -> None:
    spec = {"model_size_in_billions": 1, "model_uri": "echo:?memory=4e8&delay=0.1"}
    assert estimate_bytes(spec, quantization="none", device_kind="cpu") == 400_000_000
    assert (
        estimate_bytes(
            {"model_size_in_billions": 1, "model_uri": "echo:"}, quantization="none", device_kind="cpu"
        )
        == 0
    )


# ---------------------------------------------------------------------------- decisions


def replica_info(
    uid: str, index: int, *, idle_for: float | None, memory: int = GB, status: str = "ready"
) -> ReplicaInfo:
    return ReplicaInfo(
        model_uid=uid,
        replica_index=index,
        model_name=uid,
        model_type="LLM",
        device="cpu",
        status=status,  # type: ignore[arg-type]
        memory_bytes=memory,
        idle_for=idle_for,
    )


def worker(worker_id: str, replicas: list[ReplicaInfo], free: int = 0) -> WorkerInfo:
    return WorkerInfo.model_validate(
        {
            "worker_id": worker_id,
            "host": "h",
            "pid": 1,
            "version": "0",
            "devices": [{"name": "cpu", "kind": "cpu", "total_memory": 8 * GB, "free_memory": free}],
            "replicas": [r.model_dump() for r in replicas],
            "started_at": 0.0,
            "last_seen": 0.0,
            "heartbeat_interval": 1.0,
        }
    )


def row(
    uid: str, workers: list[str], *, min_replicas: int | None = 0, idle_timeout: float | None = 10.0
) -> ModelRow:
    return ModelRow(
        model_uid=uid,
        model_name=uid,
        model_type="LLM",
        definition={},
        spec={},
        quantization="none",
        replica=len(workers),
        min_replicas=min_replicas,
        idle_timeout=idle_timeout,
        status="ready",
        replicas=[ReplicaRow(replica_index=i, worker_id=w, status="ready") for i, w in enumerate(workers)],
    )


def test_idleness_is_the_heartbeats_plus_the_time_since_it_came_and_busy_is_never_idle() -> None:
    beats = [
        (worker("w1", [replica_info("a", 0, idle_for=2.0), replica_info("b", 0, idle_for=0.0)]), 100.0),
        (
            worker(
                "w2",
                [replica_info("c", 0, idle_for=None), replica_info("d", 0, idle_for=5.0, status="loading")],
            ),
            100.0,
        ),
    ]
    idle = idle_replicas(beats, now=103.0)
    assert list(idle) == [("a", 0)]
    assert idle[("a", 0)] == IdleReplica("a", 0, "w1", "cpu", 5.0, GB)


def test_idle_replicas_stop_past_their_timeout_down_to_min_replicas_most_idle_first() -> None:
    idle = {
        ("a", 0): IdleReplica("a", 0, "w1", "cpu", 30.0, GB),
        ("a", 1): IdleReplica("a", 1, "w2", "cpu", 50.0, GB),
        ("a", 2): IdleReplica("a", 2, "w3", "cpu", 5.0, GB),  # not idle long enough
        ("b", 0): IdleReplica("b", 0, "w1", "cpu", 99.0, GB),  # b never scales
        ("c", 0): IdleReplica("c", 0, "w9", "cpu", 99.0, GB),  # reported by another worker than its row's
    }
    rows = [
        row("a", ["w1", "w2", "w3"], min_replicas=1),
        row("b", ["w1"], min_replicas=None, idle_timeout=None),
        row("c", ["w1"]),
    ]
    stops = idle_stops(rows, idle)
    assert [(s.model_uid, s.replica_index) for s in stops] == [("a", 1), ("a", 0)]
    # With min_replicas 2, only the most idle one of them goes.
    rows[0] = row("a", ["w1", "w2", "w3"], min_replicas=2)
    assert [(s.model_uid, s.replica_index) for s in idle_stops(rows, idle)] == [("a", 1)]


def test_eviction_takes_the_least_recently_used_idle_replicas_that_make_room_and_no_more() -> None:
    # w1 has 1 GB free, w2 none; the launch needs 2.5 GB on one worker.
    reports = [
        worker(
            "w1", [replica_info("old", 0, idle_for=100.0), replica_info("mid", 0, idle_for=50.0)], free=GB
        ),
        worker("w2", [replica_info("w2old", 0, idle_for=200.0)], free=0),
    ]
    rows = [row("old", ["w1"]), row("mid", ["w1"]), row("w2old", ["w2"]), row("new", ["w1"])]
    idle = idle_replicas([(w, 0.0) for w in reports], now=0.0)
    candidates = eviction_candidates(rows, idle, exclude={"new"})
    assert [c.model_uid for c in candidates] == ["w2old", "old", "mid"]

    def place(credit: Any) -> Any:
        return place_replicas(reports, 1, need=lambda kind: int(2.5 * GB), reserved=credit)

    with pytest.raises(Unavailable):
        place({})
    chosen = choose_evictions(place, candidates)
    assert chosen is not None
    placements, victims = chosen
    # w2old alone gives w2 1 GB, not enough; old gives w1 2 GB, with mid 3 GB: it fits on w1,
    # and w2old, on another worker, is not evicted for nothing.
    assert [p.worker_id for p in placements] == ["w1"]
    assert [v.model_uid for v in victims] == ["old", "mid"]


def test_eviction_gives_up_when_even_every_candidate_is_not_enough() -> None:
    reports = [
        worker("w1", [replica_info("a", 0, idle_for=9.0), replica_info("z", 0, idle_for=9.0, memory=0)])
    ]
    rows = [row("a", ["w1"]), row("z", ["w1"])]
    candidates = eviction_candidates(rows, idle_replicas([(w, 0.0) for w in reports], 0.0))

    def place(credit: Any) -> Any:
        return place_replicas(reports, 1, need=lambda kind: 5 * GB, reserved=credit)

    assert choose_evictions(place, candidates) is None
    # A model whose minimum keeps its one replica is never a candidate.
    assert (
        eviction_candidates(
            [row("a", ["w1"], min_replicas=1)], idle_replicas([(w, 0.0) for w in reports], 0.0)
        )
        == []
    )
