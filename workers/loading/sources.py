"""Where a model's files are: a spec's ``model_uri`` or ``model_id`` turned into a local folder.

A ``model_uri`` is a ``file://`` URI or a directory path on this machine (the worker's model
roots confine it, see :mod:`workers.limits`); a ``model_id`` is a Hugging Face repo id, read from
the hub's cache and downloaded into it first unless the worker is offline (``HF_HUB_OFFLINE``).
Resolving comes before loading, so that the worker can report download progress and the
registry's placement can reason about a model before it is in memory.

Every failure is a natserve error that names the model id or URI, the path and the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from broker_client import BadRequest, NotFound

from .hub import ProgressCallback, hub_download, progress_tqdm

__all__ = ["ModelSource", "ProgressCallback", "parse_model_uri", "progress_tqdm", "resolve_source"]


@dataclass(frozen=True)
class ModelSource:
    """A local folder holding a model, and where it came from."""

    path: Path
    origin: str  # "hf-cache" | "uri"
    # The model_id or model_uri as the spec gave it, for messages and descriptions.
    ref: str = ""


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


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
    path = hub_download(model_id, revision=revision, cache_dir=cache_dir, progress=progress)
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
