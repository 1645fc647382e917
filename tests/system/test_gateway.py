"""The HTTP gateway end to end: one real ``natserve up`` (its own home, free ports) serving the
real SmolLM2-135M-Instruct and all-MiniLM-L6-v2, driven by the clients people use unchanged:
openai-python (sync, async, streaming), LangChain's ChatOpenAI, Xinference's RESTfulClient
running the README seed as written, curl-like raw HTTP for bad input, and a headless Chromium
for the pool page.

SmolLM2 is built once per machine by ``../shared/models/make_smollm2.py`` into
``~/.cache/natserve-test/smollm2`` (``NATSERVE_TEST_SMOLLM2`` elsewhere; the ``smollm2_dir``
fixture of tests/support/models.py). The seed's
``NumbersStation/nsql-2B`` is SmolLM2 too, installed in an offline Hugging Face cache under that
id, and the worker caps ``max_tokens`` at 64 (``NATSERVE_MAX_TOKENS_LIMIT``) so the seed's
stream without ``max_tokens`` ends soon.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import pytest

from broker_client import Client
from tests.support.cli import Running, assert_one_error_line, natserve
from tests.support.models import NSQL_REPO_ID, SMOLLM2_DIR, install_in_hf_cache, minilm_path
from tests.support.ports import free_port
from tests.support.waits import eventually_blocking

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux")]

T = TypeVar("T")

MAX_TOKENS_LIMIT = 64
CAPITAL: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the capital of France?"}]

# The README seed's definition, as written.
NSQL_2B = {
    "version": 1,
    "context_length": 2048,
    "model_name": "nsql-2B",
    "model_lang": ["en"],
    "model_ability": ["generate"],
    "model_specs": [
        {
            "model_format": "pytorch",
            "model_size_in_billions": 2,
            "quantizations": ["4-bit", "8-bit", "none"],
            "model_id": "NumbersStation/nsql-2B",
        }
    ],
    "prompt_style": None,
}
SEED_PROMPT = """CREATE TABLE stadium (stadium_id number, location text, name text, capacity number)

-- Using valid SQLite, answer the following questions for the tables provided above.

-- how many stadiums in total?

SELECT"""


def _llm(name: str, uri: Path) -> dict[str, Any]:
    return {
        "version": 1,
        "model_name": name,
        "model_lang": ["en"],
        "model_ability": ["generate", "chat"],
        "context_length": 2048,
        "model_specs": [
            {
                "model_format": "pytorch",
                "model_size_in_billions": 0.135,
                "quantizations": ["none"],
                "model_uri": str(uri),
            }
        ],
    }


@dataclass
class Pool:
    up: Running
    ready_line: str
    nats_url: str
    http: str  # http://127.0.0.1:PORT
    metrics: str
    env: dict[str, str]
    chat_uid: str
    embed_uid: str

    @property
    def v1(self) -> str:
        return f"{self.http}/v1"

    def scrape(self) -> str:
        with urllib.request.urlopen(self.metrics, timeout=10) as reply:
            return str(reply.read().decode())


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one series in a Prometheus text page (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and line.split(" ")[0] != name:
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[Pool]:
    tmp = tmp_path_factory.mktemp("gateway")
    hf = tmp / "hf"
    install_in_hf_cache(smollm2_dir, hf, NSQL_REPO_ID)
    nats_port, http_port, metrics_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATSERVE_")}
    env.update(
        NATSERVE_HOME=str(tmp / "home"),
        NATSERVE_MODEL_ROOTS=os.pathsep.join([str(smollm2_dir.resolve()), str(minilm_path().resolve())]),
        NATSERVE_MAX_TOKENS_LIMIT=str(MAX_TOKENS_LIMIT),
        NATSERVE_LOG_LEVEL="INFO",
        HF_HUB_CACHE=str(hf),
        HF_HUB_OFFLINE="1",
    )
    up = Running(
        [
            "up",
            "--port",
            str(nats_port),
            "--http-port",
            str(http_port),
            "--metrics-port",
            str(metrics_port),
            "--device",
            "cpu",
        ],
        env,
    )
    # This process is the pool's user: its clients find the pool's token in the same home.
    same_user = pytest.MonkeyPatch()
    same_user.setenv("NATSERVE_HOME", env["NATSERVE_HOME"])
    try:
        ready = up.wait_ready(timeout=90)
        nats_url = f"nats://127.0.0.1:{nats_port}"
        with Client(nats_url, timeout=300) as client:
            client.register_model("LLM", json.dumps(_llm("smollm2", smollm2_dir.resolve())))
            chat_uid = client.launch_model(model_name="smollm2", progress=False)
            client.register_model(
                "embedding",
                json.dumps(
                    {
                        "model_name": "minilm",
                        "dimensions": 384,
                        "max_tokens": 256,
                        "model_uri": str(minilm_path()),
                    }
                ),
            )
            embed_uid = client.launch_model(model_name="minilm", model_type="embedding", progress=False)
        yield Pool(
            up,
            ready,
            nats_url,
            f"http://127.0.0.1:{http_port}",
            f"http://127.0.0.1:{metrics_port}/metrics",
            env,
            chat_uid,
            embed_uid,
        )
        stopping = time.monotonic()
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(timeout=60) == 0, "".join(up.stderr[-30:])
        print(f"natserve up stopped in {time.monotonic() - stopping:.1f} s:", "".join(up.stderr[-12:]))
        assert "Traceback" not in "".join(up.stderr), "".join(up.stderr[-60:])
    finally:
        up.kill()
        same_user.undo()


# ---------------------------------------------------------------------------- natserve up and the CLI


def test_the_ready_line_names_the_gateway(pool: Pool) -> None:
    assert f"HTTP gateway on {pool.http}" in pool.ready_line and f"{pool.http}/v1" in pool.ready_line
    assert pool.nats_url in pool.ready_line


def test_a_taken_http_port_stops_natserve_up_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        nats_port = free_port()
        result = natserve("up", "--port", str(nats_port), "--http-port", str(port), tmp_path=tmp_path)
        line = assert_one_error_line(result, code=2)
        assert f"port {port} on 127.0.0.1 is already in use" in line
        assert "natserve up --http-port " in line and "natserve up --no-http" in line
        assert not (tmp_path / "home" / "nats-server.log").exists()  # no nats-server was started
        line = assert_one_error_line(natserve("gateway", "--port", str(port), tmp_path=tmp_path), code=2)
        assert "natserve gateway --port " in line


# ---------------------------------------------------------------------------- OpenAI's clients


def test_openai_sync_client(pool: Pool) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=pool.v1, api_key="unused", max_retries=0)
    models = {m.id: m for m in client.models.list()}
    assert {pool.chat_uid, pool.embed_uid} <= set(models)
    assert client.models.retrieve(pool.chat_uid).owned_by == "natserve"

    answer = client.chat.completions.create(
        model=pool.chat_uid, messages=CAPITAL, max_tokens=16, temperature=0
    )
    assert answer.object == "chat.completion" and answer.choices[0].message.role == "assistant"
    assert "Paris" in (answer.choices[0].message.content or "")
    assert answer.usage is not None and 0 < answer.usage.completion_tokens <= 16

    completion = client.completions.create(
        model=pool.chat_uid,
        prompt="SELECT name FROM",
        max_tokens=6,
        stop=["\n\n"],
        temperature=0,
        user="tests",
    )
    assert completion.object == "text_completion" and completion.choices[0].text
    assert completion.usage is not None and completion.usage.completion_tokens <= 6


def test_openai_streams_end_with_the_usage_when_asked(pool: Pool) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=pool.v1, api_key="unused", max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model=pool.chat_uid,
            messages=CAPITAL,
            max_completion_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert all(c.usage is None for c in chunks[:-1])
    assert (
        chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 12
    )

    plain = list(client.completions.create(model=pool.chat_uid, prompt="1, 2, 3,", max_tokens=5, stream=True))
    assert (
        plain
        and all(c.usage is None for c in plain)
        and plain[-1].choices[0].finish_reason in ("stop", "length")
    )


async def test_openai_async_client(pool: Pool) -> None:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=pool.v1, api_key="unused", max_retries=0)
    try:
        answer = await client.chat.completions.create(
            model=pool.chat_uid, messages=CAPITAL, max_tokens=16, temperature=0
        )
        assert "Paris" in (answer.choices[0].message.content or "")
        stream = await client.completions.create(
            model=pool.chat_uid, prompt="The sky is", max_tokens=5, stream=True
        )
        texts = [chunk.choices[0].text async for chunk in stream]
        assert "".join(texts)
    finally:
        await client.close()


def test_openai_embeddings_float_and_base64(pool: Pool) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=pool.v1, api_key="unused", max_retries=0)
    # openai-python asks for base64 whenever numpy is installed, and decodes it itself.
    by_default = client.embeddings.create(model=pool.embed_uid, input=["natserve", "a pool of workers"])
    as_floats = client.embeddings.create(
        model=pool.embed_uid, input=["natserve", "a pool of workers"], encoding_format="float"
    )
    assert [len(d.embedding) for d in by_default.data] == [384, 384]
    for a, b in zip(by_default.data, as_floats.data, strict=True):
        assert max(abs(x - y) for x, y in zip(a.embedding, b.embedding, strict=True)) < 1e-6
    raw = httpx.post(
        f"{pool.v1}/embeddings",
        json={"model": pool.embed_uid, "input": "natserve", "encoding_format": "base64"},
    ).json()
    assert (
        isinstance(raw["data"][0]["embedding"], str)
        and len(base64.b64decode(raw["data"][0]["embedding"])) == 384 * 4
    )


def test_langchain_chat_openai(pool: Pool) -> None:
    from langchain_openai import ChatOpenAI
    from pydantic import SecretStr

    llm = ChatOpenAI(
        base_url=pool.v1,
        api_key=SecretStr("unused"),
        model=pool.chat_uid,
        max_completion_tokens=16,
        temperature=0,
    )
    assert "Paris" in str(llm.invoke("What is the capital of France?").content)
    pieces = [str(chunk.content) for chunk in llm.stream("What is the capital of France?")]
    assert len(pieces) > 1 and "Paris" in "".join(pieces)


# ---------------------------------------------------------------------------- Xinference's client


def test_the_readme_seed_through_xinference_client(pool: Pool) -> None:
    # The seed as the README writes it, but for its import and the gateway's URL.
    from xinference_client import RESTfulClient as Client

    client = Client(pool.http)
    client.register_model(model_type="LLM", model=json.dumps(NSQL_2B), persist=False)
    uid = client.launch_model(model_name="nsql-2B", quantization="4-bit")
    model = client.get_model(model_uid=uid)

    text = SEED_PROMPT
    completion = model.generate(prompt=text, generate_config={"max_tokens": 64})
    assert completion["object"] == "text_completion" and completion["choices"][0]["text"]
    streamed = [
        chunk["choices"][0]["text"] for chunk in model.generate(prompt=text, generate_config={"stream": True})
    ]
    assert len(streamed) > 1 and "".join(streamed)

    assert uid in client.list_models()
    description = client.describe_model(model_uid=uid)
    assert description["model_type"] == "LLM" and description["model_ability"] == ["generate"]
    assert description["quantization"] == "4-bit"
    assert any(r["model_name"] == "nsql-2B" for r in client.list_model_registrations(model_type="LLM"))
    assert client.get_model_registration(model_type="LLM", model_name="nsql-2B")["model_name"] == "nsql-2B"
    client.terminate_model(model_uid=uid)
    client.unregister_model(model_type="LLM", model_name="nsql-2B")
    assert uid not in client.list_models()
    with pytest.raises(RuntimeError, match="is not running"):
        client.describe_model(model_uid=uid)


# ---------------------------------------------------------------------------- bad input


def test_bad_input_is_an_openai_error_naming_the_problem(pool: Pool) -> None:
    url = f"{pool.v1}/chat/completions"
    messages = [{"role": "user", "content": "hi"}]

    def error(response: httpx.Response, status: int) -> dict[str, Any]:
        assert response.status_code == status, response.text
        body = response.json()
        assert set(body["error"]) == {"message", "type", "param", "code"} and response.headers["x-request-id"]
        return dict(body["error"])

    wrong_type = error(
        httpx.post(url, json={"model": pool.chat_uid, "messages": messages, "temperature": "hot"}), 400
    )
    assert wrong_type["param"] == "temperature" and "temperature" in wrong_type["message"]
    missing = error(httpx.post(url, json={"model": pool.chat_uid}), 400)
    assert missing["param"] == "messages" and "required" in missing["message"]
    unknown = error(httpx.post(url, json={"model": "no-such-model", "messages": messages}), 404)
    assert unknown["code"] == "model_not_found" and "no-such-model" in unknown["message"]
    unsupported = error(
        httpx.post(url, json={"model": pool.chat_uid, "messages": messages, "suffix": "!"}), 400
    )
    assert unsupported["param"] == "suffix" and unsupported["code"] == "unsupported_parameter"
    out_of_range = error(httpx.post(url, json={"model": pool.chat_uid, "messages": messages, "n": 17}), 400)
    assert out_of_range["param"] == "n" and "17" in out_of_range["message"]
    not_json = error(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert not_json["code"] == "invalid_json"
    started = time.monotonic()
    huge = error(httpx.post(url, content=b"x" * (20 * 1024 * 1024), timeout=60), 400)
    assert huge["code"] == "payload_too_large" and str(8 * 1024 * 1024) in huge["message"]
    print(f"a 20 MB body was refused in {time.monotonic() - started:.2f} s")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the gateway counts as it reads
        for _ in range(10):
            yield b"x" * (1024 * 1024)

    chunked = error(httpx.post(url, content=chunks(), timeout=60), 400)
    assert chunked["code"] == "payload_too_large"
    no_route = error(httpx.get(f"{pool.v1}/nothing-here"), 404)
    assert "/v1/nothing-here" in no_route["message"]
    # The pool still serves.
    ok = httpx.post(url, json={"model": pool.chat_uid, "messages": messages, "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_request_ids_come_back(pool: Pool) -> None:
    body = {"model": pool.chat_uid, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    given = httpx.post(
        f"{pool.v1}/chat/completions", json=body, headers={"X-Request-Id": "trace-42"}, timeout=60
    )
    assert given.status_code == 200 and given.headers["x-request-id"] == "trace-42"
    made = httpx.post(f"{pool.v1}/chat/completions", json=body, timeout=60)
    assert made.headers["x-request-id"].startswith("gw-")
    bad = httpx.post(f"{pool.v1}/chat/completions", json=body, headers={"X-Request-Id": "x" * 200})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Request-Id"


def test_a_client_leaving_mid_stream_stops_the_generation(pool: Pool) -> None:
    before = pool.scrape()
    cancelled = _metric(before, "natserve_replica_cancelled_total", model_uid=pool.chat_uid)
    left = _metric(before, "natserve_gateway_requests_total", route="chat_completions", code="499")
    body = json.dumps(
        {
            "model": pool.chat_uid,
            "messages": [{"role": "user", "content": "Count from one to one hundred, in words."}],
            "max_tokens": MAX_TOKENS_LIMIT,
            "temperature": 0,
            "stream": True,
        }
    ).encode()
    port = int(pool.http.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        conn.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        received = b""
        while received.count(b"data: ") < 3:  # the role chunk and two tokens
            chunk = conn.recv(65536)
            assert chunk, received
            received += chunk
        assert b"200 OK" in received and b"text/event-stream" in received
    # The socket is closed: the gateway cancels the stream and the replica stops generating.
    after = eventually_blocking(
        lambda: (
            (text := pool.scrape())
            and _metric(text, "natserve_replica_cancelled_total", model_uid=pool.chat_uid) > cancelled
            and text
        ),
        "the replica to count a cancelled request",
    )
    assert isinstance(after, str)
    assert _metric(after, "natserve_gateway_requests_total", route="chat_completions", code="499") == left + 1
    assert _metric(after, "natserve_gateway_streams", route="chat_completions") == 0


# ---------------------------------------------------------------------------- keys, metrics, the page


def test_api_keys_on_a_gateway_of_its_own(pool: Pool, tmp_path: Path) -> None:
    from openai import AuthenticationError, OpenAI
    from xinference_client import RESTfulClient

    port = free_port()
    keys = tmp_path / "keys"
    keys.write_text("# one key a line\nk-file\n")
    env = {
        **pool.env,
        "NATSERVE_NATS_URL": pool.nats_url,
        "NATSERVE_API_KEYS": "k-env",
        "NATSERVE_API_KEYS_FILE": str(keys),
    }
    gateway = Running(["gateway", "--port", str(port)], env)
    try:
        ready = gateway.wait_ready(timeout=60)
        base = f"http://127.0.0.1:{port}"
        assert f"natserve gateway ready on {base}" in ready and pool.nats_url in ready
        messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
        missing = httpx.post(
            f"{base}/v1/chat/completions", json={"model": pool.chat_uid, "messages": messages}
        )
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
        client = OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(AuthenticationError) as caught:
            client.chat.completions.create(model=pool.chat_uid, messages=messages, max_tokens=2)
        assert caught.value.status_code == 401
        for key in ("k-env", "k-file"):
            client = OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
            assert client.chat.completions.create(
                model=pool.chat_uid, messages=messages, max_tokens=2
            ).choices
        assert httpx.get(f"{base}/v1/cluster/auth").json() == {"auth": True}
        assert pool.chat_uid in RESTfulClient(base, api_key="k-env").list_models()
        page = httpx.get(f"{base}/")
        assert page.status_code == 401 and page.headers["www-authenticate"].startswith("Basic")
        assert httpx.get(f"{base}/", auth=("operator", "k-file")).status_code == 200
        gateway.proc.send_signal(signal.SIGTERM)
        assert gateway.proc.wait(timeout=30) == 0
    finally:
        gateway.kill()


def test_gateway_metrics(pool: Pool) -> None:
    httpx.get(f"{pool.v1}/models")
    text = pool.scrape()
    assert _metric(text, "natserve_gateway_requests_total", route="list_models", code="200") >= 1
    assert _metric(text, "natserve_gateway_requests_total", route="chat_completions", code="200") >= 1
    assert "natserve_gateway_request_duration_seconds_bucket" in text
    # The registry's and the worker's series share the endpoint, as natserve up serves them.
    assert "natserve_worker_requests_total" in text and "natserve_registry_requests_total" in text


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


def test_the_pool_page_in_a_real_browser(pool: Pool, tmp_path: Path) -> None:
    chromium = _chromium()
    # A failed launch, so that the page has a recent error to show.
    with Client(pool.nats_url, timeout=60) as client:
        client.register_model("LLM", json.dumps(_llm("broken", SMOLLM2_DIR.resolve() / "missing")))
        with pytest.raises(Exception) as failed:
            client.launch_model(model_name="broken", progress=False)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"]
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run(
        [chromium, *flags, *profile, "--dump-dom", f"{pool.http}/"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert "<title>natserve pool</title>" in html and 'http-equiv="refresh"' in html
    assert "1 of 1 worker(s) alive" in html
    [worker] = Client(pool.nats_url).list_workers()
    for shown in (worker["worker_id"], pool.chat_uid, pool.embed_uid, "cpu", "ready", "GiB", "Recent errors"):
        assert shown in html, shown
    # The failed launch, among the recent errors.
    errors = html[html.index('id="errors"') :]
    assert "broken" in errors and " ".join(str(failed.value).split())[:30] in " ".join(errors.split())
    shot = Path(os.environ.get("NATSERVE_TEST_SCREENSHOT", tmp_path / "pool.png"))
    taken = subprocess.run(
        [
            chromium,
            *flags,
            *profile,
            f"--screenshot={shot}",
            "--window-size=1400,1200",
            f"{pool.http}/?refresh=0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert taken.returncode == 0 and shot.stat().st_size > 10_000, taken.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
