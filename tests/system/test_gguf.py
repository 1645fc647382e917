"""GGUF models through the whole system: a ``ggufv2`` definition registered, launched by the
registry on a worker, served by the llama.cpp engine, a chat and a stream over NATS; the file
by ``model_uri`` (a folder and a name template, or the file itself) and from the Hugging Face
cache by ``model_id``; a definition with both formats runs its GGUF spec on a pool without a GPU;
bad values are 400s naming the field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from broker_client import AsyncClient, AsyncStream, BadRequest, NotFound, Unavailable
from tests.support.handles import chatting, completed, generating
from tests.support.models import install_in_hf_cache

TEMPLATE = "SmolLM2-135M-Instruct.{quantization}.gguf"


def gguf_definition(name: str, *, context_length: int = 512, **spec: Any) -> dict[str, Any]:
    return {
        "version": 2,
        "model_name": name,
        "model_lang": ["en"],
        "model_ability": ["generate", "chat"],
        "context_length": context_length,
        "model_specs": [
            {
                "model_format": "ggufv2",
                "model_size_in_billions": "0_135",
                "quantizations": ["Q4_1", "Q8_0"],
                "model_file_name_template": TEMPLATE,
                **spec,
            }
        ],
    }


async def launch(client: AsyncClient, definition: dict[str, Any], **options: Any) -> str:
    await client.register_model(model_type="LLM", model=json.dumps(definition), persist=False)
    return await client.launch_model(
        model_name=definition["model_name"], progress=False, max_batch_size=4, **options
    )


@pytest.mark.slow
async def test_a_ggufv2_model_launches_and_chats_over_nats(
    system: AsyncClient, smollm2_gguf: Path, unique: str
) -> None:
    uid = await launch(system, gguf_definition(f"smol-{unique}", model_uri=f"file://{smollm2_gguf.parent}"))
    described = await system.describe_model(model_uid=uid)
    assert described["model_format"] == "ggufv2" and described["quantization"] == "Q4_1"
    model = chatting(await system.get_model(model_uid=uid))
    # The template's default system prompt makes the Q4_1 weights ramble; this one does not.
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    reply = completed(
        await model.chat(messages=messages, generate_config={"max_tokens": 48, "temperature": 0})
    )
    choice = reply["choices"][0]
    assert "Paris" in choice["message"]["content"] and choice["finish_reason"] == "stop"
    assert "<|im_end|>" not in choice["message"]["content"]
    stream = await model.chat(
        messages=messages, generate_config={"max_tokens": 48, "temperature": 0, "stream": True}
    )
    assert isinstance(stream, AsyncStream)
    chunks = [c async for c in stream]
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == choice["message"]["content"] and len(chunks) > 3
    completion = completed(
        await model.generate(
            prompt="The capital of France is", generate_config={"max_tokens": 8, "stop": ["."]}
        )
    )
    assert completion["usage"]["completion_tokens"] <= 8
    # What this engine cannot serve is a 400 naming it (the wire's own check, or the engine's
    # where the wire takes the field); the model keeps answering.
    with pytest.raises(BadRequest, match=r"generate_config\.n\b|n=2 is not supported"):
        await model.generate(prompt="hi", generate_config={"max_tokens": 4, "n": 2})
    again = completed(
        await model.chat(messages=messages, generate_config={"max_tokens": 48, "temperature": 0})
    )
    assert again["choices"][0]["message"]["content"] == choice["message"]["content"]
    await system.terminate_model(model_uid=uid)


@pytest.mark.slow
async def test_the_file_itself_or_from_the_hugging_face_cache(
    system: AsyncClient, smollm2_gguf: Path, unique: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uid = await launch(
        system, gguf_definition(f"file-{unique}", model_uri=str(smollm2_gguf), model_file_name_template=None)
    )
    model = generating(await system.get_model(model_uid=uid))
    by_file = completed(
        await model.generate(prompt="1, 2, 3,", generate_config={"max_tokens": 6, "temperature": 0})
    )
    await system.terminate_model(model_uid=uid)

    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(smollm2_gguf, repo / smollm2_gguf.name)
    cache = tmp_path / "hf"
    install_in_hf_cache(repo, cache, "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    uid = await launch(
        system, gguf_definition(f"hub-{unique}", model_id="HuggingFaceTB/SmolLM2-135M-Instruct-GGUF")
    )
    model = generating(await system.get_model(model_uid=uid))
    by_id = completed(
        await model.generate(prompt="1, 2, 3,", generate_config={"max_tokens": 6, "temperature": 0})
    )
    assert by_id["choices"][0]["text"] == by_file["choices"][0]["text"]
    await system.terminate_model(model_uid=uid)
    # A quantization whose file is not there: 404 naming the file.
    with pytest.raises(NotFound, match=r"SmolLM2-135M-Instruct\.Q8_0\.gguf"):
        await system.launch_model(model_name=f"hub-{unique}", quantization="Q8_0", progress=False)


@pytest.mark.slow
async def test_without_a_gpu_a_definition_with_both_formats_runs_its_gguf(
    system: AsyncClient, smollm2_gguf: Path, smollm2_dir: Path, unique: str
) -> None:
    definition = gguf_definition(f"both-{unique}", model_uri=f"file://{smollm2_gguf.parent}")
    definition["model_specs"].insert(
        0,
        {"model_format": "pytorch", "model_size_in_billions": "0_135", "model_uri": f"file://{smollm2_dir}"},
    )
    uid = await launch(system, definition)
    assert (await system.describe_model(model_uid=uid))["model_format"] == "ggufv2"
    await system.terminate_model(model_uid=uid)
    uid = await system.launch_model(
        model_name=definition["model_name"], model_uid=f"pt-{unique}", model_format="pytorch", progress=False
    )
    assert (await system.describe_model(model_uid=uid))["model_format"] == "pytorch"
    await system.terminate_model(model_uid=uid)


async def test_bad_ggufv2_values_are_400s_naming_the_field(system: AsyncClient, unique: str) -> None:
    cases = [
        ({"quantizations": ["4-bit"]}, "quantizations[0] '4-bit' is a bitsandbytes quantization"),
        ({"quantizations": ["Q4 K"]}, "model_specs[0].quantizations[0]"),
        ({"model_file_name_template": "../x.{quantization}.gguf"}, "model_file_name_template"),
        ({"model_file_name_template": "x.{quant}.gguf"}, "only the placeholder {quantization}"),
        ({"model_file_name_template": None}, "needs model_file_name_template"),
    ]
    for change, message in cases:
        definition = gguf_definition(f"bad-{unique}", model_uri="/models/smol")
        definition["model_specs"][0].update(change)
        with pytest.raises(BadRequest) as err:
            await system.register_model(model_type="LLM", model=json.dumps(definition), persist=False)
        assert message in str(err.value), (change, str(err.value))


async def test_a_worker_without_llama_cpp_names_the_extra(
    system: AsyncClient, smollm2_gguf: Path, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import workers.loading

    # This worker as a `pip install 'natserve[worker]'` without the gguf extra would be.
    monkeypatch.setattr(workers.loading, "llama_cpp_available", lambda: False)
    with pytest.raises(Unavailable, match=r"no llama-cpp-python: pip install 'natserve\[gguf\]'"):
        await launch(system, gguf_definition(f"nollama-{unique}", model_uri=f"file://{smollm2_gguf.parent}"))
