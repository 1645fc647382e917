"""GGUF models: the file a ``ggufv2`` spec names, found locally, and loaded by llama.cpp.

A ``ggufv2`` spec (Xinference's schema) names one file per quantization through its
``model_file_name_template`` (``"smollm2-135m-instruct.{quantization}.gguf"``):

* with a ``model_uri``: the file of that name in the folder the URI names, or the URI itself
  when it names one ``.gguf`` file (the worker's model roots confine it, see
  :mod:`workers.limits`);
* with a ``model_id``: that file of the Hugging Face repo, from the hub's cache (downloaded into
  it first unless the worker is offline, ``HF_HUB_OFFLINE``), never the whole repo.

:func:`load_gguf` reads the file with llama.cpp (``llama-cpp-python``, the ``gguf`` extra):
the weights are memory-mapped, so loading costs little RAM beyond the file's pages. Nothing here
imports llama_cpp at import time; a worker without it says which extra to install.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from broker_client import BadRequest, NotFound, Unavailable

from .hub import ProgressCallback, hub_download
from .sources import ModelSource, parse_model_uri

logger = logging.getLogger(__name__)

__all__ = [
    "GGUF_INSTALL",
    "LoadedGGUF",
    "gguf_file_name",
    "llama_cpp_available",
    "load_gguf",
    "require_llama_cpp",
    "resolve_gguf",
]

GGUF_INSTALL = "pip install 'natserve[gguf]'"
_backend_lock = threading.Lock()
_backend_ready = False


def llama_cpp_available() -> bool:
    """Whether llama-cpp-python is installed (found without importing it)."""
    return find_spec("llama_cpp") is not None


def require_llama_cpp(what: str) -> Any:
    """The ``llama_cpp`` module, its backend initialised once per process; a 503 naming the
    extra to install when this worker lacks it."""
    global _backend_ready
    if not llama_cpp_available():
        raise Unavailable(
            f"{what} is a GGUF model, served by the llama.cpp engine, and this worker has no "
            f"llama-cpp-python: {GGUF_INSTALL}"
        )
    import llama_cpp

    with _backend_lock:
        if not _backend_ready:
            _quiet_llama_log(llama_cpp)
            llama_cpp.llama_backend_init()
            _warn_if_openmp_passive(llama_cpp)
            _backend_ready = True
    return llama_cpp


def openmp_passive_warning(system_info: str, wait_policy: str | None) -> str | None:
    """What to warn of when llama.cpp runs on OpenMP in a process whose OpenMP threads sleep.

    ggml's barrier between two ops is an ``omp barrier`` when it is built with OpenMP (its
    default), and ``natserve worker`` runs OpenMP passive for the torch engine: a GGUF model then
    made 28 tokens/s at one stream through a pool, against 87 with ggml's own thread pool
    (``-DGGML_OPENMP=OFF``; docs/benchmarks.md, "The real model"). ``system_info``: llama.cpp's
    ``llama_print_system_info()``; ``wait_policy``: ``OMP_WAIT_POLICY``.
    """
    if "OPENMP = 1" not in system_info or (wait_policy or "").upper() != "PASSIVE":
        return None
    return (
        "llama.cpp here is built with OpenMP and OMP_WAIT_POLICY=PASSIVE: GGUF models run about 3x "
        'slower; build llama-cpp-python with CMAKE_ARGS="-DGGML_OPENMP=OFF" (see the README)'
    )


def _warn_if_openmp_passive(llama_cpp: Any) -> None:
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    warning = openmp_passive_warning(info, os.environ.get("OMP_WAIT_POLICY"))
    if warning is not None:
        logger.warning(warning)


# llama.cpp prints every tensor and parameter on stderr as it loads; errors still go to our log.
_LOG_ERROR = 4


def _quiet_llama_log(llama_cpp: Any) -> None:
    @llama_cpp.llama_log_callback
    def _log(level: int, text: bytes, _user: Any) -> None:
        if level == _LOG_ERROR:
            logger.error("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())

    llama_cpp.llama_log_set(_log, ctypes.c_void_p(0))
    # ctypes keeps no reference to a callback it was handed: this one must outlive the process.
    _quiet_llama_log.callback = _log  # type: ignore[attr-defined]


def gguf_file_name(template: str | None, quantization: str) -> str | None:
    """The file name a spec's template gives for ``quantization`` (None without a template)."""
    if template is None:
        return None
    name = template.format(quantization=quantization)
    if "/" in name or "\\" in name or name.startswith("."):
        raise BadRequest(f"model_file_name_template {template!r} gives {name!r}, which is not a file name")
    return name


def _resolve_uri(model_uri: str, file_name: str | None) -> ModelSource:
    path = parse_model_uri(model_uri)
    if not path.exists():
        raise NotFound(f"model_uri {model_uri!r}: {path} does not exist")
    if path.is_file():
        return ModelSource(path=path.resolve(), origin="uri", ref=model_uri)
    if file_name is None:
        raise BadRequest(
            f"model_uri {model_uri!r} is a folder and the ggufv2 spec has no model_file_name_template "
            "to name the file in it"
        )
    target = path / file_name
    if not target.is_file():
        present = sorted(p.name for p in path.glob("*.gguf"))[:8]
        raise NotFound(
            f"model_uri {model_uri!r}: {path} holds no {file_name!r} (GGUF files there: "
            f"{', '.join(present) or 'none'})"
        )
    return ModelSource(path=target.resolve(), origin="uri", ref=model_uri)


def _resolve_model_id(
    model_id: str,
    file_name: str,
    revision: str | None,
    cache_dir: str | Path | None,
    progress: ProgressCallback | None,
) -> ModelSource:
    path = hub_download(
        model_id, file_name=file_name, revision=revision, cache_dir=cache_dir, progress=progress
    )
    return ModelSource(path=path, origin="hf-cache", ref=model_id)


def resolve_gguf(
    model_id: str | None,
    model_uri: str | None,
    *,
    file_name_template: str | None,
    quantization: str,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    progress: ProgressCallback | None = None,
) -> ModelSource:
    """The local GGUF file of a ggufv2 spec for ``quantization``; ``model_uri`` wins."""
    file_name = gguf_file_name(file_name_template, quantization)
    if model_uri:
        return _resolve_uri(model_uri, file_name)
    if model_id:
        if file_name is None:
            raise BadRequest(f"model_id {model_id!r}: a ggufv2 spec needs model_file_name_template")
        return _resolve_model_id(model_id, file_name, revision, cache_dir, progress)
    raise BadRequest("the model spec has neither model_id nor model_uri")


@dataclass
class LoadedGGUF:
    """A GGUF model loaded by llama.cpp (its ``llama_model``), and what the engine needs."""

    llama_cpp: Any
    model: Any  # llama_model_p
    vocab: Any  # llama_vocab_p
    source: ModelSource
    quantization: str
    context_length: int  # the model's training context
    file_bytes: int
    metadata: dict[str, str]
    released: bool = field(default=False, repr=False)

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    def unload(self) -> None:
        """Frees the model; an engine over it must be closed first."""
        if not self.released:
            self.released = True
            self.llama_cpp.llama_model_free(self.model)
            self.model = self.vocab = None


def _metadata(llama_cpp: Any, model: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    buf = ctypes.create_string_buffer(1 << 20)  # chat templates run to tens of kilobytes
    for i in range(llama_cpp.llama_model_meta_count(model)):
        n = llama_cpp.llama_model_meta_key_by_index(model, i, buf, 256)
        if n < 0:
            continue
        key = buf.value.decode("utf-8", "replace")
        n = llama_cpp.llama_model_meta_val_str_by_index(model, i, buf, len(buf))
        if n < 0 or n >= len(buf):
            continue
        out[key] = buf.value.decode("utf-8", "replace")
    return out


def load_gguf(source: ModelSource, *, quantization: str, what: str = "the model") -> LoadedGGUF:
    """Loads the GGUF file of ``source`` (CPU, memory-mapped)."""
    llama_cpp = require_llama_cpp(what)
    path = source.path
    if not path.is_file():
        raise NotFound(f"{path} is not a file")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise BadRequest(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(os.fsencode(path), params)
    if not model:
        raise BadRequest(f"llama.cpp could not load {path} (see the worker's log for why)")
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        metadata = _metadata(llama_cpp, model)
        loaded = LoadedGGUF(
            llama_cpp=llama_cpp,
            model=model,
            vocab=vocab,
            source=source,
            quantization=quantization,
            context_length=int(llama_cpp.llama_model_n_ctx_train(model)),
            file_bytes=path.stat().st_size,
            metadata=metadata,
        )
    except BaseException:
        llama_cpp.llama_model_free(model)
        raise
    logger.info(
        "loaded %s (%s, %s) with llama.cpp: %.1f MiB, context %d",
        source.ref or path,
        metadata.get("general.architecture"),
        quantization,
        loaded.file_bytes / 2**20,
        loaded.context_length,
    )
    return loaded
