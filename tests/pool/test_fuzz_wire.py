"""Fuzzing every subject over the strict wire types and oversized values, with hypothesis.

Each request subject gets a valid body with one to three fields given a value of a JSON type its
wire model does not take (read from the model's JSON schema: ``"5"`` or ``true`` for an integer,
``5.0`` for an integer, a list for a string...), a list field filled with up to 12,000 items of a
wrong type, or thousands of unknown keys; whatever it gets, an error reply must come back within
``REPLY_TIMEOUT``, cut to fit the server's ``max_payload`` (64 KiB here, so that errors listing
thousands of items are larger than a message may be), and a wrong type must be a 400 naming its
field. Heartbeats, which have no reply, get the same mutations on a worker's own heartbeat
subject: the registry must not list the worker they speak for.

One nats-server, one Registry (SQLite) and one Worker serving an echo model run for the module
on an event loop in a background thread, as in test_fuzz_registry.py. ``FIGURES`` counts what
was sent and answered, and the latencies, for the closing note (printed at the end of the
module: ``pytest -s tests/test_fuzz_wire.py``).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack
import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.msg import Msg
from pydantic import BaseModel

from broker_client import (
    ChatRequest,
    DescribeRequest,
    EmbedRequest,
    GenerateRequest,
    GetRegistrationRequest,
    LaunchRequest,
    ListRegistrationsRequest,
    LLMDefinition,
    RegisterRequest,
    Subjects,
    TerminateRequest,
    UnregisterRequest,
    WorkerInfo,
    WorkerLaunch,
    WorkerTerminate,
)
from broker_client.codec import decode, detect
from broker_client.runtime import ERROR_CODE_HEADER, ERROR_HEADER, NatsTransport
from registry_service import Registry
from tests.support.nats_server import NatsServer
from tests.support.pool import echo_definition
from workers import Worker, WorkerSettings

T = TypeVar("T")
S = Subjects("tfuzz")
WORKER_ID = "tfuzz-worker"
UID = "tfzecho"
MAX_PAYLOAD = 64 * 1024
REPLY_TIMEOUT = 10.0  # an error takes milliseconds; this only turns a dropped reply into a failure
ALLOWED = {"400", "404", "409", "429", "503"}
FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


@dataclass
class Figures:
    """What the module sent and what came back, for the closing note."""

    sent: int = 0
    answered: int = 0
    cut: int = 0
    beats: int = 0
    seconds: list[float] = field(default_factory=list)

    def line(self) -> str:
        times = sorted(self.seconds) or [0.0]

        def pct(p: float) -> float:
            return times[min(len(times) - 1, int(p * len(times)))] * 1000

        return (
            f"typed fuzz: {self.sent} requests sent, {self.answered} answered within {REPLY_TIMEOUT:g} s "
            f"({self.cut} errors cut to fit {MAX_PAYLOAD} bytes); latency p50 {pct(0.5):.1f} ms, "
            f"p99 {pct(0.99):.1f} ms, max {times[-1] * 1000:.1f} ms; {self.beats} forged heartbeats ignored"
        )


FIGURES = Figures()


class Harness:
    """The server, the registry, the worker and a raw connection, on a loop in a thread."""

    def __init__(self, db_url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tfuzz-loop", daemon=True)
        self.thread.start()
        self.server = NatsServer(config=f"max_payload: {MAX_PAYLOAD}\n").start()
        self.registry = Registry(nats_url=self.server.url, db_url=db_url, prefix=S.prefix, resync_window=0.3)
        self.worker = Worker(
            WorkerSettings(
                self.server.url, prefix=S.prefix, device="cpu", worker_id=WORKER_ID, heartbeat_interval=1
            )
        )
        self.nc: Any = None
        self.transport: NatsTransport | None = None
        self.run(self._start(), timeout=120)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        await self.registry.start()
        await self.worker.start()
        self.nc = await nats.connect(self.server.url)
        for _ in range(200):  # the registry hears the worker's first beat at once
            if await self.listed(WORKER_ID):
                break
            await asyncio.sleep(0.05)  # a bounded poll of an observable state
        register = {"model_type": "LLM", "model": echo_definition(UID), "persist": False}
        for subject, body in ((S.registry_register, register), (S.models_launch, {"model_name": UID})):
            msg = await self.nc.request(subject, json.dumps(body).encode(), timeout=30)
            assert ERROR_CODE_HEADER not in (msg.headers or {}), msg.data

    async def listed(self, worker_id: str) -> bool:
        # Through the natserve transport: with hundreds of workers heard, the list comes in parts.
        if self.transport is None:
            self.transport = NatsTransport(self.nc)
            await self.transport.start()
        reply = await self.transport.request(S.workers_list, {}, timeout=REPLY_TIMEOUT)
        return any(w["worker_id"] == worker_id for w in reply["workers"])

    async def _request(self, subject: str, data: bytes, headers: dict[str, str] | None) -> Msg:
        started = time.perf_counter()
        FIGURES.sent += 1
        msg = await self.nc.request(subject, data, timeout=REPLY_TIMEOUT, headers=headers)
        FIGURES.seconds.append(time.perf_counter() - started)
        FIGURES.answered += 1
        return msg  # type: ignore[no-any-return]

    def request(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> Msg:
        return self.run(self._request(subject, data, headers), timeout=REPLY_TIMEOUT + 5)

    def close(self) -> None:
        try:
            if self.transport is not None:
                self.run(self.transport.close())
            self.run(self.nc.close())
            self.run(self.worker.stop(drain_timeout=2), timeout=60)
            self.run(self.registry.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.server.stop()
            shutil.rmtree(self.server.store, ignore_errors=True)


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = Harness(f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('tfuzz') / 'registry.db'}")
    try:
        yield h
    finally:
        h.close()


# ---------------------------------------------------------------------------- types from the schema


def _resolve(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    return defs[ref.rsplit("/", 1)[1]] if ref else schema


def json_types(schema: dict[str, Any], defs: dict[str, Any]) -> set[str]:
    """The JSON types a schema takes ("integer", "number", "string", ...; "any" when open)."""
    schema = _resolve(schema, defs)
    if "anyOf" in schema:
        return set().union(*(json_types(s, defs) for s in schema["anyOf"]))
    kind = schema.get("type")
    if kind is None:
        return {"any"}
    kinds = set(kind) if isinstance(kind, list) else {kind}
    if "number" in kinds:
        kinds.add("integer")  # a number field takes integers, never booleans
    return kinds


def object_schema(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any] | None:
    """The object schema (with properties) that a field may hold, if any."""
    schema = _resolve(schema, defs)
    for option in schema.get("anyOf", [schema]):
        option = _resolve(option, defs)
        if option.get("properties"):
            return option
    return None


def item_schema(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any] | None:
    schema = _resolve(schema, defs)
    for option in schema.get("anyOf", [schema]):
        option = _resolve(option, defs)
        if option.get("type") == "array" and "items" in option:
            return _resolve(option["items"], defs)
    return None


# A value of each JSON type: the ones a field does not take are the wrong ones.
WRONG: dict[str, list[Any]] = {
    "string": ["5", "yes", "", "2048"],
    "boolean": [True, False],
    "integer": [5, -1, 2**63],
    "number": [5.0, 0.5, 1e300],
    "array": [[], [1, "x"]],
    "object": [{}, {"a": 1}],
    "null": [None],
}


# Fields that also take a JSON type their schema does not show: a before-validator reads it
# (a stop string for a list of one, Xinference's "1_8" for a size of 1.8).
ALSO_TAKEN = {"stop": {"string"}, "model_size_in_billions": {"string"}}


def wrong_values(taken: set[str]) -> list[Any]:
    """Values of the JSON types a field does not take (5.0 is one where only integers go)."""
    if "any" in taken:
        return []
    return [value for kind, values in WRONG.items() if kind not in taken for value in values]


@dataclass(frozen=True)
class Field:
    """A field of a request body: its path of keys, and the values it does not take."""

    path: tuple[str | int, ...]
    wrong: tuple[Any, ...]
    item_wrong: tuple[Any, ...]  # for a list field: items it does not take


def fields_of(
    model: type[BaseModel], base: dict[str, Any], *, nested: dict[str, type[BaseModel]]
) -> list[Field]:
    """Every field of ``model`` (and of the nested objects ``base`` holds), with wrong values."""
    schema = model.model_json_schema(mode="validation")
    defs = schema.get("$defs", {})
    found: list[Field] = []

    def walk(
        obj_schema: dict[str, Any], defs: dict[str, Any], value: Any, path: tuple[str | int, ...]
    ) -> None:
        for name, prop in obj_schema.get("properties", {}).items():
            here = (*path, name)
            taken = json_types(prop, defs) | ALSO_TAKEN.get(name, set())
            items = item_schema(prop, defs)
            item_wrong = tuple(wrong_values(json_types(items, defs))) if items is not None else ()
            found.append(Field(here, tuple(wrong_values(taken)), item_wrong))
            inner = value.get(name) if isinstance(value, dict) else None
            sub = object_schema(prop, defs)
            if name in nested and isinstance(inner, dict):
                sub_schema = nested[name].model_json_schema(mode="validation")
                walk(sub_schema, sub_schema.get("$defs", {}), inner, here)
            elif sub is not None and isinstance(inner, dict):
                walk(sub, defs, inner, here)
            elif items is not None and items.get("properties") and isinstance(inner, list) and inner:
                walk(items, defs, inner[0], (*here, 0))

    walk(schema, defs, base, ())
    return [f for f in found if f.wrong or f.item_wrong]


def put(body: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(body))
    target: Any = out
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return out


# ---------------------------------------------------------------------------- subjects


@dataclass(frozen=True)
class Subject:
    name: str
    subject: str
    model: type[BaseModel] | None
    base: dict[str, Any]
    nested: dict[str, type[BaseModel]] = field(default_factory=dict)


LAUNCH_DEF = echo_definition("tfzother")
SUBJECTS = [
    Subject(
        "register",
        S.registry_register,
        RegisterRequest,
        {"model_type": "LLM", "model": echo_definition("tfznew")},
        {"model": LLMDefinition},
    ),
    Subject(
        "unregister", S.registry_unregister, UnregisterRequest, {"model_type": "LLM", "model_name": "tfzx"}
    ),
    Subject("list_registrations", S.registry_list, ListRegistrationsRequest, {"model_type": "LLM"}),
    Subject(
        "get_registration", S.registry_get, GetRegistrationRequest, {"model_type": "LLM", "model_name": UID}
    ),
    Subject(
        "launch", S.models_launch, LaunchRequest, {"model_name": UID, "model_uid": "tfzuid", "replica": 1}
    ),
    Subject("describe", S.models_describe, DescribeRequest, {"model_uid": UID}),
    Subject("terminate", S.models_terminate, TerminateRequest, {"model_uid": "tfznothere"}),
    Subject("list_models", S.models_list, None, {}),
    Subject("list_workers", S.workers_list, None, {}),
    Subject(
        "worker_launch",
        S.worker(WORKER_ID, "launch"),
        WorkerLaunch,
        {
            "model_uid": "tfzw",
            "model_type": "LLM",
            "model_name": "tfzother",
            "definition": LAUNCH_DEF,
            "spec": LAUNCH_DEF["model_specs"][0],
        },
    ),
    Subject(
        "worker_terminate", S.worker(WORKER_ID, "terminate"), WorkerTerminate, {"model_uid": "tfznothere"}
    ),
    Subject("worker_info", S.worker(WORKER_ID, "info"), None, {}),
    Subject(
        "generate",
        S.model(UID, "generate"),
        GenerateRequest,
        {"prompt": "a b c", "generate_config": {"max_tokens": 3, "stop": ["x"], "stop_token_ids": [1]}},
    ),
    Subject(
        "overflow_generate",
        S.model_overflow(UID, "generate"),
        GenerateRequest,
        {"prompt": "a b c", "generate_config": {"max_tokens": 3}},
    ),
    Subject(
        "chat",
        S.model(UID, "chat"),
        ChatRequest,
        {"messages": [{"role": "user", "content": "hi"}], "generate_config": {"max_tokens": 3}},
    ),
    Subject("embed", S.model(UID, "embed"), EmbedRequest, {"input": ["a", "b"]}),
    Subject("overflow_chat", S.model_overflow(UID, "chat"), ChatRequest, {"messages": [{"role": "user"}]}),
    Subject("overflow_embed", S.model_overflow(UID, "embed"), EmbedRequest, {"input": "a"}),
    # No wire model: only unknown keys, never the request_id a holder would answer (or not).
    Subject("cancel", S.model(UID, "cancel"), None, {}),
    Subject("resync", S.workers_resync, None, {}),
]


@st.composite
def mutated(draw: st.DrawFn, subject: Subject) -> tuple[dict[str, Any], set[str], str]:
    """A body of ``subject`` with wrong types, oversized lists or unknown keys; the names of the
    fields made wrong (one of which the error must name), and what was done."""
    base = subject.base
    kind = draw(st.sampled_from(["types", "types", "many", "unknown"]))
    if subject.model is None or kind == "unknown":
        n = draw(st.integers(min_value=1, max_value=4000))
        body = {**base, **{f"zz{i}": i for i in range(n)}}
        return body, ({"unknown field"} if subject.model is not None else set()), f"{n} unknown keys"
    fields = fields_of(subject.model, base, nested=subject.nested)
    if kind == "many":
        lists = [f for f in fields if f.item_wrong]
        if lists:
            f = draw(st.sampled_from(lists))
            item = draw(st.sampled_from(f.item_wrong))
            n = draw(st.integers(min_value=1, max_value=12_000))
            return put(base, f.path, [item] * n), {str(f.path[-1])}, f"{n} x {item!r} in {f.path}"
    chosen = draw(
        st.lists(
            st.sampled_from([f for f in fields if f.wrong]),
            min_size=1,
            max_size=3,
            unique_by=lambda f: f.path,
        )
    )
    body = base
    for f in chosen:
        try:
            body = put(body, f.path, draw(st.sampled_from(f.wrong)))
        except (KeyError, IndexError, TypeError):
            continue  # a parent already made wrong: nothing left to put it in
    names = {str(p) for f in chosen for p in f.path if isinstance(p, str)}
    return body, names, f"wrong types at {[f.path for f in chosen]}"


def encoded(body: dict[str, Any], encoding: str) -> tuple[bytes, dict[str, str] | None]:
    if encoding == "json":
        return json.dumps(body).encode(), None
    return msgpack.packb(body, use_bin_type=True), {"Content-Type": "application/msgpack"}


def check_error(msg: Msg, subject: Subject, names: set[str], what: str) -> None:
    headers = dict(msg.headers or {})
    assert headers.get("Status") != "503", f"no responders on {subject.subject}"
    assert len(msg.data) <= MAX_PAYLOAD
    code = headers.get(ERROR_CODE_HEADER)
    if subject.model is None:
        assert code in (None, *ALLOWED), f"{subject.name}: {headers.get(ERROR_HEADER)}"
        return
    assert code is not None, f"{subject.name} accepted {what}: {msg.data[:300]!r}"
    assert code in ALLOWED, f"{code} on {subject.name} for {what}: {headers.get(ERROR_HEADER)}"
    error = decode(msg.data, detect(msg.data, msg.headers))["error"]
    assert str(error["code"]) == code and error["message"]
    if "more characters cut" in error["message"]:
        FIGURES.cut += 1
    assert code == "400", f"{subject.name}: {what} is a {code}: {error['message'][:300]}"
    assert any(name in error["message"] for name in names), (
        f"{subject.name}: the error for {what} names none of {sorted(names)}: {error['message'][:500]}"
    )


@pytest.mark.parametrize("subject", SUBJECTS, ids=lambda s: s.name)
@FUZZ
@given(data=st.data(), encoding=st.sampled_from(["json", "msgpack"]))
def test_every_subject_answers_typed_and_oversized_requests_with_an_error_in_time(
    harness: Harness, subject: Subject, data: st.DataObject, encoding: str
) -> None:
    body, names, what = data.draw(mutated(subject))
    payload, headers = encoded(body, encoding)
    if len(payload) > MAX_PAYLOAD - 2048:
        payload, headers = encoded(body, "msgpack" if encoding == "json" else "json")
    if len(payload) > MAX_PAYLOAD - 2048:
        return  # the client side refuses it before sending (PayloadTooLarge); not a wire case
    try:
        msg = harness.request(subject.subject, payload, headers)
    except TimeoutError:
        pytest.fail(f"no reply on {subject.subject} within {REPLY_TIMEOUT:g} s for {what}")
    check_error(msg, subject, names, what)


# ---------------------------------------------------------------------------- heartbeats


def beat(worker_id: str) -> dict[str, Any]:
    return {
        "worker_id": worker_id,
        "host": "h",
        "pid": 1,
        "version": "0.1.0",
        "devices": [{"name": "cpu", "kind": "cpu", "total_memory": 1 << 34, "free_memory": 1 << 33}],
        "replicas": [
            {
                "model_uid": "m",
                "replica_index": 0,
                "model_name": "m",
                "model_type": "LLM",
                "device": "cpu",
                "status": "ready",
            }
        ],
        "started_at": 1.0,
        "last_seen": 2.0,
        "heartbeat_interval": 1.0,
        "recent_errors": [{"ts": 1.0, "code": 500, "message": "m"}],
    }


_SEEN = iter(range(1_000_000))


@FUZZ
@given(data=st.data())
def test_forged_heartbeats_with_wrong_types_or_sizes_are_ignored(
    harness: Harness, data: st.DataObject
) -> None:
    n = next(_SEEN)
    forged_id, sentinel = f"hbx{n}", f"hbok{n}"
    base = beat(forged_id)
    fields = [f for f in fields_of(WorkerInfo, base, nested={}) if f.path != ("worker_id",)]
    kind = data.draw(st.sampled_from(["types", "many", "unknown", "long"]))
    if kind == "unknown":
        body = {**base, **{f"zz{i}": i for i in range(data.draw(st.integers(33, 3000)))}}
    elif kind == "long":
        body = {
            **base,
            data.draw(st.sampled_from(["host", "version"])): "x" * data.draw(st.integers(300, 20_000)),
        }
    elif kind == "many":
        f = data.draw(st.sampled_from([f for f in fields if f.item_wrong]))
        body = put(base, f.path, [data.draw(st.sampled_from(f.item_wrong))] * data.draw(st.integers(1, 5000)))
    else:
        f = data.draw(st.sampled_from([f for f in fields if f.wrong]))
        body = put(base, f.path, data.draw(st.sampled_from(f.wrong)))

    async def go() -> None:
        nc = harness.nc
        headers = {"Content-Type": "application/msgpack"}
        await nc.publish(S.worker_heartbeat(forged_id), msgpack.packb(body), headers=headers)
        # Then a valid beat on the same connection: once it is listed, the forgery was judged.
        await nc.publish(S.worker_heartbeat(sentinel), msgpack.packb(beat(sentinel)), headers=headers)
        await nc.flush()
        deadline = time.monotonic() + REPLY_TIMEOUT
        while not await harness.listed(sentinel):
            assert time.monotonic() < deadline, (
                f"the registry did not list {sentinel} within {REPLY_TIMEOUT:g} s"
            )
            await asyncio.sleep(0.02)  # a bounded poll of an observable state
        assert not await harness.listed(forged_id), f"a heartbeat with {kind} was taken: {str(body)[:300]}"

    harness.run(go())
    FIGURES.beats += 1


def test_the_pool_still_serves_after_the_fuzzing(harness: Harness) -> None:
    reply = harness.request(S.model(UID, "generate"), json.dumps({"prompt": "still here"}).encode())
    assert ERROR_CODE_HEADER not in (reply.headers or {}), reply.data
    assert json.loads(reply.data)["choices"][0]["text"] == "still here"
    assert harness.run(harness.listed(WORKER_ID))
    assert not [r for r in harness.worker.models[UID].replicas.values() if r.load]


def test_closing_figures(harness: Harness) -> None:
    assert FIGURES.sent == FIGURES.answered
    print(f"\n{FIGURES.line()}")
