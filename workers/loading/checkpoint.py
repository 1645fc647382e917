"""What every load does with a checkpoint folder: the device and dtype it goes to, its config,
the translation of transformers' errors into natserve's, and the check that no weight is missing.

torch and transformers are imported inside the functions: this module is imported at the
worker's start, which must not wait for them.
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker_client import BadRequest, InternalError, NatserveError, NotFound, Unavailable

from ..devices import free_memory

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = ["check_complete", "load_config", "parse_device", "pick_dtype", "translating_errors"]


def parse_device(device: str) -> torch.device:
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


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
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


@contextmanager
def translating_errors(what: str, path: Path, device: torch.device) -> Iterator[None]:
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
        free_memory(device)
        raise Unavailable(f"not enough memory on {device} to load {what} from {path}: {exc}") from exc
    except ImportError as exc:
        traceback.clear_frames(exc.__traceback__)
        free_memory(device)
        raise InternalError(f"loading {what} from {path} needs a missing package: {exc}") from exc
    except Exception as exc:
        traceback.clear_frames(exc.__traceback__)
        free_memory(device)
        logger.debug("loading %s from %s failed", what, path, exc_info=True)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InternalError(f"loading {what} from {path} failed ({type(exc).__name__}): {reason}") from exc


def load_config(path: Path, trust_remote_code: bool) -> Any:
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


def check_complete(info: dict[str, Any], path: Path, what: str, ignore: tuple[str, ...] = ()) -> None:
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(ignore))
    if missing:
        sample = ", ".join(missing[:3]) + (f", ... ({len(missing) - 3} more)" if len(missing) > 3 else "")
        raise BadRequest(
            f"{path} is not a complete {what} checkpoint: {len(missing)} weight(s) are missing "
            f"({sample}); it is for another architecture or task, or its files are incomplete"
        )
