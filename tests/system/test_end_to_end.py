"""The core issue's promises through the whole system: client -> NATS -> registry -> worker.

``natserve up`` as a real process for restart persistence; an in-process registry and worker
(the ``system`` fixture) for the bad inputs, each of which must give a typed 4xx that names
the problem while the system keeps serving.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import nats
import pytest

from broker_client import (
    AsyncClient,
    BadRequest,
    Client,
    Conflict,
    NatserveError,
    NotFound,
)
from broker_client.runtime import NatsTransport
from tests.support.cli import Running, cli_env
from tests.support.handles import completed, generating, streamed
from tests.support.models import NSQL_REPO_ID
from tests.support.ports import free_port
from tests.support.waits import eventually, within
from tests.support.worker import llm_definition


def _seed(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "context_length": 2048,
        "model_name": name,
        "model_lang": ["en"],
        "model_ability": ["generate"],
        "model_specs": [
            {
                "model_format": "pytorch",
                "model_size_in_billions": 2,
                "quantizations": ["none"],
                **spec,
            }
        ],
    }


@pytest.mark.slow
def test_persist_survives_restarting_up_and_ephemeral_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``persist=True`` survives a restart of the whole system on the same home; False does not."""
    port = free_port()
    env = cli_env(tmp_path)
    # This process is the same user's client: it finds the pool's token in the same home.
    monkeypatch.setenv("NATSERVE_HOME", env["NATSERVE_HOME"])
    url = f"nats://127.0.0.1:{port}"
    for round_ in (1, 2):
        up = Running(["up", "--port", str(port), "--device", "cpu", "--no-http"], env)
        try:
            up.wait_ready(timeout=60)
            with Client(url, timeout=60) as client:
                names = {r["model_name"] for r in client.list_model_registrations("LLM")}
                if round_ == 1:
                    assert names == set()
                    client.register_model(
                        model_type="LLM", model=json.dumps(_seed("kept", model_uri="echo:")), persist=True
                    )
                    client.register_model(
                        model_type="LLM", model=json.dumps(_seed("gone", model_uri="echo:")), persist=False
                    )
                    assert {r["model_name"] for r in client.list_model_registrations("LLM")} == {
                        "kept",
                        "gone",
                    }
                else:
                    assert names == {"kept"}, names
                    # The kept definition is whole, and launches after the restart.
                    registration = client.get_model_registration(model_type="LLM", model_name="kept")
                    assert registration["model_specs"][0]["model_uri"] == "echo:"
                    uid = client.launch_model(model_name="kept", progress=False)
                    reply = generating(client.get_model(model_uid=uid)).generate(prompt="still here")
                    assert isinstance(reply, dict) and reply["choices"][0]["text"]
            up.proc.send_signal(signal.SIGINT)
            assert up.proc.wait(timeout=40) == 0, "".join(up.stderr[-30:])
        finally:
            up.kill()


async def test_seed_by_model_uri_through_the_system(
    system: AsyncClient,
    tiny_llama_dir: Path,
    unique: str,
) -> None:
    """The seed walkthrough with the model given as a ``file://`` model_uri."""
    name = f"nsql-uri-{unique}"
    await system.register_model(
        model_type="LLM", model=json.dumps(_seed(name, model_uri=f"file://{tiny_llama_dir}")), persist=False
    )
    uid = await system.launch_model(model_name=name, progress=False)
    model = generating(await system.get_model(model_uid=uid))
    completion = completed(
        await model.generate(prompt="SELECT", generate_config={"max_tokens": 5, "seed": 1})
    )
    assert completion["object"] == "text_completion"
    usage = completion["usage"]
    assert usage["prompt_tokens"] > 0 and 1 <= usage["completion_tokens"] <= 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert completion["choices"][0]["finish_reason"] in ("stop", "length")
    await system.terminate_model(model_uid=uid)


async def test_bad_inputs_get_4xx_naming_the_problem_and_the_system_keeps_serving(
    system: AsyncClient,
    tiny_llama_dir: Path,
    hf_cache: Path,
    unique: str,
    nats_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prefix = system.prefix
    name = f"ok-{unique}"
    await system.register_model(
        model_type="LLM", model=llm_definition(name, f"file://{tiny_llama_dir}"), persist=False
    )
    uid = await system.launch_model(model_name=name, progress=False)
    model = generating(await system.get_model(model_uid=uid))

    # Raw requests, as another service or `nats req` would send them.
    nc = await nats.connect(nats_url)
    try:

        async def raw(subject: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[str, str]:
            msg = await nc.request(f"{prefix}.{subject}", body, timeout=30, headers=headers)
            assert msg.headers is not None, f"{subject}: a reply without headers: {msg.data!r}"
            code = msg.headers.get("Nats-Service-Error-Code", "")
            return code, msg.headers.get("Nats-Service-Error", "")

        code, text = await raw("registry.register", b'{"model_type": "LLM", "model": ')
        assert code == "400" and "JSON" in text
        code, text = await raw(
            "registry.register", b"\xc1\xc1garbage", headers={"Content-Type": "application/msgpack"}
        )
        assert code == "400" and "msgpack" in text
        code, text = await raw(
            f"model.{uid}.generate", b'{"prompt": "x", "generate_config": {"max_token": 2}}'
        )
        assert code == "400" and "max_token" in text
        code, text = await raw(f"model.{uid}.generate", b"\x93garbage")
        assert code == "400" and "msgpack" in text
    finally:
        await nc.close()

    bad_definitions: dict[str, tuple[dict[str, Any], str]] = {
        "a name with a space": ({"model_name": "my model"}, "model_name"),
        "a name with a dot": ({"model_name": "my.model"}, "model_name"),
        "an unknown ability": ({"model_ability": ["generate", "fly"]}, "fly"),
    }
    for label, (change, named) in bad_definitions.items():
        definition = _seed(f"bad-{unique}", model_uri="echo:") | change
        with pytest.raises(BadRequest, match=named):
            await system.register_model(model_type="LLM", model=json.dumps(definition))
        # Also past the client's own check, straight at the registry.
        reply = await _raw_register(system, definition)
        assert reply[0] == "400" and named in reply[1], label
    neither = _seed(f"neither-{unique}")
    with pytest.raises(BadRequest, match="model_id"):
        await system.register_model(model_type="LLM", model=json.dumps(neither))

    with pytest.raises(Conflict, match=name):
        await system.register_model(model_type="LLM", model=llm_definition(name, f"file://{tiny_llama_dir}"))
    with pytest.raises(NotFound, match=f"never-{unique}"):
        await system.launch_model(model_name=f"never-{unique}", progress=False)
    with pytest.raises(BadRequest, match="max_tokens"):
        await model.generate(prompt="x", generate_config={"max_tokens": 0})

    started = time.monotonic()
    ghost = await _handle_for_unknown_uid(system, f"ghost-{unique}")
    with pytest.raises(NatserveError) as caught:
        await ghost.generate(prompt="anyone?", timeout=10)
    assert isinstance(caught.value, NotFound), repr(caught.value)
    assert time.monotonic() - started < 10, "an unknown uid must fail fast, not hang"

    # A model id missing from the offline cache: the launch fails naming it, nothing is left.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    missing = f"missing-{unique}"
    await system.register_model(
        model_type="LLM", model=json.dumps(_seed(missing, model_id="NoSuchOrg/no-such-model")), persist=False
    )
    with pytest.raises(NotFound, match="NoSuchOrg/no-such-model"):
        await system.launch_model(model_name=missing, progress=False)
    assert missing not in await system.list_models()
    workers = await system.list_workers()
    assert all(r["model_uid"] != missing for w in workers for r in w["replicas"])

    # And the seed model from the same offline cache still launches and serves.
    seeded = f"seeded-{unique}"
    await system.register_model(
        model_type="LLM", model=json.dumps(_seed(seeded, model_id=NSQL_REPO_ID)), persist=False
    )
    seeded_uid = await system.launch_model(model_name=seeded, progress=False)
    seeded_model = generating(await system.get_model(model_uid=seeded_uid))
    assert completed(await seeded_model.generate(prompt="SELECT", generate_config={"max_tokens": 3}))["usage"]

    # Through all of it the first model kept serving.
    served = completed(
        await within(model.generate(prompt="still fine", generate_config={"max_tokens": 3}), "generate", 60)
    )
    assert served["usage"]["completion_tokens"] >= 1


async def _raw_register(client: AsyncClient, definition: dict[str, Any]) -> tuple[str, str]:
    transport = await client._get_transport()
    assert isinstance(transport, NatsTransport)
    msg = await transport.nc.request(
        f"{client.prefix}.registry.register",
        json.dumps({"model_type": "LLM", "model": definition}).encode(),
        timeout=30,
    )
    headers = msg.headers or {}
    return headers.get("Nats-Service-Error-Code", ""), headers.get("Nats-Service-Error", "")


async def _handle_for_unknown_uid(client: AsyncClient, uid: str) -> Any:
    from broker_client import AsyncGenerateModelHandle

    return AsyncGenerateModelHandle(client, uid)


def test_launch_timeout_is_the_callers(tmp_path: Path) -> None:
    """Nothing in the client hides a short timeout: a registry call with nobody there ends at
    the call's own bound (here a short one), as a typed error."""
    port = free_port()
    started = time.monotonic()
    with pytest.raises(NatserveError):
        with Client(f"nats://127.0.0.1:{port}", timeout=2, request_timeout=2) as client:
            client.list_models()
    assert time.monotonic() - started < 15


async def _replica_info(client: AsyncClient, uid: str) -> dict[str, Any]:
    for worker in await client.list_workers():
        for replica in worker["replicas"]:
            if replica["model_uid"] == uid:
                return dict(replica)
    raise AssertionError(f"no worker reports {uid}")


async def test_a_client_that_walks_away_frees_the_slot(
    system: AsyncClient,
    tiny_llama_dir: Path,
    unique: str,
) -> None:
    """Breaking out of a stream, or a call's timeout, cancels the request on the worker."""
    name = f"walk-{unique}"
    await system.register_model(
        model_type="LLM", model=llm_definition(name, f"file://{tiny_llama_dir}"), persist=False
    )
    uid = await system.launch_model(model_name=name, progress=False)
    model = generating(await system.get_model(model_uid=uid))
    long = {"max_tokens": 1500, "temperature": 0}

    stream = streamed(await model.generate(prompt="SELECT", generate_config={**long, "stream": True}))
    async for _chunk in stream:
        break
    await stream.aclose()

    async def cancelled_once() -> bool:
        info = await _replica_info(system, uid)
        return bool(info.get("cancelled") == 1 and info["active"] == 0)

    await eventually(cancelled_once, "the abandoned stream is cancelled and its slot freed", interval=0.05)

    with pytest.raises(NatserveError):
        await model.generate(prompt="SELECT", generate_config=long, timeout=0.5)

    async def cancelled_twice() -> bool:
        info = await _replica_info(system, uid)
        return bool(info.get("cancelled") == 2 and info["active"] == 0)

    await eventually(cancelled_twice, "the timed-out request is cancelled and its slot freed", interval=0.05)
    # Others are served at once afterwards.
    reply = completed(
        await within(model.generate(prompt="x", generate_config={"max_tokens": 2}), "generate", 30)
    )
    assert reply["usage"]["completion_tokens"] >= 1
