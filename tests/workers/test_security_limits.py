"""The worker's policy: trust_remote_code needs both switches, model paths stay in their roots,
and the per-replica limits (max_tokens cap, request body size, request rate).

Pure parts (the token bucket, the path check) are tested on their own; the rest against a real
nats-server and an in-process worker, and once through the registry and the client.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from broker_client import AsyncClient, BadRequest, NotFound, Overloaded, PayloadTooLarge
from natserve.embedded import worker_limits
from natserve.settings import Settings
from tests.support.waits import within
from tests.support.worker import llm_definition, running_harness
from workers import WorkerSettings
from workers.limits import (
    ReplicaLimits,
    TokenBucket,
    WorkerLimits,
    check_model_uri,
    default_model_roots,
    parse_model_roots,
)

# ----------------------------------------------------------------------------- pure parts


def test_token_bucket_refills_at_its_rate() -> None:
    now = [100.0]
    bucket = TokenBucket(2.0, clock=lambda: now[0])
    assert bucket.burst == 2.0
    assert bucket.take() == 0.0 and bucket.take() == 0.0
    assert bucket.take() == pytest.approx(0.5)  # empty: one token in half a second
    now[0] += 0.25
    assert bucket.take() == pytest.approx(0.25)
    now[0] += 0.25
    assert bucket.take() == 0.0
    now[0] += 60  # a long idle time saves up no more than the burst
    assert [bucket.take() for _ in range(3)][:2] == [0.0, 0.0]
    slow = TokenBucket(0.1, clock=lambda: now[0])
    assert slow.burst == 1.0 and slow.take() == 0.0 and slow.take() == pytest.approx(10.0)
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            TokenBucket(bad)


def test_replica_limits_messages() -> None:
    limits = ReplicaLimits(max_tokens=8, rate_limit=0.001)
    limits.check_max_tokens(8, "model 'm' replica 0")
    limits.check_max_tokens(None, "model 'm' replica 0")
    with pytest.raises(BadRequest, match=r"max_tokens 9 is above the max_tokens limit of .* 0 \(8\)"):
        limits.check_max_tokens(9, "model 'm' replica 0")
    limits.admit("r")
    with pytest.raises(Overloaded, match=r"over its rate limit of 0\.001 requests/s; retry in"):
        limits.admit("r")
    ReplicaLimits().admit("r")  # no limit: never refuses


def test_worker_limits_cap_the_launch_options() -> None:
    worker = WorkerLimits(max_tokens_limit=100, rate_limit=5)
    assert worker.for_replica(max_tokens_limit=None, rate_limit=None) == ReplicaLimits(100, 5)
    assert worker.for_replica(max_tokens_limit=10, rate_limit=50) == ReplicaLimits(10, 5)
    assert worker.for_replica(max_tokens_limit=1000, rate_limit=0.5) == ReplicaLimits(100, 0.5)
    assert WorkerLimits().for_replica(max_tokens_limit=None, rate_limit=None) == ReplicaLimits()
    with pytest.raises(ValueError):
        WorkerLimits(rate_limit=0)
    with pytest.raises(ValueError):
        WorkerLimits(max_request_bytes=0)
    with pytest.raises(PayloadTooLarge, match=r"1001 bytes on 'a\.b' is above this worker's limit of 1000"):
        WorkerLimits(max_request_bytes=1000).check_body(1001, "a.b")
    WorkerLimits(max_request_bytes=1000).check_body(1000, "a.b")


def test_model_uri_confined_to_roots(tmp_path: Path) -> None:
    root = tmp_path / "models"
    (root / "llama").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    roots = (root,)
    assert check_model_uri(f"file://{root}/llama", roots) == (root / "llama").resolve()
    assert check_model_uri(str(root / "llama"), roots) == (root / "llama").resolve()
    assert check_model_uri(f"file://{root}", roots) == root.resolve()
    # Nothing is confined without roots (the library default).
    assert check_model_uri(str(outside), None) == outside.resolve()

    for uri in (
        str(outside),
        f"file://{outside}",
        f"file://{root}/../elsewhere",  # traversal
        f"file://{root}/llama/../../elsewhere",
        f"{root}/../../../../etc",
        f"file://{root}x",  # a sibling sharing the prefix is not inside
    ):
        with pytest.raises(BadRequest) as info:
            check_model_uri(uri, roots, where="worker 'w1'")
        message = info.value.message
        assert repr(uri) in message and str(root.resolve()) in message, message
        assert "NATSERVE_MODEL_ROOTS" in message and "worker 'w1'" in message

    # A symlink inside a root that points out of it is followed, and refused.
    (root / "escape").symlink_to(outside, target_is_directory=True)
    with pytest.raises(BadRequest, match="outside the model roots"):
        check_model_uri(f"file://{root}/escape", roots)
    # A root that is itself a symlink still holds what is under its target.
    linked_root = tmp_path / "linked"
    linked_root.symlink_to(root, target_is_directory=True)
    assert check_model_uri(f"{linked_root}/llama", (linked_root,)) == (root / "llama").resolve()


def test_parse_model_roots_and_the_cli_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_model_roots(None) is None
    assert parse_model_roots(f"/a{os.pathsep}~/b{os.pathsep}") == (Path("/a"), Path("~/b").expanduser())
    with pytest.raises(ValueError):
        parse_model_roots(os.pathsep)

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    for name in ("NATSERVE_MODEL_ROOTS", "NATSERVE_ALLOW_REMOTE_CODE", "NATSERVE_RATE_LIMIT"):
        monkeypatch.delenv(name, raising=False)
    limits = worker_limits(Settings(home=tmp_path / "home"))
    assert limits.model_roots == default_model_roots(tmp_path / "home")
    assert limits.model_roots == (tmp_path / "home" / "models", tmp_path / "hf")
    assert limits.allow_remote_code is False and limits.rate_limit is None

    monkeypatch.setenv("NATSERVE_MODEL_ROOTS", f"/srv/models{os.pathsep}/data/hf")
    monkeypatch.setenv("NATSERVE_ALLOW_REMOTE_CODE", "1")
    monkeypatch.setenv("NATSERVE_MAX_TOKENS_LIMIT", "512")
    monkeypatch.setenv("NATSERVE_RATE_LIMIT", "2.5")
    monkeypatch.setenv("NATSERVE_MAX_REQUEST_BYTES", "65536")
    limits = worker_limits(Settings())
    assert limits == WorkerLimits(
        allow_remote_code=True,
        model_roots=(Path("/srv/models"), Path("/data/hf")),
        max_tokens_limit=512,
        rate_limit=2.5,
        max_request_bytes=65536,
    )


def test_cli_flags_reach_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from natserve.cli import _settings, build_parser

    monkeypatch.delenv("NATSERVE_ALLOW_REMOTE_CODE", raising=False)
    args = build_parser().parse_args(
        [
            "worker",
            "--allow-remote-code",
            "--model-roots",
            "/m",
            "--max-tokens-limit",
            "64",
            "--rate-limit",
            "3",
            "--max-request-bytes",
            "4096",
            "--metrics-port",
            "9464",
            "--log-format",
            "json",
        ]
    )
    settings = _settings(args)
    assert settings.allow_remote_code is True and settings.model_roots == "/m"
    assert settings.max_tokens_limit == 64 and settings.rate_limit == 3.0
    assert settings.max_request_bytes == 4096 and settings.metrics_port == 9464
    assert settings.log_format == "json"
    assert _settings(build_parser().parse_args(["worker"])).allow_remote_code is False


# ----------------------------------------------------------------------------- with a worker


@pytest.fixture
def prefix(unique: str) -> str:
    return f"sec{unique}"


async def test_trust_remote_code_needs_both_switches(
    nats_url: str, prefix: str, unique: str, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import workers.loading

    seen: list[bool] = []
    real_load = workers.loading.load_llm

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["trust_remote_code"])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(workers.loading, "load_llm", spy)
    asking = llm_definition("remote", str(tiny_llama_dir), trust_remote_code=True)

    async with running_harness(nats_url, prefix, limits=WorkerLimits()) as h:
        with pytest.raises(BadRequest) as info:
            await h.launch(f"rc-{unique}", asking)
        message = info.value.message
        assert "trust_remote_code: true" in message
        assert "NATSERVE_ALLOW_REMOTE_CODE=1" in message and "--allow-remote-code" in message
        assert h.worker.worker_id in message
        assert seen == [], "the model must not be loaded at all"
        assert not h.worker.models
        # A definition that does not ask loads with it off.
        await h.launch(f"plain-{unique}", llm_definition("plain", str(tiny_llama_dir)))
        assert seen == [False]

    async with running_harness(nats_url, prefix + "b", limits=WorkerLimits(allow_remote_code=True)) as h:
        await h.launch(f"rc-{unique}", asking)
        assert seen == [False, True]
        await h.launch(f"plain-{unique}", llm_definition("plain", str(tiny_llama_dir)))
        assert seen == [False, True, False], "the worker's switch alone turns nothing on"


async def test_model_uri_outside_the_roots_is_refused(
    nats_url: str, prefix: str, unique: str, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    root.mkdir()
    (root / "link").symlink_to(tiny_llama_dir, target_is_directory=True)
    async with running_harness(nats_url, prefix, limits=WorkerLimits(model_roots=(root,))) as h:
        for uri in (
            f"file://{tiny_llama_dir}",
            # Up and out of the root, down into the real model: resolves outside.
            "file://" + str(root) + "/.." * len(root.parts) + str(tiny_llama_dir),
            f"file://{root}/link",
            f"{root}/../../../../../etc",
        ):
            with pytest.raises(BadRequest) as info:
                await h.launch(f"out-{unique}", llm_definition("out", uri))
            assert repr(uri) in info.value.message and str(root.resolve()) in info.value.message
        # A missing path inside the roots is still the loader's 404, and echo is no path.
        with pytest.raises(NotFound):
            await h.launch(f"missing-{unique}", llm_definition("missing", f"file://{root}/nothing"))
        await h.launch(f"echo-{unique}", llm_definition("echo", "echo:"))

    # The model's own folder as a root: it loads.
    async with running_harness(
        nats_url, prefix + "b", limits=WorkerLimits(model_roots=(tiny_llama_dir.parent,))
    ) as h:
        reply = await h.launch(f"in-{unique}", llm_definition("in", f"file://{tiny_llama_dir}"))
        assert reply["memory_bytes"] > 0


async def test_max_tokens_cap_body_size_and_rate_limit(nats_url: str, prefix: str, unique: str) -> None:
    limits = WorkerLimits(max_tokens_limit=6, max_request_bytes=2000)
    async with running_harness(nats_url, prefix, limits=limits) as h:
        words = " ".join(f"w{i}" for i in range(50))
        uid = f"capped-{unique}"
        template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
        await h.launch(
            uid,
            llm_definition("echo", "echo:", context_length=1000, chat_template=template),
            max_tokens_limit=4,
        )
        # The launch option (4) is below the worker's (6): 4 wins, and is the default too.
        reply = await h.call(uid, "generate", {"prompt": words})
        assert reply["usage"]["completion_tokens"] == 4
        await h.call(uid, "generate", {"prompt": words, "generate_config": {"max_tokens": 4}})
        with pytest.raises(BadRequest, match=r"max_tokens 5 is above the max_tokens limit of model .* \(4\)"):
            await h.call(uid, "generate", {"prompt": words, "generate_config": {"max_tokens": 5}})
        with pytest.raises(BadRequest, match=r"limit of .* \(4\)"):
            await h.call(
                uid,
                "chat",
                {"messages": [{"role": "user", "content": "hi"}], "generate_config": {"max_tokens": 100}},
            )

        # The worker's own cap (6) applies to a launch asking for more.
        loose = f"loose-{unique}"
        await h.launch(loose, llm_definition("echo", "echo:", context_length=1000), max_tokens_limit=500)
        with pytest.raises(BadRequest, match=r"\(6\)"):
            await h.call(loose, "generate", {"prompt": words, "generate_config": {"max_tokens": 7}})

        # Bodies above the worker's limit: a 400 naming the limit, before any decoding.
        for op, body in (
            ("generate", {"prompt": "x" * 3000}),
            ("chat", {"messages": [{"role": "user", "content": "x" * 3000}]}),
            ("cancel", {"request_id": "x" * 3000}),
        ):
            with pytest.raises(PayloadTooLarge, match="above this worker's limit of 2000 bytes"):
                await h.call(uid, op, body)
        msg = await h.nc.request(h.subjects.model(uid, "generate"), b"\xc1" * 2001, timeout=10)
        assert msg.headers and msg.headers["Nats-Service-Error-Code"] == "400"
        assert b"2000 bytes" in msg.data

        # One request per 100 s, a burst of one: the second is a 429 naming the limit.
        slow = f"slow-{unique}"
        await h.launch(slow, llm_definition("echo", "echo:"), rate_limit=0.01)
        await h.call(slow, "generate", {"prompt": "a b"})
        with pytest.raises(Overloaded) as info:
            await h.call(slow, "generate", {"prompt": "a b"})
        assert "rate limit of 0.01 requests/s" in info.value.message and slow in info.value.message
        # Other models are not affected, and the limited replica still answers after it refills.
        await h.call(uid, "generate", {"prompt": "a b"})
        replica = h.worker.models[slow].replicas[0]
        assert replica.limits.rate_limit == 0.01 and replica.errors == 0


async def test_limits_pass_through_the_registry(nats_url: str, sqlite_url: str, unique: str) -> None:
    from registry_service.app import run_registry
    from workers.app import run_worker

    prefix = f"sl{unique}"
    stop = asyncio.Event()
    ready = [asyncio.Event(), asyncio.Event()]
    tasks = [
        asyncio.create_task(
            run_registry(nats_url=nats_url, db_url=sqlite_url, prefix=prefix, stop=stop, ready=ready[0])
        ),
        asyncio.create_task(
            run_worker(WorkerSettings(nats_url, prefix=prefix, device="cpu"), stop=stop, ready=ready[1])
        ),
    ]
    client = AsyncClient(nats_url, prefix=prefix, timeout=60)
    try:
        await within(asyncio.gather(*(e.wait() for e in ready)), "registry and worker", 60)
        await client.register_model(model_type="LLM", model=llm_definition("lim", "echo:"))
        uid = await client.launch_model(
            model_name="lim", model_uid=f"lim-{unique}", max_tokens_limit=2, rate_limit=0.01, progress=False
        )
        model: Any = await client.get_model(model_uid=uid)
        reply = await model.generate("one two three four")
        assert reply["usage"]["completion_tokens"] == 2
        with pytest.raises(Overloaded, match="rate limit"):
            await model.generate("one two three four")
        with pytest.raises(BadRequest, match="rate_limit"):
            await client.launch_model(model_name="lim", model_uid=f"bad-{unique}", rate_limit=-1)
    finally:
        await client.close()
        stop.set()
        await within(asyncio.gather(*tasks), "registry and worker to stop", 60)
