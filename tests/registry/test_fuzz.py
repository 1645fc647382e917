"""Fuzzing the registry's subjects with hypothesis, against a real Registry on a real nats-server.

Every registry subject gets raw bytes, arbitrary JSON and msgpack values, huge strings, numbers
and nesting, and dicts built from the real request keys, with and without a Content-Type (and
with wrong ones). Whatever arrives, the registry must answer within the timeout, never with a
500, and an error must carry ``Nats-Service-Error-Code`` and a decodable
``{"error": {"type", "code", "message"}}`` body with no traceback in it. Afterwards the registry
still serves a valid register and list.

One nats-server, one Registry (SQLite) and one raw nats-py connection for the whole module run
on an event loop in a background thread, so hypothesis drives plain synchronous tests.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections.abc import Coroutine, Iterator
from contextlib import ExitStack
from typing import Any, TypeVar

import msgpack
import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.msg import Msg

from broker_client import Subjects
from broker_client.runtime import ERROR_CODE_HEADER
from registry_service import Registry
from tests.support.databases import postgres_database
from tests.support.fuzz import (
    CONTENT_TYPES,
    check_reply,
    json_bytes,
    json_values,
    msgpack_bytes,
    msgpack_values,
    nested_json,
    nested_msgpack,
)
from tests.support.nats_server import NatsServer
from tests.support.registry import definition

T = TypeVar("T")
S = Subjects("fuzz")
SUBJECTS = [
    S.registry_register,
    S.registry_unregister,
    S.registry_list,
    S.registry_get,
    S.models_launch,
    S.models_list,
    S.models_describe,
    S.models_terminate,
    S.workers_list,
]
# Generous: an answer is a few milliseconds; this only turns a hang into a failure.
REPLY_TIMEOUT = 10.0
FUZZ = settings(
    max_examples=150,
    deadline=None,  # one slow SQLite write is not a finding; REPLY_TIMEOUT bounds each request
    database=None,  # no .hypothesis folder in the work tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Harness:
    """The server, the registry and a raw connection, on a loop in a thread of their own."""

    def __init__(self, db_url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-loop", daemon=True)
        self.thread.start()
        self.server = NatsServer().start()
        self.registry = Registry(nats_url=self.server.url, db_url=db_url, prefix=S.prefix)
        self.nc: Any = None
        self.run(self._start())

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        await self.registry.start()
        self.nc = await nats.connect(self.server.url)

    async def _request(self, subject: str, data: bytes, headers: dict[str, str] | None) -> Msg:
        return await self.nc.request(subject, data, timeout=REPLY_TIMEOUT, headers=headers)

    def request(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> Msg:
        return self.run(self._request(subject, data, headers), timeout=REPLY_TIMEOUT + 5)

    def close(self) -> None:
        try:
            self.run(self.nc.close())
            self.run(self.registry.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.server.close()


# Both databases: PostgreSQL refuses inputs (a NUL in a text parameter) that SQLite stores.
@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def harness(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    with ExitStack() as stack:
        if request.param == "sqlite":
            db_url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('fuzz') / 'registry.db'}"
        else:
            db_url = stack.enter_context(postgres_database("natserve_fuzz"))
        h = Harness(db_url)
        stack.callback(h.close)
        yield h


# ---------------------------------------------------------------------------- strategies

REAL_KEYS = [
    "model_type",
    "model",
    "persist",
    "model_name",
    "model_uid",
    "model_format",
    "model_size_in_billions",
    "quantization",
    "replica",
    "n_gpu",
    "wait",
    "worker_id",
    "request_limits",
    "max_batch_size",
    "timeout",
    "generate_config",
    "prompt",
]
names = st.one_of(
    st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,20}\Z"),
    st.text(max_size=40),
    st.just("a" * 5000),
    st.sampled_from(["", ".", "a.b", "*", ">", "a b", "../x", "x\x00y", "\u00e9t\u00e9", "-x"]),
)
real_values = st.one_of(
    names,
    json_values,
    st.sampled_from(["LLM", "embedding", "pytorch", "4-bit", "8-bit", "none", "auto"]),
    st.integers(min_value=-5, max_value=100),
    st.just(2**70),
    st.just(1e308),
    st.just(-0.0),
)


@st.composite
def definitions(draw: st.DrawFn) -> dict[str, Any] | str:
    """A real custom-model definition with a few fields replaced, removed or added."""
    model = definition(draw(st.from_regex(r"\Afz[a-z0-9]{1,10}\Z")))
    for key in draw(
        st.lists(st.sampled_from([*model, "model_ability", "chat_template", "extra"]), max_size=3)
    ):
        if draw(st.booleans()):
            model.pop(key, None)
        else:
            model[key] = draw(real_values)
    spec_changes = draw(
        st.dictionaries(
            st.sampled_from(
                ["model_id", "model_uri", "quantizations", "model_size_in_billions", "model_format"]
            ),
            real_values,
            max_size=2,
        )
    )
    specs = model.get("model_specs")
    if isinstance(specs, list) and specs and isinstance(specs[0], dict):
        model["model_specs"] = [{**specs[0], **spec_changes}]
    # The definition goes as an object or as a JSON string, both of which the wire allows.
    return json.dumps(model, allow_nan=True) if draw(st.booleans()) else model


keyed_dicts = st.dictionaries(
    st.sampled_from(REAL_KEYS), st.one_of(real_values, definitions()), max_size=len(REAL_KEYS)
)


huge_bodies = st.one_of(
    st.text(min_size=1).map(lambda s: json_bytes({"model_name": s * (200_000 // len(s) + 1)}) or b""),
    st.integers(min_value=20, max_value=4000).map(lambda n: f'{{"replica": {10**n}}}'.encode()),
    st.integers(min_value=20, max_value=4000).map(lambda n: f'{{"model_name": 1e{n}}}'.encode()),
    st.builds(nested_json, st.integers(min_value=100, max_value=100_000), st.sampled_from(["list", "dict"])),
    st.integers(min_value=100, max_value=100_000).map(nested_msgpack),
    st.integers(min_value=1000, max_value=500_000).map(lambda n: json_bytes({"model_name": "x" * n}) or b""),
    st.integers(1, 5000).map(
        lambda n: json_bytes({"model": {"model_name": "m", "model_specs": [{}] * n}}) or b""
    ),
)


@st.composite
def bodies(draw: st.DrawFn) -> tuple[bytes, dict[str, str] | None]:
    """A request body and its headers, from every kind of input."""
    kind = draw(st.sampled_from(["bytes", "json", "msgpack", "keyed-json", "keyed-msgpack", "huge"]))
    data: bytes | None
    if kind == "bytes":
        data = draw(
            st.binary(max_size=512) | st.sampled_from([b"{", b"[", b"{}}", b" {\n", b"\xc1", b"\x91"])
        )
    elif kind == "json":
        data = json_bytes(draw(json_values))
    elif kind == "msgpack":
        data = msgpack_bytes(draw(msgpack_values))
    elif kind == "huge":
        data = draw(huge_bodies)
    else:
        value = draw(keyed_dicts)
        data = msgpack_bytes(value) if kind.endswith("msgpack") else json_bytes(value)
        if data is None:
            data = json_bytes(value) or msgpack_bytes(value)
    if data is None or len(data) > 900_000:  # the server's max_payload is 1 MiB
        data = b"\x00"
    content_type = draw(st.sampled_from(CONTENT_TYPES))
    headers = {"Content-Type": content_type} if content_type is not None else None
    if draw(st.integers(0, 9)) == 0:
        headers = {**(headers or {}), "Natserve-Request-Id": draw(st.text("abc-_\t", max_size=20)) or "r"}
    return data, headers


# ---------------------------------------------------------------------------- checks


@pytest.mark.parametrize("subject", SUBJECTS)
@FUZZ
@given(body=bodies())
def test_fuzz_subject(harness: Harness, subject: str, body: tuple[bytes, dict[str, str] | None]) -> None:
    data, headers = body
    check_reply(harness.request(subject, data, headers), subject, data)


@pytest.mark.parametrize(
    "data",
    [
        nested_json(50_000, "list"),
        nested_json(5_000, "dict"),
        json.dumps({"model_type": "LLM", "model": nested_json(50_000, "list").decode()}).encode(),
        json.dumps({"model_name": 10**4000}).encode(),
        json.dumps({"model_type": "LLM", "model": {"model_name": "m", "context_length": 2**70}}).encode(),
        nested_msgpack(100_000),
        msgpack.packb({"model_type": "LLM", "model": {b"model_name": b"m"}}, use_bin_type=True),
        msgpack.packb({"model_name": msgpack.Timestamp(0), "model_type": msgpack.ExtType(1, b"x")}),
        b"{" * 100_000,
        b"[" * 100_000,
        b'{"model_name": ' + str(math.pi).encode() * 1000 + b"}",
    ],
    ids=lambda d: f"{d[:12]!r}..{len(d)}",
)
@pytest.mark.parametrize("subject", [S.registry_register, S.models_launch, S.registry_get])
def test_pathological_bodies(harness: Harness, subject: str, data: bytes) -> None:
    check_reply(harness.request(subject, data), subject, data)


def test_registry_still_serves_after_the_fuzzing(harness: Harness) -> None:
    name = "fuzz-survivor"
    body = json.dumps({"model_type": "LLM", "model": definition(name), "persist": True}).encode()
    reply = harness.request(S.registry_register, body)
    assert ERROR_CODE_HEADER not in (reply.headers or {}), reply.data
    assert json.loads(reply.data) == {"model_type": "LLM", "model_name": name}
    listed = json.loads(harness.request(S.registry_list, b'{"model_type": "LLM"}').data)
    assert name in [r["model_name"] for r in listed["registrations"]]
