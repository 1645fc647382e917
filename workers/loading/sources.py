"""Where a model's files are: a spec's ``model_uri`` or ``model_id`` turned into a local folder.

A ``model_uri`` is a ``file://`` URI or a directory path on this machine (the worker's model
roots confine it, see :mod:`workers.limits`); a ``model_id`` is a Hugging Face repo id, read from
the hub's cache and downloaded into it first unless the worker is offline (``HF_HUB_OFFLINE``).
Resolving comes before loading, so that the worker can report download progress and the
registry's placement can reason about a model before it is in memory.

Every failure is a natserve error that names the model id or URI, the path and the reason.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from broker_client import BadRequest, InternalError, NotFound, Unavailable

logger = logging.getLogger(__name__)

__all__ = ["ModelSource", "ProgressCallback", "parse_model_uri", "progress_tqdm", "resolve_source"]

ProgressCallback = Callable[[dict[str, Any]], None]


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


def progress_tqdm(progress: ProgressCallback, model_id: str) -> type:
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
        kwargs["tqdm_class"] = progress_tqdm(progress, model_id)
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
