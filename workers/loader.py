"""Find a model's files and load them with transformers.

Two steps, kept apart so the worker can report progress between them and so the registry's
placement can reason about a model before it is in memory:

* :func:`resolve_source` turns a spec's ``model_uri`` or ``model_id`` into a local folder
  (a ``file://`` URI or directory, or a Hugging Face cache snapshot, downloaded if allowed);
* :func:`load_llm` / :func:`load_embedding` read that folder into a causal LM (optionally
  4/8-bit through bitsandbytes) or a sentence-embedding model.

Every failure is a natserve error that names the model id, URI or path and the reason; a failed
load leaves nothing allocated behind it.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from broker_client import (
    BadRequest,
    InternalError,
    NatserveError,
    NotFound,
    Unavailable,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = [
    "QUANTIZATIONS",
    "LoadedEmbedding",
    "LoadedLLM",
    "ModelSource",
    "load_embedding",
    "load_llm",
    "parse_model_uri",
    "resolve_source",
    "warm_up",
]

QUANTIZATIONS = ("none", "8-bit", "4-bit")
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")

ProgressCallback = Callable[[dict[str, Any]], None]


# --------------------------------------------------------------------------------------------
# Warm-up
# --------------------------------------------------------------------------------------------

_warm_lock = threading.Lock()
_warmed = False


def warm_up(then: Callable[[], None] | None = None) -> float:
    """Import the code every model load runs, once per process; the seconds it took (0 after the
    first call).

    That is torch, transformers' model base class and its auto classes for configs, causal
    LMs, encoders and tokenizers, and the engine: ``modeling_utils`` alone pulls in
    ``torch.distributed.tensor``, ``torch._dynamo`` and transformers' loss functions, 1.5-2 s on
    two cores and about 90 % of the first launch of a small model (torch itself another 1-1.5 s;
    this module does not import it at the top, so that a worker answers before it). A worker
    does it on a thread of its own once it answers (``Worker(warm_up=True)``), so that its first
    launch pays only for the model itself. Every load calls it first, and so waits for a warm-up
    under way: transformers is never imported from two threads at once (a cycle between two
    threads' imports hands one of them a half-initialised module). ``then`` runs after the
    imports and before any load can start.
    """
    global _warmed
    with _warm_lock:
        if _warmed:
            return 0.0
        started = time.perf_counter()
        import torch  # noqa: F401
        import transformers.modeling_utils  # noqa: F401
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

        from .engines import batching  # noqa: F401

        _warmed = True
        seconds = time.perf_counter() - started
        if then is not None:
            then()
        return seconds


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """A local folder holding a model, and where it came from."""

    path: Path
    origin: str  # "hf-cache" | "uri"
    # The model_id or model_uri as the spec gave it, for messages and descriptions.
    ref: str = ""


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_TRUE = {"1", "on", "yes", "true"}


def parse_model_uri(model_uri: str) -> Path:
    """The local path a ``model_uri`` names; only ``file:`` URIs and plain paths are local.

    ``file:///abs/dir`` and ``file:/abs/dir`` are absolute; ``file://localhost/abs/dir`` too;
    ``file://rel/dir`` (what people write when they mean a relative path, though RFC 8089 would
    read ``rel`` as a host) is taken relative to the working directory. Plain paths may use ``~``.
    """
    uri = model_uri.strip()
    if not uri:
        raise BadRequest("model_uri is empty")
    match = _SCHEME.match(uri)
    # A one-letter "scheme" is a Windows drive (C:\models), not a URI.
    if match is None or len(match.group(1)) == 1:
        return Path(uri).expanduser()
    if match.group(1).lower() != "file":
        raise BadRequest(
            f"model_uri {model_uri!r} has scheme {match.group(1)!r}; only local file:// URIs "
            "and directory paths are supported"
        )
    parts = urlsplit(uri)
    if parts.query or parts.fragment:
        raise BadRequest(f"model_uri {model_uri!r} must not carry a query or fragment")
    path = unquote(parts.path)
    host = unquote(parts.netloc)
    if host in ("", "localhost"):
        return Path(path).expanduser()
    return Path(host + path)


def _is_offline() -> bool:
    from huggingface_hub import constants

    # huggingface_hub reads HF_HUB_OFFLINE once, at import; the environment is read again here
    # so that a worker whose settings set it after the import is still offline.
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.strip().lower() in _TRUE


def _progress_tqdm(progress: ProgressCallback, model_id: str) -> type:
    """A tqdm class for ``snapshot_download`` that reports bytes to ``progress``, never to a TTY.

    snapshot_download builds a files bar (unit "it"), a network "Downloading bytes" bar and a
    bytes-written bar; the last one is the one whose total is the model's size. That total
    grows as each file's download starts, so it is "known so far", not final, until the end.
    """
    from tqdm.std import tqdm as std_tqdm

    class _ProgressTqdm(std_tqdm):  # type: ignore[misc]
        _min_interval = 0.25
        monitor_interval = 0  # no tqdm monitor thread: nothing is displayed anyway
        _lock = threading.Lock()

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)  # huggingface_hub's own tqdm takes it; tqdm does not
            kwargs["disable"] = False  # tqdm skips update() bookkeeping when disabled
            kwargs["file"] = _NullWriter()
            super().__init__(*args, **kwargs)
            self._last_report = 0.0
            self._reports = self.unit == "B" and self.desc != "Downloading bytes"

        def update(self, n: float | None = 1) -> bool | None:
            shown = super().update(n)
            if self._reports:
                now = time.monotonic()
                done = self.total is not None and self.total > 0 and self.n >= self.total
                if done or now - self._last_report >= self._min_interval:
                    self._last_report = now
                    event = {
                        "stage": "download",
                        "model_id": model_id,
                        "bytes": int(self.n),
                        "total": int(self.total or 0),
                    }
                    # Downloads run on several threads; keep the callback single-threaded.
                    with self._lock:
                        try:
                            progress(event)
                        except Exception:
                            logger.exception("download progress callback failed")
            return shown

        def display(self, *args: Any, **kwargs: Any) -> None:
            return None

    return _ProgressTqdm


class _NullWriter:
    def write(self, _: str) -> int:
        return 0

    def flush(self) -> None:
        return None


def _resolve_uri(model_uri: str) -> ModelSource:
    path = parse_model_uri(model_uri)
    if not path.exists():
        raise NotFound(f"model_uri {model_uri!r}: {path} does not exist")
    if not path.is_dir():
        raise NotFound(f"model_uri {model_uri!r}: {path} is not a directory")
    if not (path / "config.json").is_file():
        raise NotFound(f"model_uri {model_uri!r}: {path} holds no config.json")
    return ModelSource(path=path.resolve(), origin="uri", ref=model_uri)


def _resolve_model_id(
    model_id: str,
    revision: str | None,
    cache_dir: str | Path | None,
    progress: ProgressCallback | None,
) -> ModelSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import HfHubHTTPError

    offline = _is_offline()
    where = f"revision {revision!r}" if revision else "the default revision"
    cache = f"cache {cache_dir}" if cache_dir else "the Hugging Face cache"
    kwargs: dict[str, Any] = {}
    if progress is not None:
        kwargs["tqdm_class"] = _progress_tqdm(progress, model_id)
    try:
        folder = snapshot_download(
            repo_id=model_id,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=offline,
            **kwargs,
        )
    except HFValidationError as exc:
        raise BadRequest(f"model_id {model_id!r} is not a valid Hugging Face repo id: {exc}") from exc
    except IncompleteSnapshotError as exc:
        raise NotFound(
            f"model_id {model_id!r} ({where}) is only partly in {cache} and the rest cannot be "
            f"downloaded: {exc}"
        ) from exc
    except LocalEntryNotFoundError as exc:
        cause = exc.__cause__
        if offline or isinstance(cause, OfflineModeIsEnabled):
            raise NotFound(
                f"model_id {model_id!r} ({where}) is not in {cache} and HF_HUB_OFFLINE is set, "
                "so it cannot be downloaded"
            ) from exc
        reason = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)
        raise NotFound(
            f"model_id {model_id!r} ({where}) is not in {cache} and the Hugging Face Hub could "
            f"not be reached (network failure: {reason})"
        ) from exc
    except GatedRepoError as exc:
        raise NotFound(
            f"model_id {model_id!r} is gated on the Hugging Face Hub and no token with access "
            "was given (set HF_TOKEN)"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise NotFound(f"model_id {model_id!r} does not exist on the Hugging Face Hub") from exc
    except RevisionNotFoundError as exc:
        raise NotFound(f"model_id {model_id!r} has no {where} on the Hugging Face Hub") from exc
    except HfHubHTTPError as exc:
        raise Unavailable(f"downloading model_id {model_id!r} failed: {exc}") from exc
    except OSError as exc:
        # Disk full, permissions on the cache: a problem of this worker, not of the request.
        raise InternalError(f"downloading model_id {model_id!r} into {cache} failed: {exc}") from exc

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise NotFound(f"model_id {model_id!r}: the snapshot {path} holds no config.json")
    return ModelSource(path=path, origin="hf-cache", ref=model_id)


def resolve_source(
    model_id: str | None,
    model_uri: str | None,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    progress: ProgressCallback | None = None,
) -> ModelSource:
    """The local folder of a model spec; ``model_uri`` wins when both are given.

    A ``model_id`` comes from the Hugging Face cache, downloaded first unless offline
    (``HF_HUB_OFFLINE``). ``progress`` receives ``{"stage": "download", "model_id", "bytes",
    "total"}`` while files download, from download threads.
    """
    if model_uri:
        return _resolve_uri(model_uri)
    if model_id:
        return _resolve_model_id(model_id, revision, cache_dir, progress)
    raise BadRequest("the model spec has neither model_id nor model_uri")


# --------------------------------------------------------------------------------------------
# Common loading helpers
# --------------------------------------------------------------------------------------------


def _parse_device(device: str) -> torch.device:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise BadRequest(f"device {device!r} is not a torch device: {exc}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise Unavailable(f"device {device!r} requested but CUDA is not available here")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise Unavailable(
                f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        dev = torch.device("cuda", index)
    elif dev.type != "cpu":
        raise BadRequest(f"device {device!r} is not supported; use 'cpu' or 'cuda:N'")
    return dev


# Names a definition may give -> the torch dtype's attribute name.
_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def _pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    import torch

    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # Half precision on the CPU is slow or unsupported for many ops.
        return torch.float32
    try:
        name = _DTYPES[dtype.lower()]
    except KeyError:
        raise BadRequest(f"dtype {dtype!r} is not supported; use one of {sorted(set(_DTYPES))}") from None
    dt: torch.dtype = getattr(torch, name)
    return dt


def _free_memory(device: torch.device | None = None) -> None:
    import torch

    gc.collect()
    if (device is None or device.type == "cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def _translating_errors(what: str, path: Path, device: torch.device) -> Iterator[None]:
    """Turn a loader exception into a natserve error, and let go of what it had allocated.

    The traceback's frames hold the half-built model; clearing them before re-raising is what
    lets ``gc.collect()`` return its memory while keeping the cause chained for the logs.
    """
    import torch

    try:
        yield
    except NatserveError:
        raise
    except torch.OutOfMemoryError as exc:
        traceback.clear_frames(exc.__traceback__)
        _free_memory(device)
        raise Unavailable(f"not enough memory on {device} to load {what} from {path}: {exc}") from exc
    except ImportError as exc:
        traceback.clear_frames(exc.__traceback__)
        _free_memory(device)
        raise InternalError(f"loading {what} from {path} needs a missing package: {exc}") from exc
    except Exception as exc:
        traceback.clear_frames(exc.__traceback__)
        _free_memory(device)
        logger.debug("loading %s from %s failed", what, path, exc_info=True)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InternalError(f"loading {what} from {path} failed ({type(exc).__name__}): {reason}") from exc


def _load_config(path: Path, trust_remote_code: bool) -> Any:
    """The model config; its failures are the request's fault (unknown architecture) or a
    corrupt file, and are told apart here, before any weight is read."""
    from transformers import AutoConfig

    config_file = path / "config.json"
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise NotFound(f"{path} holds no config.json") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InternalError(f"{config_file} is unreadable or not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise InternalError(f"{config_file} does not hold a JSON object")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as exc:
        model_type = raw.get("model_type")
        if "trust_remote_code" in str(exc):
            raise BadRequest(
                f"the model in {path} (model_type {model_type!r}) ships its own code; it loads "
                "only with trust_remote_code enabled: `trust_remote_code: true` in the definition "
                "and, on the worker, NATSERVE_ALLOW_REMOTE_CODE=1 (`natserve worker --allow-remote-code`)"
            ) from exc
        raise BadRequest(
            f"the model in {path} has an architecture this transformers version does not "
            f"support (model_type {model_type!r}): {exc}"
        ) from exc
    except Exception as exc:
        raise InternalError(f"reading the config in {path} failed: {exc}") from exc


def _check_complete(info: dict[str, Any], path: Path, what: str, ignore: tuple[str, ...] = ()) -> None:
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(ignore))
    if missing:
        sample = ", ".join(missing[:3]) + (f", ... ({len(missing) - 3} more)" if len(missing) > 3 else "")
        raise BadRequest(
            f"{path} is not a complete {what} checkpoint: {len(missing)} weight(s) are missing "
            f"({sample}); it is for another architecture or task, or its files are incomplete"
        )


def _context_length(config: Any, tokenizer: Any) -> int:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in (
        "max_position_embeddings",
        "n_positions",
        "max_sequence_length",
        "max_seq_len",
        "seq_length",
        "n_ctx",
    ):
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    # Tokenizers without a limit report a huge sentinel (int(1e30)).
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10_000_000:
        return limit
    return 2048


# --------------------------------------------------------------------------------------------
# Causal LMs
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedLLM:
    """A causal LM ready to generate, with what the engine and the registry need to know."""

    model: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    context_length: int
    source: ModelSource
    quantization: str
    memory_bytes: int
    # Set by unload(); engines check it rather than touching a released model.
    released: bool = field(default=False, repr=False)

    def unload(self) -> None:
        """Drop the model and return its memory (CUDA cache included)."""
        self.model = None
        self.tokenizer = None
        self.released = True
        _free_memory(self.device)


def _quantization_config(quantization: str, compute_dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    if quantization == "8-bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_type="nf4",
    )


class _OnceFilter(logging.Filter):
    """Let a message through once: bitsandbytes warns on every 8-bit matmul on the CPU."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        if self.seen:
            return False
        self.seen = True
        return True


def _quiet_bnb_cast_warning() -> None:
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _OnceFilter) for f in bnb_logger.filters):
        bnb_logger.addFilter(_OnceFilter("MatMul8bitLt: inputs will be cast"))


def _normalize_quantization(quantization: str | None) -> str:
    q = (quantization or "none").strip().lower()
    aliases = {
        "": "none",
        "none": "none",
        "8-bit": "8-bit",
        "8bit": "8-bit",
        "int8": "8-bit",
        "4-bit": "4-bit",
        "4bit": "4-bit",
        "nf4": "4-bit",
    }
    if q not in aliases:
        raise BadRequest(f"quantization {quantization!r} is not supported; use one of {list(QUANTIZATIONS)}")
    return aliases[q]


def load_llm(
    source: ModelSource,
    *,
    quantization: str = "none",
    device: str = "cpu",
    trust_remote_code: bool = False,
    dtype: str | None = None,
) -> LoadedLLM:
    """Load a causal LM and its tokenizer from ``source`` onto ``device``.

    ``quantization`` is ``"none"``, ``"8-bit"`` or ``"4-bit"`` (bitsandbytes; both also run on
    the CPU). ``dtype`` defaults to bfloat16 on CUDA (float16 where bf16 is missing) and
    float32 on the CPU; for 4-bit it is the compute dtype.
    """
    quant = _normalize_quantization(quantization)
    dev = _parse_device(device)
    torch_dtype = _pick_dtype(dtype, dev)
    path = source.path
    if not (path / "config.json").is_file():
        raise NotFound(f"{path} holds no config.json")

    warm_up()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = _load_config(path, trust_remote_code)
    model_type = getattr(config, "model_type", None)
    has_remote_code = bool(getattr(config, "auto_map", None)) and trust_remote_code
    if not has_remote_code and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise BadRequest(
            f"the model in {path} (model_type {model_type!r}) is not a causal language model "
            "that transformers can generate with"
        )

    kwargs: dict[str, Any] = {
        "dtype": torch_dtype,
        "trust_remote_code": trust_remote_code,
        # Straight onto the target device: no full copy in CPU memory first.
        "device_map": {"": str(dev)},
        # transformers only warns about weights missing from the checkpoint (and then
        # initialises them randomly); the info lets us refuse such a model instead.
        "output_loading_info": True,
    }
    if quant != "none":
        kwargs["quantization_config"] = _quantization_config(quant, torch_dtype)
        if quant == "8-bit" and dev.type == "cpu":
            _quiet_bnb_cast_warning()

    model: Any = None
    tokenizer: Any = None
    info: dict[str, Any] = {}
    with _translating_errors("the tokenizer", path, dev):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    try:
        with _translating_errors(f"the model ({quant})", path, dev):
            result: Any
            try:
                result = AutoModelForCausalLM.from_pretrained(
                    path, config=config, attn_implementation="sdpa", **kwargs
                )
            except ValueError as exc:
                if "sdpa" not in str(exc).lower() and "attn" not in str(exc).lower():
                    raise
                logger.info("%s does not support SDPA attention, loading the default", path)
                result = AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)
            model, info = result
            result = None
            model.eval()
        _check_complete(info, path, "causal LM")

        if tokenizer.pad_token is None:
            if tokenizer.eos_token is not None:
                # Batched generation pads; eos is the usual stand-in and is masked out anyway.
                tokenizer.pad_token = tokenizer.eos_token
            else:
                logger.warning("tokenizer in %s has neither pad nor eos token", path)
        # Decoder-only models must be left-padded so every row's next token follows its prompt.
        tokenizer.padding_side = "left"

        loaded = LoadedLLM(
            model=model,
            tokenizer=tokenizer,
            device=dev,
            dtype=torch_dtype,
            context_length=_context_length(model.config, tokenizer),
            source=source,
            quantization=quant,
            memory_bytes=int(model.get_memory_footprint()),
        )
    except BaseException:
        model = tokenizer = None
        _free_memory(dev)
        raise
    logger.info(
        "loaded %s (%s, %s, %s) on %s: %.1f MiB, context %d",
        source.ref or path,
        model_type,
        quant,
        str(torch_dtype).removeprefix("torch."),
        dev,
        loaded.memory_bytes / 2**20,
        loaded.context_length,
    )
    return loaded


# --------------------------------------------------------------------------------------------
# Embedding models
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedEmbedding:
    """A sentence-embedding model: a transformer, then pooling, then optional L2 normalisation."""

    model: Any
    tokenizer: Any
    pooling: str  # one of POOLING_MODES
    normalize: bool
    dimensions: int
    max_length: int
    source: ModelSource
    device: torch.device
    do_lower_case: bool = False
    memory_bytes: int = 0
    released: bool = field(default=False, repr=False)

    def unload(self) -> None:
        self.model = None
        self.tokenizer = None
        self.released = True
        _free_memory(self.device)


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InternalError(f"{file} is unreadable or not JSON: {exc}") from exc


# sentence-transformers wrote these booleans before it had a single ``pooling_mode`` key; the
# order is the one it concatenates multiple modes in.
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


def _pooling_from_config(config: dict[str, Any], file: Path) -> tuple[str, int | None]:
    mode = config.get("pooling_mode")
    if mode is None:
        modes = [m for key, m in _LEGACY_POOLING_KEYS.items() if config.get(key)]
        modes = modes or ["mean"]
    else:
        modes = [mode] if isinstance(mode, str) else list(mode)
    if len(modes) != 1:
        raise BadRequest(f"{file}: combined pooling modes {modes} are not supported")
    if modes[0] not in POOLING_MODES:
        raise BadRequest(f"{file}: pooling mode {modes[0]!r} is not supported")
    dim = config.get("word_embedding_dimension", config.get("embedding_dimension"))
    return modes[0], dim if isinstance(dim, int) else None


@dataclass
class _EmbeddingLayout:
    transformer_dir: Path
    pooling: str = "mean"
    normalize: bool = True
    dimensions: int | None = None
    max_seq_length: int | None = None
    do_lower_case: bool = False


def _embedding_layout(path: Path) -> _EmbeddingLayout:
    """Read a sentence-transformers folder's module list; a plain HF folder means mean + L2."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return _EmbeddingLayout(transformer_dir=path)

    modules = _read_json(modules_file)
    if not isinstance(modules, list):
        raise InternalError(f"{modules_file} does not hold a list of modules")
    layout = _EmbeddingLayout(transformer_dir=path, normalize=False)
    seen_transformer = False
    for module in sorted(modules, key=lambda m: m.get("idx", 0)):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        folder = path / str(module.get("path", ""))
        if kind == "Transformer":
            seen_transformer = True
            layout.transformer_dir = folder
            st_config_file = folder / "sentence_bert_config.json"
            if st_config_file.is_file():
                st_config = _read_json(st_config_file)
                if isinstance(st_config.get("max_seq_length"), int):
                    layout.max_seq_length = st_config["max_seq_length"]
                layout.do_lower_case = bool(st_config.get("do_lower_case", False))
        elif kind == "Pooling":
            pooling_file = folder / "config.json"
            pooling_config = _read_json(pooling_file) if pooling_file.is_file() else {}
            layout.pooling, layout.dimensions = _pooling_from_config(pooling_config, pooling_file)
        elif kind == "Normalize":
            layout.normalize = True
        else:
            # Dense projections, routers, static embeddings...: their output would differ from
            # the model's, so refuse rather than serve wrong vectors.
            raise BadRequest(f"{path}: sentence-transformers module {module.get('type')!r} is not supported")
    if not seen_transformer:
        raise BadRequest(f"{path}: modules.json lists no Transformer module")
    return layout


def load_embedding(source: ModelSource, *, device: str = "cpu") -> LoadedEmbedding:
    """Load a sentence-transformers (or plain Hugging Face encoder) folder for embeddings.

    Only transformers is used: the pooling and normalisation that sentence-transformers would
    apply are read from its config files and done by the engine.
    """
    dev = _parse_device(device)
    layout = _embedding_layout(source.path)
    path = layout.transformer_dir
    if not (path / "config.json").is_file():
        raise NotFound(f"{path} holds no config.json")

    warm_up()
    import torch
    from transformers import AutoModel, AutoTokenizer

    config = _load_config(path, trust_remote_code=False)
    model: Any = None
    tokenizer: Any = None
    info: dict[str, Any] = {}
    with _translating_errors("the embedding tokenizer", path, dev):
        tokenizer = AutoTokenizer.from_pretrained(path)
    try:
        with _translating_errors("the embedding model", path, dev):
            # float32 everywhere, as sentence-transformers does by default: embedding models
            # are small and the vectors should not depend on the device.
            result: Any = AutoModel.from_pretrained(
                path,
                config=config,
                dtype=torch.float32,
                device_map={"": str(dev)},
                output_loading_info=True,
            )
            model, info = result
            result = None
            model.eval()
        # sentence-transformers checkpoints often drop the unused BERT pooler.
        _check_complete(info, path, "embedding model", ignore=("pooler.",))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token

        max_length = layout.max_seq_length
        if max_length is None:
            candidates = [
                v
                for v in (
                    getattr(config, "max_position_embeddings", None),
                    getattr(tokenizer, "model_max_length", None),
                )
                if isinstance(v, int) and 0 < v < 10_000_000
            ]
            max_length = min(candidates) if candidates else 512
        dimensions = layout.dimensions or int(config.hidden_size)
        loaded = LoadedEmbedding(
            model=model,
            tokenizer=tokenizer,
            pooling=layout.pooling,
            normalize=layout.normalize,
            dimensions=dimensions,
            max_length=max_length,
            source=source,
            device=dev,
            do_lower_case=layout.do_lower_case,
            memory_bytes=int(model.get_memory_footprint()),
        )
    except BaseException:
        model = tokenizer = None
        _free_memory(dev)
        raise
    logger.info(
        "loaded embedding model %s on %s: %d dims, %s pooling%s, max %d tokens",
        source.ref or source.path,
        dev,
        dimensions,
        layout.pooling,
        " + L2" if layout.normalize else "",
        max_length,
    )
    return loaded
