"""workers.loading against real files: a tiny Llama in a Hugging Face cache and on disk."""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch

from broker_client import BadRequest, InternalError, NotFound
from tests.support.models import (
    NSQL_REPO_ID,
    build_tiny_llama,
    install_in_hf_cache,
    tiny_llama,
    tiny_tokenizer,
)
from tests.support.ports import free_port
from workers.loading import (
    LoadedLLM,
    ModelSource,
    load_llm,
    parse_model_uri,
    progress_tqdm,
    resolve_source,
)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1 as a worker would have it; huggingface_hub read it at import, so its
    constant is patched too (transformers asks huggingface_hub whether it is offline)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def online_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Online mode with the Hub endpoint on a local port nobody listens on: a network failure
    that is immediate and never leaves this machine."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")


def _greedy(loaded: LoadedLLM, prompt: str, n: int = 6) -> torch.Tensor:
    tok = loaded.tokenizer
    inputs = tok(prompt, return_tensors="pt").to(loaded.device)
    with torch.inference_mode():
        out = loaded.model.generate(
            **inputs,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    return out[0, inputs["input_ids"].shape[1] :]


def _next_logits(loaded: LoadedLLM, prompt: str) -> torch.Tensor:
    inputs = loaded.tokenizer(prompt, return_tensors="pt").to(loaded.device)
    with torch.inference_mode():
        return loaded.model(**inputs).logits[0, -1].float()


@pytest.fixture(scope="module")
def plain_llm(tiny_llama_dir: Path) -> LoadedLLM:
    return load_llm(resolve_source(None, f"file://{tiny_llama_dir}"))


# --- the test cache itself ------------------------------------------------------------------


def test_hf_cache_layout_is_what_huggingface_hub_scans(hf_cache: Path, tiny_llama_dir: Path) -> None:
    info = huggingface_hub.scan_cache_dir(hf_cache)
    assert info.warnings == []
    (repo,) = info.repos
    assert repo.repo_id == NSQL_REPO_ID
    assert repo.repo_type == "model"
    (revision,) = repo.revisions
    assert revision.refs == frozenset({"main"})
    assert len(revision.commit_hash) == 40
    names = {f.file_name for f in revision.files}
    assert names == {p.name for p in tiny_llama_dir.iterdir()}
    # LFS files are stored under their sha256, like the real cache does.
    import hashlib

    weights = (tiny_llama_dir / "model.safetensors").read_bytes()
    blob = next(f for f in revision.files if f.file_name == "model.safetensors").blob_path
    assert blob.name == hashlib.sha256(weights).hexdigest()


def test_tiny_llama_is_deterministic_and_template_optional(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    first = build_tiny_llama(tmp_path / "a")
    second = build_tiny_llama(tmp_path / "b")
    assert sorted(p.name for p in first.iterdir()) == sorted(p.name for p in second.iterdir())
    for file in first.iterdir():
        assert file.read_bytes() == (second / file.name).read_bytes(), file.name
    bare = build_tiny_llama(tmp_path / "c", chat_template=None, seed=1)
    assert AutoTokenizer.from_pretrained(bare).chat_template is None
    assert (bare / "model.safetensors").read_bytes() != (first / "model.safetensors").read_bytes()


def test_plain_llm_from_file_uri(plain_llm: LoadedLLM) -> None:
    assert plain_llm.source.origin == "uri"
    chat = plain_llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "How many users?"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<s><|user|>\nHow many users?</s>\n<|assistant|>\n"
    assert len(_greedy(plain_llm, chat)) == 6


def test_install_is_idempotent_and_takes_a_commit_revision(tmp_path: Path, tiny_llama_dir: Path) -> None:
    first = install_in_hf_cache(tiny_llama_dir, tmp_path, "org/name")
    assert install_in_hf_cache(tiny_llama_dir, tmp_path, "org/name") == first
    commit = "0123456789abcdef0123456789abcdef01234567"
    pinned = install_in_hf_cache(tiny_llama_dir, tmp_path, "org/name", revision=commit)
    assert pinned.name == commit
    found = huggingface_hub.snapshot_download(
        "org/name", revision=commit, cache_dir=tmp_path, local_files_only=True
    )
    assert Path(found) == pinned


def test_transformers_loads_the_cached_repo_offline(hf_cache: Path, offline: None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(NSQL_REPO_ID, cache_dir=hf_cache)
    tokenizer = AutoTokenizer.from_pretrained(NSQL_REPO_ID, cache_dir=hf_cache)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tokenizer.eos_token == "</s>"
    assert tokenizer.chat_template


# --- resolve_source ---------------------------------------------------------------------------


def test_model_id_resolves_from_the_cache_offline(hf_cache: Path, offline: None) -> None:
    source = resolve_source(NSQL_REPO_ID, None, cache_dir=hf_cache)
    assert source.origin == "hf-cache"
    assert source.ref == NSQL_REPO_ID
    assert source.path.is_relative_to(hf_cache / "models--NumbersStation--nsql-2B" / "snapshots")
    assert (source.path / "config.json").is_file()


def test_model_id_found_through_hf_hub_cache_env(
    hf_cache: Path, offline: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Workers set HF_HUB_CACHE rather than pass cache_dir; huggingface_hub reads its constant.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_cache))
    assert resolve_source(NSQL_REPO_ID, None).origin == "hf-cache"


def test_model_id_from_cache_loads_and_generates(hf_cache: Path, offline: None) -> None:
    loaded = load_llm(resolve_source(NSQL_REPO_ID, None, cache_dir=hf_cache))
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.device == torch.device("cpu")
    assert loaded.dtype == torch.float32
    assert loaded.context_length == 2048
    assert loaded.quantization == "none"
    assert loaded.memory_bytes == loaded.model.get_memory_footprint() > 0
    assert loaded.tokenizer.pad_token is not None
    assert loaded.tokenizer.padding_side == "left"
    assert not loaded.model.training
    assert loaded.model.config._attn_implementation == "sdpa"
    assert len(_greedy(loaded, "SELECT name FROM users")) == 6


def test_missing_model_id_offline_is_not_found(hf_cache: Path, offline: None) -> None:
    with pytest.raises(NotFound) as err:
        resolve_source("NumbersStation/no-such-model", None, cache_dir=hf_cache)
    assert "'NumbersStation/no-such-model'" in err.value.message
    assert "HF_HUB_OFFLINE" in err.value.message


def test_missing_model_id_offline_from_env_only(
    hf_cache: Path, monkeypatch: pytest.MonkeyPatch, online_unreachable: None
) -> None:
    # The variable set after huggingface_hub's import still makes resolve_source offline.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NotFound, match="HF_HUB_OFFLINE"):
        resolve_source("org/absent", None, cache_dir=hf_cache)
    assert resolve_source(NSQL_REPO_ID, None, cache_dir=hf_cache).origin == "hf-cache"


def test_unreachable_hub_is_a_network_failure(hf_cache: Path, online_unreachable: None) -> None:
    with pytest.raises(NotFound) as err:
        resolve_source("org/absent", None, cache_dir=hf_cache)
    assert "'org/absent'" in err.value.message
    assert "network failure" in err.value.message


def test_invalid_model_id_is_bad_request(hf_cache: Path, offline: None) -> None:
    with pytest.raises(BadRequest, match="not a valid"):
        resolve_source("not a/valid//repo id", None, cache_dir=hf_cache)


def test_model_uri_forms(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = tiny_llama_dir.resolve()
    for uri in (
        f"file://{tiny_llama_dir}",
        f"file://localhost{tiny_llama_dir}",
        f"file:{tiny_llama_dir}",
        str(tiny_llama_dir),
    ):
        source = resolve_source(None, uri)
        assert (source.path, source.origin, source.ref) == (expected, "uri", uri), uri
    monkeypatch.chdir(tiny_llama_dir.parent)
    assert resolve_source(None, f"file://{tiny_llama_dir.name}").path == expected
    assert resolve_source(None, tiny_llama_dir.name).path == expected


def test_model_uri_wins_over_model_id(tiny_llama_dir: Path) -> None:
    assert resolve_source("org/ignored", str(tiny_llama_dir)).origin == "uri"


def test_model_uri_percent_escapes(tmp_path: Path, tiny_llama_dir: Path) -> None:
    spaced = tmp_path / "my model"
    shutil.copytree(tiny_llama_dir, spaced)
    assert resolve_source(None, f"file://{tmp_path}/my%20model").path == spaced.resolve()


@pytest.mark.parametrize("uri", ["s3://bucket/models/nsql", "https://example.com/m", "hf://org/m"])
def test_non_file_uri_is_bad_request(uri: str) -> None:
    with pytest.raises(BadRequest) as err:
        resolve_source(None, uri)
    assert repr(uri) in err.value.message


def test_missing_directory_is_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(NotFound) as err:
        resolve_source(None, f"file://{missing}")
    assert str(missing) in err.value.message


def test_directory_without_config_is_not_found(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(NotFound, match=r"config\.json"):
        resolve_source(None, str(tmp_path))
    with pytest.raises(NotFound, match="not a directory"):
        resolve_source(None, str(tmp_path / "weights.bin"))


def test_neither_id_nor_uri_is_bad_request() -> None:
    with pytest.raises(BadRequest):
        resolve_source(None, None)


def test_parse_model_uri_keeps_plain_paths() -> None:
    assert parse_model_uri("~/models/x") == Path.home() / "models" / "x"
    assert parse_model_uri("/abs/x") == Path("/abs/x")


def test_download_progress_reports_bytes() -> None:
    """snapshot_download hands its tqdm_class the kwargs below (huggingface_hub 1.x/2.x)."""
    events: list[dict] = []
    cls = progress_tqdm(events.append, "org/m")
    files = cls(range(3), desc="Fetching 3 files", total=3)
    transfer = cls(desc="Downloading bytes", total=0, initial=0, unit="B", unit_scale=True)
    written = cls(desc="Reconstructing", total=0, initial=0, unit="B", unit_scale=True)
    written.total = 1000
    files.update(1)
    transfer.update(700)
    written.update(400)
    written.update(600)
    assert events[0] == {"stage": "download", "model_id": "org/m", "bytes": 400, "total": 1000}
    assert events[-1] == {"stage": "download", "model_id": "org/m", "bytes": 1000, "total": 1000}


# --- load_llm -------------------------------------------------------------------------------


def test_bitsandbytes_4bit_on_cpu(tiny_llama_dir: Path, plain_llm: LoadedLLM) -> None:
    import bitsandbytes as bnb

    loaded = load_llm(ModelSource(tiny_llama_dir, "uri"), quantization="4-bit")
    assert loaded.quantization == "4-bit"
    layers = loaded.model.model.layers
    for proj in (layers[0].self_attn.q_proj, layers[1].mlp.down_proj):
        assert isinstance(proj, bnb.nn.Linear4bit)
        assert proj.weight.dtype == torch.uint8
    # The head stays in full precision, as transformers leaves lm_head out of quantization.
    assert type(loaded.model.lm_head) is torch.nn.Linear
    assert loaded.memory_bytes < plain_llm.memory_bytes
    _assert_close_to(loaded, plain_llm)


def _assert_close_to(loaded: LoadedLLM, plain: LoadedLLM) -> None:
    prompt = "SELECT COUNT(*) FROM users"
    assert len(_greedy(loaded, prompt)) == 6
    # Quantised weights, same network: the next-token distribution barely moves.
    similarity = torch.nn.functional.cosine_similarity(
        _next_logits(loaded, prompt), _next_logits(plain, prompt), dim=0
    )
    assert similarity > 0.98


def test_8bit_on_cpu_is_torch_dynamic_int8(tiny_llama_dir: Path, plain_llm: LoadedLLM) -> None:
    """8-bit on the CPU: every linear, the head included, becomes torch's dynamic int8 linear
    (no bitsandbytes), computing in fp32 even when bf16 is asked for; its memory counts the int8
    weights at a byte each."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    loaded = load_llm(ModelSource(tiny_llama_dir, "uri"), quantization="8-bit", dtype="bfloat16")
    assert loaded.quantization == "8-bit" and loaded.dtype == torch.float32
    model = loaded.model
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert linears == [], "every nn.Linear is quantized"
    assert isinstance(model.lm_head, DynamicLinear)
    assert isinstance(model.model.layers[1].mlp.down_proj, DynamicLinear)
    assert model.model.embed_tokens.weight.dtype == torch.float32
    plain = plain_llm.model
    linear_params = sum(m.weight.numel() for m in plain.modules() if isinstance(m, torch.nn.Linear))
    other_bytes = plain_llm.memory_bytes - 4 * linear_params
    rows = sum(m.out_features for m in plain.modules() if isinstance(m, torch.nn.Linear))
    assert loaded.memory_bytes == other_bytes + linear_params + 20 * rows
    _assert_close_to(loaded, plain_llm)


def test_8bit_on_cpu_unties_the_head() -> None:
    """A tied head (SmolLM2's) gets its own int8 copy; the embedding stays fp32 and untouched."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from workers.loading.cpu_int8 import int8_linear_bytes, quantize_cpu_int8

    model = tiny_llama(tiny_tokenizer(vocab_size=300), hidden_size=32, num_layers=1, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    vocab, hidden = model.model.embed_tokens.weight.shape
    embedding = model.model.embed_tokens.weight.detach().clone()
    ids = torch.tensor([[1, 5, 9, 200]])
    with torch.inference_mode():
        before = model(ids).logits
        quantize_cpu_int8(model)
        after = model(ids).logits
    assert isinstance(model.lm_head, DynamicLinear) and not model.config.tie_word_embeddings
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    # The head's int8 copy: vocab x hidden weights at a byte, 20 bytes of scale, zero point and
    # offset per row.
    assert int8_linear_bytes(model) - int8_linear_bytes(model.model) == vocab * hidden + vocab * 20
    assert torch.nn.functional.cosine_similarity(before.flatten(), after.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("quantization", ["3-bit", "gptq", "awq"])
def test_unknown_quantization_is_bad_request(tiny_llama_dir: Path, quantization: str) -> None:
    with pytest.raises(BadRequest) as err:
        load_llm(ModelSource(tiny_llama_dir, "uri"), quantization=quantization)
    assert repr(quantization) in err.value.message


def test_bad_device_and_dtype(tiny_llama_dir: Path) -> None:
    with pytest.raises(BadRequest, match="dtype"):
        load_llm(ModelSource(tiny_llama_dir, "uri"), dtype="float8")
    with pytest.raises(BadRequest, match="device"):
        load_llm(ModelSource(tiny_llama_dir, "uri"), device="tpu:0")


def test_explicit_dtype(tiny_llama_dir: Path) -> None:
    loaded = load_llm(ModelSource(tiny_llama_dir, "uri"), dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    assert loaded.model.model.embed_tokens.weight.dtype == torch.bfloat16


def _alive_models() -> int:
    from transformers import PreTrainedModel

    gc.collect()
    return sum(issubclass(type(o), PreTrainedModel) for o in gc.get_objects())


def _broken_copy(src: Path, dest: Path, how: str) -> Path:
    shutil.copytree(src, dest)
    config = json.loads((dest / "config.json").read_text())
    weights = dest / "model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == "wrong-shape":
        from safetensors.torch import load_file, save_file

        tensors = load_file(weights)
        tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 64)
        save_file(tensors, weights, metadata={"format": "pt"})
    elif how == "no-weights":
        weights.unlink()
    elif how == "no-tokenizer":
        (dest / "tokenizer.json").unlink()
        (dest / "tokenizer_config.json").unlink()
    elif how == "unknown-arch":
        config.update(model_type="bogus-lm", architectures=["BogusForCausalLM"])
    elif how == "encoder":
        # An architecture transformers knows but whose weights are not in this checkpoint.
        config = {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "n_layer": 1,
            "n_embd": 64,
            "n_head": 4,
            "vocab_size": 512,
        }
    elif how == "bad-json":
        (dest / "config.json").write_text("{not json")
        return dest
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.mark.parametrize(
    ("how", "error", "fragment"),
    [
        ("truncated", InternalError, "SafetensorError"),
        ("wrong-shape", InternalError, "mismatched"),
        ("no-weights", InternalError, "model.safetensors"),
        ("no-tokenizer", InternalError, "tokenizer"),
        ("unknown-arch", BadRequest, "bogus-lm"),
        ("encoder", BadRequest, "missing"),
        ("bad-json", InternalError, "config.json"),
    ],
)
def test_broken_model_folders(
    tmp_path: Path,
    tiny_llama_dir: Path,
    plain_llm: LoadedLLM,
    how: str,
    error: type[Exception],
    fragment: str,
) -> None:
    folder = _broken_copy(tiny_llama_dir, tmp_path / how, how)
    before = _alive_models()
    with pytest.raises(error) as err:
        load_llm(ModelSource(folder, "uri"))
    message = str(err.value)
    assert str(folder) in message
    assert fragment in message
    assert "Traceback" not in message
    # Nothing of the failed load survives, even while the error (and its chained cause) is
    # still held, as the service holds it until the reply is sent.
    assert err.value.__cause__ is not None or error is BadRequest
    assert _alive_models() <= before


def test_unload_releases_the_model(tiny_llama_dir: Path) -> None:
    import weakref

    loaded = load_llm(ModelSource(tiny_llama_dir, "uri"))
    ref = weakref.ref(loaded.model)
    loaded.unload()
    gc.collect()
    assert ref() is None
    assert loaded.released
