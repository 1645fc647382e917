"""Loading a sentence-embedding model: a sentence-transformers folder or a plain Hugging Face encoder.

Only transformers is used: the pooling and normalisation that sentence-transformers would apply
are read from its config files (``modules.json``, the pooling module's ``config.json``) and done
by the embedding engine. A failed load leaves nothing allocated behind it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker_client import BadRequest, InternalError, NotFound

from ..devices import free_memory
from .checkpoint import check_complete, load_config, parse_device, translating_errors
from .sources import ModelSource
from .warmup import warm_up

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = ["POOLING_MODES", "LoadedEmbedding", "load_embedding"]

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")


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
        free_memory(self.device)


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
    dev = parse_device(device)
    layout = _embedding_layout(source.path)
    path = layout.transformer_dir
    if not (path / "config.json").is_file():
        raise NotFound(f"{path} holds no config.json")

    warm_up()
    import torch
    from transformers import AutoModel, AutoTokenizer

    config = load_config(path, trust_remote_code=False)
    model: Any = None
    tokenizer: Any = None
    info: dict[str, Any] = {}
    with translating_errors("the embedding tokenizer", path, dev):
        tokenizer = AutoTokenizer.from_pretrained(path)
    try:
        with translating_errors("the embedding model", path, dev):
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
        check_complete(info, path, "embedding model", ignore=("pooler.",))
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
        free_memory(dev)
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
