"""The embedding engine with the real all-MiniLM-L6-v2, checked against sentence-transformers."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from broker_client import BadRequest
from tests.support.models import minilm_path
from workers.engines.embedding import EmbeddingEngine, pool
from workers.loading import LoadedEmbedding, ModelSource, load_embedding, resolve_source

PARAPHRASES = ("A man is eating food.", "A man is eating a piece of bread.")
UNRELATED = ("The girl is carrying a baby.", "Quarterly bond yields rose as the central bank raised rates.")


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def minilm() -> LoadedEmbedding:
    return load_embedding(resolve_source(None, str(minilm_path())))


@pytest.fixture(scope="module")
def engine(minilm: LoadedEmbedding) -> EmbeddingEngine:
    return EmbeddingEngine(minilm, max_batch_size=16)


@pytest.fixture(scope="module")
def reference() -> Any:
    # sentence-transformers is the test-only reference implementation, never a runtime dependency.
    sentence_transformers = pytest.importorskip("sentence_transformers")
    return sentence_transformers.SentenceTransformer(str(minilm_path()), device="cpu")


def test_minilm_configuration_is_read_from_its_folder(minilm: LoadedEmbedding) -> None:
    assert minilm.pooling == "mean"
    assert minilm.normalize is True
    assert minilm.dimensions == 384
    assert minilm.max_length == 256  # sentence_bert_config.json, not the model's 512
    assert minilm.source.origin == "uri"
    assert minilm.memory_bytes > 80_000_000


def test_vectors_are_unit_and_semantic(engine: EmbeddingEngine) -> None:
    texts = [*PARAPHRASES, *UNRELATED]
    vectors, tokens = engine.embed(texts)
    assert len(vectors) == 4
    assert all(len(v) == 384 for v in vectors)
    assert all(math.isclose(math.sqrt(cosine(v, v)), 1.0, abs_tol=1e-5) for v in vectors)
    close = cosine(vectors[0], vectors[1])
    assert close > 0.6
    for far in (cosine(vectors[0], vectors[2]), cosine(vectors[0], vectors[3])):
        assert far < 0.2
        assert close - far > 0.5
    assert tokens > 4 * 2  # [CLS] and [SEP] at least, plus the words


def test_matches_sentence_transformers(engine: EmbeddingEngine, reference: Any) -> None:
    texts = [*PARAPHRASES, *UNRELATED, "short", "word " * 400]
    ours, _ = engine.embed(texts)
    theirs = reference.encode(texts, convert_to_tensor=True)
    assert torch.allclose(torch.tensor(ours), theirs.cpu(), atol=1e-4)


def test_order_and_batching(engine: EmbeddingEngine, reference: Any) -> None:
    texts = [
        f"Sentence number {i} talks about {'cats' if i % 2 else 'the stock market'}." * (1 + i % 5)
        for i in range(100)
    ]
    vectors, tokens = engine.embed(texts)
    assert len(vectors) == 100
    # Batched (16 at a time, sorted by length) and one by one give the same vectors, in order.
    for i in (0, 7, 42, 99):
        single, _ = engine.embed([texts[i]])
        assert torch.allclose(torch.tensor(vectors[i]), torch.tensor(single[0]), atol=1e-5)
    theirs = reference.encode(texts, convert_to_tensor=True)
    assert torch.allclose(torch.tensor(vectors), theirs.cpu(), atol=1e-4)
    tokenizer = engine.loaded.tokenizer
    assert tokens == sum(len(tokenizer(t, truncation=True, max_length=256)["input_ids"]) for t in texts)


def test_truncation_at_max_length(engine: EmbeddingEngine) -> None:
    long_text = "token " * 5000
    vectors, tokens = engine.embed([long_text])
    assert tokens == 256
    assert len(vectors[0]) == 384


def test_a_text_is_cut_to_what_its_first_tokens_span_and_embeds_as_a_whole(
    engine: EmbeddingEngine, reference: Any
) -> None:
    words = " ".join(f"word{i % 997}" for i in range(200_000))  # 1.7 MB
    budget = engine._char_budget()
    assert len(engine._capped(words)) == budget < len(words) // 10
    # WordPiece drops whitespace: a prefix of the budget holds too few tokens, so it grows.
    spaced = ("x" + " " * 5000) * 300 + " ".join(["word"] * 300)
    assert len(engine._capped(spaced)) > budget
    for text in (words, spaced):
        [ours], tokens = engine.embed([text])
        [theirs] = reference.encode([text], normalize_embeddings=True).tolist()
        assert tokens == 256 and torch.allclose(torch.tensor(ours), torch.tensor(theirs), atol=1e-4)


def test_edge_inputs(engine: EmbeddingEngine) -> None:
    assert engine.embed([]) == ([], 0)
    vectors, _ = engine.embed("a single string")
    assert len(vectors) == 1
    assert engine.embed([""])[1] == 2  # [CLS] [SEP]
    with pytest.raises(BadRequest, match=r"input\[1\]"):
        engine.embed(["fine", 3])  # type: ignore[list-item]


async def test_aembed_serialises_concurrent_calls(engine: EmbeddingEngine) -> None:
    batches = [[f"request {i} text {j}" for j in range(5)] for i in range(6)]
    results = await asyncio.gather(*(engine.aembed(b) for b in batches))
    for batch, (vectors, _) in zip(batches, results, strict=True):
        assert torch.allclose(torch.tensor(vectors), torch.tensor(engine.embed(batch)[0]), atol=1e-5)


def test_pooling_modes_match_sentence_transformers() -> None:
    Pooling = pytest.importorskip("sentence_transformers.sentence_transformer.modules.pooling").Pooling
    torch.manual_seed(0)
    tokens = torch.randn(3, 7, 8)
    right = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    left = right.flip(1)
    for mode in ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"):
        st_pool = Pooling(8, pooling_mode=mode)
        for mask in (right, left):
            expected = st_pool({"token_embeddings": tokens, "attention_mask": mask})
            assert torch.allclose(pool(tokens, mask, mode), expected["sentence_embedding"]), mode


def _st_folder(dest: Path, pooling: dict, normalize: bool) -> Path:
    """A copy of MiniLM with another pooling and without Normalize."""
    shutil.copytree(minilm_path(), dest)
    (dest / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    modules = json.loads((dest / "modules.json").read_text())
    if not normalize:
        modules = [m for m in modules if not m["type"].endswith("Normalize")]
    (dest / "modules.json").write_text(json.dumps(modules))
    return dest


def test_other_pooling_config_and_no_normalize(tmp_path: Path, reference: Any) -> None:
    sentence_transformers = pytest.importorskip("sentence_transformers")
    folder = _st_folder(
        tmp_path / "cls",
        {"word_embedding_dimension": 384, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False},
        normalize=False,
    )
    loaded = load_embedding(ModelSource(folder, "uri"))
    assert (loaded.pooling, loaded.normalize) == ("cls", False)
    ours, _ = EmbeddingEngine(loaded).embed(list(PARAPHRASES))
    theirs = sentence_transformers.SentenceTransformer(str(folder), device="cpu").encode(
        list(PARAPHRASES), convert_to_tensor=True
    )
    assert torch.allclose(torch.tensor(ours), theirs, atol=1e-4)
    assert abs(math.sqrt(cosine(ours[0], ours[0])) - 1.0) > 1e-3


def test_plain_hf_folder_means_mean_and_normalize(tmp_path: Path) -> None:
    folder = tmp_path / "plain"
    folder.mkdir()
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "special_tokens_map.json",
    ):
        shutil.copy(minilm_path() / name, folder / name)
    loaded = load_embedding(ModelSource(folder, "uri"))
    assert (loaded.pooling, loaded.normalize, loaded.dimensions) == ("mean", True, 384)
    assert loaded.max_length == 512


def test_unsupported_modules_are_refused(tmp_path: Path) -> None:
    folder = _st_folder(tmp_path / "dense", {"pooling_mode": "mean"}, normalize=True)
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(BadRequest, match="Dense"):
        load_embedding(ModelSource(folder, "uri"))


@pytest.mark.parametrize(
    ("pooling", "fragment"),
    [
        ({"pooling_mode": "median"}, "median"),
        ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}, "combined"),
    ],
)
def test_unsupported_pooling_is_refused(tmp_path: Path, pooling: dict, fragment: str) -> None:
    folder = _st_folder(tmp_path / "pool", pooling, normalize=True)
    with pytest.raises(BadRequest, match=fragment):
        load_embedding(ModelSource(folder, "uri"))
