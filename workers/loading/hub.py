"""Downloads from the Hugging Face Hub into its cache, with progress, and their errors.

A whole repo snapshot (a transformers model, :mod:`.sources`) or one file of a repo (a GGUF
model, :mod:`.gguf`) comes through :func:`hub_download`, which reads the cache only when the
worker is offline (``HF_HUB_OFFLINE``) and turns every Hub, offline and missing-file exception
into the natserve error a client sees, naming the model id, the revision, the file and the cache.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker_client import BadRequest, InternalError, NotFound, ServiceError, Unavailable

logger = logging.getLogger(__name__)

__all__ = ["ProgressCallback", "hub_download", "is_offline", "progress_tqdm"]

ProgressCallback = Callable[[dict[str, Any]], None]

_TRUE = {"1", "on", "yes", "true"}


def is_offline() -> bool:
    """Whether this worker reads the Hub's cache only (``HF_HUB_OFFLINE`` or
    ``TRANSFORMERS_OFFLINE``)."""
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


def hub_download(
    model_id: str,
    *,
    file_name: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    progress: ProgressCallback | None = None,
) -> Path:
    """The local path of ``model_id``'s snapshot folder, or of its file ``file_name``.

    Downloaded into the cache first unless offline; ``progress`` as :func:`progress_tqdm`.
    """
    from huggingface_hub import hf_hub_download, snapshot_download

    offline = is_offline()
    kwargs: dict[str, Any] = {"revision": revision, "cache_dir": cache_dir, "local_files_only": offline}
    if progress is not None:
        kwargs["tqdm_class"] = progress_tqdm(progress, model_id)
    try:
        if file_name is None:
            local = snapshot_download(model_id, **kwargs)
        else:
            local = hf_hub_download(model_id, file_name, **kwargs)
    except Exception as exc:
        error = hub_error(
            exc, model_id, file_name=file_name, revision=revision, cache_dir=cache_dir, offline=offline
        )
        if error is None:
            raise
        raise error from exc
    return Path(local)


def hub_error(
    exc: BaseException,
    model_id: str,
    *,
    file_name: str | None,
    revision: str | None,
    cache_dir: str | Path | None,
    offline: bool,
) -> ServiceError | None:
    """The natserve error for a Hub download's exception; None for one that is not the Hub's."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import HfHubHTTPError

    where = f"revision {revision!r}" if revision else "the default revision"
    cache = f"cache {cache_dir}" if cache_dir else "the Hugging Face cache"
    what = f"model_id {model_id!r}" if file_name is None else f"{file_name!r} of model_id {model_id!r}"
    # Subclasses before their bases: IncompleteSnapshotError is a LocalEntryNotFoundError, that
    # an EntryNotFoundError and an OSError; GatedRepoError a RepositoryNotFoundError, and those
    # HfHubHTTPErrors and OSErrors (huggingface_hub 2.4).
    if isinstance(exc, HFValidationError):
        return BadRequest(f"model_id {model_id!r} is not a valid Hugging Face repo id: {exc}")
    if isinstance(exc, IncompleteSnapshotError):
        return NotFound(
            f"model_id {model_id!r} ({where}) is only partly in {cache} and the rest cannot be "
            f"downloaded: {exc}"
        )
    if isinstance(exc, LocalEntryNotFoundError):
        missing = f"model_id {model_id!r} ({where})"
        if file_name is not None:
            missing += f": {file_name!r}"
        cause = exc.__cause__
        if offline or isinstance(cause, OfflineModeIsEnabled):
            return NotFound(
                f"{missing} is not in {cache} and HF_HUB_OFFLINE is set, so it cannot be downloaded"
            )
        reason = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)
        return NotFound(
            f"{missing} is not in {cache} and the Hugging Face Hub could not be reached "
            f"(network failure: {reason})"
        )
    if isinstance(exc, EntryNotFoundError) and file_name is not None:
        return NotFound(f"model_id {model_id!r} ({where}) has no file {file_name!r}")
    if isinstance(exc, GatedRepoError):
        return NotFound(
            f"model_id {model_id!r} is gated on the Hugging Face Hub and no token with access "
            "was given (set HF_TOKEN)"
        )
    if isinstance(exc, RepositoryNotFoundError):
        return NotFound(f"model_id {model_id!r} does not exist on the Hugging Face Hub")
    if isinstance(exc, RevisionNotFoundError):
        return NotFound(f"model_id {model_id!r} has no {where} on the Hugging Face Hub")
    if isinstance(exc, HfHubHTTPError):
        return Unavailable(f"downloading {what} failed: {exc}")
    if isinstance(exc, OSError):
        # Disk full, permissions on the cache: a problem of this worker, not of the request.
        return InternalError(f"downloading {what} into {cache} failed: {exc}")
    return None
