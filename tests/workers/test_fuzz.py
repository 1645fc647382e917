"""Fuzzing the worker's subjects with hypothesis, against a real Worker on a real nats-server.

The model endpoints (generate, chat, embed, cancel) of an echo replica, of the tiny Llama and of
the real all-MiniLM-L6-v2 embedder, and the worker's own launch / terminate / info subjects, get
raw bytes, arbitrary JSON and msgpack, huge values and deep nesting, and requests built from the
real keys with wrong, extreme or hostile values (NaN temperatures, token ids outside the
vocabulary, seeds beyond 64 bits, lone surrogates, traversing model paths). Whatever arrives,
the worker answers within the timeout, never with a 500 or a traceback, errors carry the headers
and a decodable ``{"error": ...}`` body; afterwards every replica is idle (no leaked request)
and still serves.

One nats-server and one Worker for the module run on an event loop in a background thread, so
that hypothesis drives plain synchronous tests (as in tests/registry/test_fuzz.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import nats
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from nats.aio.msg import Msg

from broker_client import Subjects
from broker_client.codec import decode, detect
from broker_client.runtime import ERROR_CODE_HEADER, PARTS_HEADER
from tests.support import fuzz
from tests.support.fuzz import (
    CONTENT_TYPES,
    json_bytes,
    json_values,
    msgpack_bytes,
    msgpack_values,
    nested_json,
    nested_msgpack,
)
from tests.support.models import minilm_path
from tests.support.nats_server import NatsServer
from tests.support.worker import launch_message, llm_definition
from workers import Worker, WorkerSettings
from workers.limits import WorkerLimits

T = TypeVar("T")
S = Subjects("wfuzz")
WORKER_ID = "fuzz-worker"
ECHO, TINY, MINILM = "fzecho7q", "fztiny7q", "fzminilm7q"
MODEL_SUBJECTS = [S.model(uid, op) for uid in (ECHO, TINY) for op in ("generate", "chat", "embed")] + [
    S.model(MINILM, "embed"),
    S.model(MINILM, "generate"),
]
CANCEL_SUBJECTS = [S.model(uid, "cancel") for uid in (ECHO, TINY, MINILM)]
WORKER_SUBJECTS = [S.worker(WORKER_ID, verb) for verb in ("launch", "terminate", "info")]
REPLY_TIMEOUT = 30.0  # generous: a reply takes milliseconds; this only turns a hang into a failure
MAX_TOKENS_LIMIT = 8  # keeps the tiny Llama's answers short
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Harness:
    """The server, the worker and a raw connection, on a loop in a thread of their own."""

    def __init__(self, tiny_llama_dir: Path, root: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="wfuzz-loop", daemon=True)
        self.thread.start()
        self.server = NatsServer().start()
        self.root = root
        self.worker = Worker(
            WorkerSettings(
                self.server.url,
                prefix=S.prefix,
                device="cpu",
                worker_id=WORKER_ID,
                heartbeat_interval=30,
                drain_timeout=5,
                limits=WorkerLimits(
                    model_roots=(root, tiny_llama_dir, minilm_path()), max_tokens_limit=MAX_TOKENS_LIMIT
                ),
            )
        )
        self.nc: Any = None
        self.run(self._start(tiny_llama_dir), timeout=180)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self, tiny_llama_dir: Path) -> None:
        await self.worker.start()
        self.nc = await nats.connect(self.server.url)
        launch = S.worker(WORKER_ID, "launch")
        for uid, definition, model_type in (
            (ECHO, llm_definition("echo", "echo:", context_length=256, chat_template=TEMPLATE), "LLM"),
            (TINY, llm_definition("tiny", str(tiny_llama_dir), context_length=256), "LLM"),
            (
                MINILM,
                {"model_name": "minilm", "model_ability": ["embed"], "model_uri": str(minilm_path())},
                "embedding",
            ),
        ):
            body = json.dumps(launch_message(uid, definition, model_type=model_type)).encode()
            msg = await self.nc.request(launch, body, timeout=120)
            assert ERROR_CODE_HEADER not in (msg.headers or {}), msg.data

    async def _request(self, subject: str, data: bytes, headers: dict[str, str] | None) -> Msg:
        return await self.nc.request(subject, data, timeout=REPLY_TIMEOUT, headers=headers)

    def request(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> Msg:
        return self.run(self._request(subject, data, headers), timeout=REPLY_TIMEOUT + 5)

    def publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        async def go() -> None:
            await self.nc.publish(subject, data, headers=headers)
            await self.nc.flush()

        self.run(go())

    def close(self) -> None:
        try:
            self.run(self.nc.close())
            self.run(self.worker.stop(), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.server.close()


@pytest.fixture(scope="module")
def harness(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    # A model_id drawn by the fuzzer must never reach the network.
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    h = Harness(tiny_llama_dir, tmp_path_factory.mktemp("roots"))
    try:
        yield h
    finally:
        h.close()
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


def check_reply(msg: Msg, subject: str, sent: bytes) -> None:
    """The shared checks (``tests.support.fuzz.check_reply``); a reply above max_payload comes
    in parts (the client joins them): a raw request sees the first, which must then be no error."""
    if msg.headers and PARTS_HEADER in msg.headers:
        assert ERROR_CODE_HEADER not in msg.headers and int(msg.headers[PARTS_HEADER]) > 1
        return
    fuzz.check_reply(msg, subject, sent)


# ---------------------------------------------------------------------------- strategies

texts = st.one_of(
    st.text(max_size=64),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=64),
    st.sampled_from(["", " ", "\x00", "\ud800", "hello world", "<s></s>", "{{ x }}", "a" * 20_000]),
)
numbers = st.one_of(
    st.integers(min_value=-5, max_value=300),
    st.just(2**70),
    st.just(-(2**63)),
    st.floats(),
    st.sampled_from([0, 1, 2**31, 2**64, 1e308, -0.0]),
)
anything = st.one_of(json_values, texts, numbers)
generate_configs = st.dictionaries(
    st.sampled_from(
        ["max_tokens", "temperature", "top_p", "top_k", "stop", "stop_token_ids", "seed", "stream", "extra"]
    ),
    st.one_of(
        numbers,
        st.booleans(),
        texts,
        st.lists(texts, max_size=4),
        st.lists(st.integers(min_value=-(2**40), max_value=2**40), max_size=4),
        st.none(),
    ),
    max_size=5,
)
messages = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "assistant", "system", "tool", ""]) | texts},
            optional={
                "content": st.one_of(texts, st.none(), numbers, st.lists(anything, max_size=2)),
                "name": texts,
            },
        ),
        anything,
    ),
    max_size=4,
)
# Within the rules, at their edges: what gets past validation into the engines.
valid_configs = st.fixed_dictionaries(
    {},
    optional={
        "max_tokens": st.integers(1, MAX_TOKENS_LIMIT),
        "temperature": st.sampled_from([0, 0.0, 1e-9, 0.7, 1, 2, 100, 1e30]),
        "top_p": st.sampled_from([1e-9, 0.1, 0.5, 1]),
        "top_k": st.sampled_from([0, 1, 2, 50, 10**6]),
        "stop": st.one_of(texts.filter(bool), st.lists(texts.filter(bool), max_size=3)),
        "stop_token_ids": st.lists(st.integers(-(2**31), 2**31), max_size=3),
        "seed": st.integers(-(2**63), 2**64 - 1),
        "stream": st.booleans(),
    },
)
request_ids = st.one_of(st.none(), texts, numbers, st.just("r" * 200))
inference_dicts = st.fixed_dictionaries(
    {},
    optional={
        "prompt": st.one_of(texts, anything),
        "messages": st.one_of(messages, anything),
        "input": st.one_of(
            texts, st.lists(texts, max_size=5), st.lists(st.just("x"), min_size=2049, max_size=2050), anything
        ),
        "generate_config": st.one_of(generate_configs, anything),
        "request_id": request_ids,
        "extra": anything,
    },
)
# Well-formed requests: the paths past parsing are where replicas can break.
good_inference = st.one_of(
    st.fixed_dictionaries(
        {"prompt": texts}, optional={"generate_config": valid_configs, "request_id": st.text(max_size=20)}
    ),
    st.fixed_dictionaries(
        {
            "messages": st.lists(
                st.fixed_dictionaries(
                    {"role": st.sampled_from(["user", "system", "assistant"]), "content": texts}
                ),
                min_size=1,
                max_size=3,
            )
        },
        optional={"generate_config": valid_configs},
    ),
    st.fixed_dictionaries({"input": st.one_of(texts, st.lists(texts, min_size=1, max_size=4))}),
)
specs = st.fixed_dictionaries(
    {},
    optional={
        "model_uri": st.one_of(
            st.sampled_from(["echo:", "/etc", "file:///etc/../etc", "../..", "file://", "http://x/y", "~"]),
            texts,
        ),
        "model_id": st.one_of(st.sampled_from(["Org/Name", "a/b/c", ""]), texts),
        "model_size_in_billions": numbers,
        "quantizations": st.lists(st.sampled_from(["none", "4-bit", "8-bit", "x"]), max_size=3),
    },
)
launch_dicts = st.fixed_dictionaries(
    {},
    optional={
        "model_uid": st.one_of(st.from_regex(r"\Afzl[a-z0-9]{1,8}\Z"), texts),
        "replica_index": numbers,
        "model_type": st.sampled_from(["LLM", "embedding", "x"]),
        "model_name": texts,
        "definition": st.one_of(
            st.builds(lambda n: llm_definition(n, "echo:"), st.from_regex(r"\Afzd[a-z0-9]{1,8}\Z")),
            st.builds(lambda: llm_definition("rc", "echo:", trust_remote_code=True)),
            anything,
        ),
        "spec": st.one_of(specs, anything),
        "quantization": st.sampled_from(["none", "4-bit", "x"]),
        "device": st.sampled_from(["cpu", "cuda:7", "", "x"]),
        "request_limits": numbers,
        "max_batch_size": numbers,
        "max_tokens_limit": numbers,
        "rate_limit": numbers,
    },
)
terminate_dicts = st.fixed_dictionaries(
    {},
    optional={
        "model_uid": st.one_of(st.from_regex(r"\Afzl[a-z0-9]{1,8}\Z"), texts, anything),
        "replica_index": numbers,
    },
)
huge_bodies = st.one_of(
    st.integers(min_value=1000, max_value=400_000).map(lambda n: json_bytes({"prompt": "x " * n}) or b""),
    st.integers(min_value=20, max_value=4000).map(
        lambda n: f'{{"prompt": "a", "generate_config": {{"max_tokens": {10**n}}}}}'.encode()
    ),
    st.builds(nested_json, st.integers(min_value=100, max_value=100_000), st.sampled_from(["list", "dict"])),
    st.integers(min_value=100, max_value=100_000).map(nested_msgpack),
    st.integers(1, 3000).map(lambda n: json_bytes({"input": ["word"] * n}) or b""),
    st.integers(1, 2000).map(
        lambda n: json_bytes({"messages": [{"role": "user", "content": "hi"}] * n}) or b""
    ),
)


@st.composite
def bodies(draw: st.DrawFn, keyed: st.SearchStrategy[Any]) -> tuple[bytes, dict[str, str] | None]:
    kind = draw(
        st.sampled_from(
            # Well-formed requests half of the time: they reach the engines.
            ["bytes", "json", "msgpack", "keyed-json", "keyed-msgpack", "huge"]
            + ["good-json", "good-msgpack"] * 3
        )
    )
    data: bytes | None
    if kind == "bytes":
        data = draw(st.binary(max_size=256) | st.sampled_from([b"{", b"[", b"\xc1", b"\x91", b" {\n"]))
    elif kind == "json":
        data = json_bytes(draw(json_values))
    elif kind == "msgpack":
        data = msgpack_bytes(draw(msgpack_values))
    elif kind == "huge":
        data = draw(huge_bodies)
    else:
        value = draw(good_inference if kind.startswith("good") else keyed)
        data = msgpack_bytes(value) if kind.endswith("msgpack") else json_bytes(value)
        if data is None:
            data = json_bytes(value) or msgpack_bytes(value)
    if data is None or len(data) > 900_000:  # the server's max_payload is 1 MiB
        data = b"\x00"
    content_type = draw(st.sampled_from(CONTENT_TYPES))
    headers = {"Content-Type": content_type} if content_type is not None else None
    if draw(st.integers(0, 4)) == 0:
        rid = draw(st.text("abc-_\t\u00e9", max_size=150)) or "r"
        headers = {**(headers or {}), "Natserve-Request-Id": rid}
    return data, headers


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize("subject", MODEL_SUBJECTS)
@FUZZ
@given(body=bodies(inference_dicts))
def test_fuzz_model_subject(
    harness: Harness, subject: str, body: tuple[bytes, dict[str, str] | None]
) -> None:
    data, headers = body
    reply = harness.request(subject, data, headers)
    check_reply(reply, subject, data)
    # --hypothesis-show-statistics shows how many examples got past validation.
    event(f"code {(reply.headers or {}).get(ERROR_CODE_HEADER, '200')}")


def _silent_cancel(data: bytes, headers: dict[str, str] | None) -> bool:
    """A well-formed cancel for a request nobody holds gets no answer (other workers may hold it)."""
    try:
        body = decode(data, detect(data, headers))
    except Exception:
        return False
    return isinstance(body, dict) and isinstance(body.get("request_id"), str) and bool(body["request_id"])


@pytest.mark.parametrize("subject", CANCEL_SUBJECTS)
@FUZZ
@given(body=bodies(st.fixed_dictionaries({}, optional={"request_id": request_ids, "extra": anything})))
def test_fuzz_cancel(harness: Harness, subject: str, body: tuple[bytes, dict[str, str] | None]) -> None:
    data, headers = body
    if len(data) <= 900_000 and _silent_cancel(data, headers):
        harness.publish(subject, data, headers)  # by design no reply: nothing to wait for
        return
    check_reply(harness.request(subject, data, headers), subject, data)


@pytest.mark.parametrize("subject", WORKER_SUBJECTS)
@FUZZ
@given(data=st.data())
def test_fuzz_worker_subject(harness: Harness, subject: str, data: st.DataObject) -> None:
    keyed = launch_dicts if subject.endswith(".launch") else terminate_dicts
    raw, headers = data.draw(bodies(keyed))
    reply = harness.request(subject, raw, headers)
    check_reply(reply, subject, raw)
    if subject.endswith(".launch") and ERROR_CODE_HEADER not in (reply.headers or {}):
        # The fuzzer launched an echo replica: terminate it, so the worker's state stays small.
        uid = (
            json.loads(reply.data)["model_uid"]
            if reply.data.startswith(b"{")
            else msgpack.unpackb(reply.data)["model_uid"]
        )
        harness.request(S.worker(WORKER_ID, "terminate"), json.dumps({"model_uid": uid}).encode())


GEN_ECHO, GEN_TINY = S.model(ECHO, "generate"), S.model(TINY, "generate")
LAUNCH = S.worker(WORKER_ID, "launch")


def _launch(uid: str, uri: str, **extra: Any) -> bytes:
    return json.dumps(launch_message(uid, llm_definition(uid, uri, **extra))).encode()


@pytest.mark.parametrize(
    "subject,data",
    [
        (GEN_ECHO, b'{"prompt": "a", "generate_config": {"stop_token_ids": [-1, 99999999999]}}'),
        (GEN_TINY, b'{"prompt": "a", "generate_config": {"stop_token_ids": [-1, 99999999999]}}'),
        (GEN_TINY, b'{"prompt": "a", "generate_config": {"seed": 36893488147419103232}}'),
        (GEN_TINY, b'{"prompt": "a", "generate_config": {"seed": -1}}'),
        (GEN_TINY, b'{"prompt": "a", "generate_config": {"temperature": NaN}}'),
        (GEN_TINY, b'{"prompt": "a", "generate_config": {"temperature": Infinity}}'),
        (GEN_TINY, b'{"prompt": "a", "generate_config": {"temperature": 1e308}}'),
        (GEN_TINY, b'{"prompt": "a", "generate_config": {"top_p": NaN}}'),
        (GEN_TINY, b'{"prompt": "a", "generate_config": {"top_k": 99999999999999}}'),
        (GEN_TINY, b'{"prompt": "\\ud800\\udfff\\ud800"}'),
        (S.model(TINY, "chat"), b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
        (S.model(ECHO, "chat"), b'{"messages": [{"role": "user", "content": "{{ 7*7 }}"}]}'),
        (GEN_TINY, b'{"prompt": "", "generate_config": {"max_tokens": 8}}'),
        (GEN_TINY, b'{"prompt": "a", "generate_config": {"stop": ["a", "\\u0000"]}}'),
        (S.model(MINILM, "embed"), b'{"input": ["", "\\ud800", "' + b"x" * 50_000 + b'"]}'),
        (S.model(MINILM, "embed"), json.dumps({"input": ["w"] * 2049}).encode()),
        (GEN_TINY, json.dumps({"prompt": "x " * 400_000}).encode()),
        (LAUNCH, _launch("fzlx", "/etc")),
        (LAUNCH, _launch("fzly", "file:///etc/../../root")),
        (LAUNCH, _launch("fzlz", "echo:", trust_remote_code=True)),
        (LAUNCH, _launch(ECHO, "echo:")),  # taken: 409
        (S.worker(WORKER_ID, "terminate"), b'{"model_uid": "fzl-none", "replica_index": -1}'),
    ],
    ids=lambda v: v if isinstance(v, str) else f"{v[:40]!r}",
)
def test_pathological_requests(harness: Harness, subject: str, data: bytes) -> None:
    check_reply(harness.request(subject, data), subject, data)


def test_worker_still_serves_after_the_fuzzing(harness: Harness) -> None:
    async def idle() -> list[str]:
        busy = []
        for uid, served in harness.worker.models.items():
            for replica in served.replicas.values():
                # Streams whose readers left run to their (capped) end; then nothing is left.
                if not await replica.wait_idle(30) or replica.load:
                    busy.append(f"{uid}[{replica.replica_index}]: {replica.load} in flight")
        return busy

    assert harness.run(idle(), timeout=60) == []
    assert set(harness.worker.models) == {ECHO, TINY, MINILM}
    for uid, op, body in (
        (ECHO, "generate", {"prompt": "still here"}),
        (ECHO, "chat", {"messages": [{"role": "user", "content": "hi"}]}),
        (TINY, "generate", {"prompt": "SELECT", "generate_config": {"max_tokens": 4}}),
        (TINY, "chat", {"messages": [{"role": "user", "content": "hi"}]}),
        (MINILM, "embed", {"input": ["still", "here"]}),
    ):
        reply = harness.request(S.model(uid, op), json.dumps(body).encode())
        assert ERROR_CODE_HEADER not in (reply.headers or {}), (uid, op, reply.data[:500])
        assert json.loads(reply.data)["model"] == uid
    info = json.loads(harness.request(S.worker(WORKER_ID, "info"), b"").data)
    assert info["worker_id"] == WORKER_ID
    # Failed launches are recent errors (the fuzzer's were 4xx); a 500 must not be among them.
    assert [e for e in info["recent_errors"] if e["code"] == 500] == [], info["recent_errors"]
