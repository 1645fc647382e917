"""What a worker lets a model definition and a request do: its operator's policy.

:class:`WorkerLimits` is the worker-wide policy, from its settings (``natserve worker`` flags and
``NATSERVE_*`` variables):

* ``allow_remote_code`` (``--allow-remote-code``, ``NATSERVE_ALLOW_REMOTE_CODE=1``): a model whose
  definition says ``trust_remote_code: true`` runs code shipped with its weights only when the
  worker allows it too; otherwise the launch is a 400 naming both switches.
* ``model_roots`` (``NATSERVE_MODEL_ROOTS``, directories separated by ``os.pathsep``): a
  ``model_uri`` must resolve (``..`` and symlinks followed) inside one of them, or the launch is a
  400 naming the URI and the roots. ``None`` allows any path: that is the library default
  (``Worker(...)`` in a program of one's own); ``natserve worker`` and ``natserve up`` always
  confine, by default to ``$NATSERVE_HOME/models`` and the Hugging Face cache.
* ``max_tokens_limit``, ``rate_limit``: caps on the per-replica launch options of the same names
  (the smaller value wins), see :class:`ReplicaLimits`.
* ``max_request_bytes``: the largest inference request body (generate, chat, embed, cancel) the
  worker decodes; a larger one is a 400 naming the limit. NATS's ``max_payload`` bounds it anyway.

:class:`ReplicaLimits` is what one replica enforces per request: the ``max_tokens`` cap (also the
default when a request gives none) and a token bucket of ``rate_limit`` requests per second
(bursts up to one second's worth, at least one request); past it, a 429 ``Overloaded``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from broker_client import BadRequest, Overloaded, PayloadTooLarge

from .loading.sources import parse_model_uri

__all__ = [
    "ReplicaLimits",
    "TokenBucket",
    "WorkerLimits",
    "check_model_uri",
    "default_model_roots",
    "parse_model_roots",
]


def _smallest(*values: float | None) -> float | None:
    given = [v for v in values if v is not None]
    return min(given) if given else None


def parse_model_roots(value: str | Sequence[str | Path] | None) -> tuple[Path, ...] | None:
    """``NATSERVE_MODEL_ROOTS``: directories separated by ``os.pathsep``, or a list of them."""
    if value is None:
        return None
    items: Iterable[str | Path] = value.split(os.pathsep) if isinstance(value, str) else value
    roots = tuple(Path(str(item).strip()).expanduser() for item in items if str(item).strip())
    if not roots:
        raise ValueError("model roots: give at least one directory")
    return roots


def default_model_roots(home: Path, hf_cache: str | Path | None = None) -> tuple[Path, ...]:
    """``$NATSERVE_HOME/models`` and the Hugging Face hub cache (``HF_HUB_CACHE``, else the hub's)."""
    if hf_cache is None:
        hf_cache = os.environ.get("HF_HUB_CACHE")
    if hf_cache is None:
        try:
            from huggingface_hub import constants

            hf_cache = constants.HF_HUB_CACHE
        except Exception:  # pragma: no cover - huggingface_hub is a dependency
            hf_cache = Path("~/.cache/huggingface/hub").expanduser()
    return (Path(home).expanduser() / "models", Path(hf_cache).expanduser())


def _resolved(path: Path) -> Path:
    # abspath first: resolve() of a relative path is relative to the working directory anyway,
    # but abspath keeps "~" expansion and ".." handling in one place.
    return Path(os.path.abspath(path.expanduser())).resolve()


def check_model_uri(model_uri: str, roots: Sequence[Path] | None, *, where: str = "this worker") -> Path:
    """The resolved local path of ``model_uri``; BadRequest when it leaves ``roots``.

    The path is resolved before the check: ``..`` segments and symlinks anywhere on it are
    followed, so neither a traversal nor a link out of a root gets through.
    """
    path = _resolved(parse_model_uri(model_uri))
    if roots is None:
        return path
    resolved_roots = [_resolved(Path(r)) for r in roots]
    if any(path == root or path.is_relative_to(root) for root in resolved_roots):
        return path
    shown = os.pathsep.join(str(r) for r in resolved_roots)
    raise BadRequest(
        f"model_uri {model_uri!r} resolves to {path}, which is outside the model roots of {where} "
        f"({shown}); put the model under one of them, or add its directory to the worker's "
        f"NATSERVE_MODEL_ROOTS (directories separated by {os.pathsep!r})"
    )


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; not thread-safe (one event loop)."""

    __slots__ = ("_clock", "_tokens", "_updated", "burst", "rate")

    def __init__(
        self, rate: float, burst: float | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a positive number of requests per second, got {rate!r}")
        self.rate = float(rate)
        self.burst = max(1.0, float(burst) if burst is not None else self.rate)
        self._clock = clock
        self._tokens = self.burst
        self._updated = clock()

    def take(self) -> float:
        """Take one token: 0.0 when there was one, else the seconds until there will be."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate


@dataclass
class ReplicaLimits:
    """The per-request limits of one replica."""

    max_tokens: int | None = None
    rate_limit: float | None = None

    def __post_init__(self) -> None:
        self._bucket = TokenBucket(self.rate_limit) if self.rate_limit is not None else None

    def admit(self, label: str) -> None:
        """Take one request from the rate budget; Overloaded (429) past it."""
        if self._bucket is None:
            return
        wait = self._bucket.take()
        if wait > 0:
            raise Overloaded(
                f"{label} is over its rate limit of {self.rate_limit:g} requests/s; "
                f"retry in {max(wait, 0.001):.3f} s"
            )

    def check_max_tokens(self, max_tokens: int | None, label: str) -> None:
        if self.max_tokens is not None and max_tokens is not None and max_tokens > self.max_tokens:
            raise BadRequest(
                f"max_tokens {max_tokens} is above the max_tokens limit of {label} ({self.max_tokens})"
            )


@dataclass(frozen=True)
class WorkerLimits:
    """A worker's policy; the defaults are the library's (no limits, no remote code)."""

    allow_remote_code: bool = False
    model_roots: tuple[Path, ...] | None = None
    max_tokens_limit: int | None = None
    rate_limit: float | None = None
    max_request_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_tokens_limit", "max_request_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.rate_limit is not None and not (self.rate_limit > 0 and math.isfinite(self.rate_limit)):
            raise ValueError(f"rate_limit must be a positive number, got {self.rate_limit!r}")

    def check_launch(
        self,
        *,
        model_name: str,
        trust_remote_code: bool,
        model_uri: str | None,
        worker_id: str,
    ) -> None:
        """The launch-time checks: remote code and model roots (400 naming the switches)."""
        if trust_remote_code and not self.allow_remote_code:
            raise BadRequest(
                f"model {model_name!r} needs trust_remote_code (it runs Python code shipped with "
                f"the model), and worker {worker_id!r} does not allow it: both switches must be on, "
                "`trust_remote_code: true` in the definition (it is) and, on the worker, "
                "NATSERVE_ALLOW_REMOTE_CODE=1 or `natserve worker --allow-remote-code` (it is not)"
            )
        if model_uri:
            from .engines import is_echo_uri

            if not is_echo_uri(model_uri):
                check_model_uri(model_uri, self.model_roots, where=f"worker {worker_id!r}")

    def trust_remote_code(self, requested: bool) -> bool:
        return bool(requested and self.allow_remote_code)

    def for_replica(self, *, max_tokens_limit: int | None, rate_limit: float | None) -> ReplicaLimits:
        """A replica's limits: its launch options, capped by this worker's own."""
        max_tokens = _smallest(max_tokens_limit, self.max_tokens_limit)
        return ReplicaLimits(
            max_tokens=int(max_tokens) if max_tokens is not None else None,
            rate_limit=_smallest(rate_limit, self.rate_limit),
        )

    def check_body(self, size: int, subject: str) -> None:
        if self.max_request_bytes is not None and size > self.max_request_bytes:
            raise PayloadTooLarge(
                f"request of {size} bytes on {subject!r} is above this worker's limit of "
                f"{self.max_request_bytes} bytes (NATSERVE_MAX_REQUEST_BYTES)"
            )
