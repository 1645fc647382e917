"""The optional extras of the natserve distribution, and the check that names a missing one.

``pip install natserve`` is the client library and the operator CLI alone (nats-py, msgpack,
pydantic, pydantic-settings, rich). The services come with extras (pyproject.toml):

    natserve[registry]   natserve registry, natserve db upgrade   SQLAlchemy, drivers, Alembic
    natserve[worker]     natserve worker                          torch, transformers, ...
    natserve[gateway]    natserve gateway                         Starlette, uvicorn, ...
    natserve[all]        natserve up                              the three, and nats-server

A command that runs a service calls :func:`require_extras` before it imports or starts anything,
so that a missing extra is one ``error:`` line naming it, rather than an ImportError from deep
inside a service (or, for a worker, whose model code is imported only by its warm-up, a failure
at the first launch).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from importlib.util import find_spec

__all__ = ["EXTRAS", "MissingExtra", "missing_modules", "require_extras"]

# The modules each extra brings, by their import names: what pyproject.toml's extra installs
# (tests/system/test_distribution.py checks the two against each other). The gateway's uvloop is
# left out: it is platform-dependent, and the gateway runs on asyncio's loop without it.
EXTRAS: Mapping[str, tuple[str, ...]] = {
    "registry": ("sqlalchemy", "alembic", "aiosqlite", "asyncpg", "prometheus_client"),
    "worker": (
        "torch",
        "transformers",
        "tokenizers",
        "safetensors",
        "accelerate",
        "bitsandbytes",
        "huggingface_hub",
        "prometheus_client",
        "llguidance",
    ),
    "gateway": ("starlette", "uvicorn", "httptools", "orjson", "jinja2", "prometheus_client"),
}

# Enough names to recognise what is missing, few enough to keep the error to one short line.
_NAMES_SHOWN = 3


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that this environment lacks, found without importing any
    (importing torch to learn that it is there would cost seconds)."""
    try:
        modules = EXTRAS[extra]
    except KeyError:
        raise ValueError(f"unknown extra {extra!r}; natserve has {', '.join(EXTRAS)}") from None
    return [name for name in modules if find_spec(name) is None]


class MissingExtra(Exception):
    """A command needs an extra (or a program) that is not installed; the message says what to
    install: ``natserve registry needs the registry extra (not installed: sqlalchemy, alembic,
    ...): pip install 'natserve[registry]'``."""

    def __init__(self, command: str, extras: Sequence[str], missing: Sequence[str], install: str) -> None:
        self.command = command
        self.extras = tuple(extras)
        self.missing = tuple(missing)
        self.install = install
        needs = " and ".join(filter(None, [", ".join(self.extras[:-1]), self.extras[-1]]))
        shown = ", ".join(self.missing[:_NAMES_SHOWN]) + (", ..." if len(self.missing) > _NAMES_SHOWN else "")
        plural = "s" if len(self.extras) > 1 else ""
        super().__init__(
            f"{command} needs the {needs} extra{plural} (not installed: {shown}): "
            f"pip install 'natserve[{install}]'"
        )


def require_extras(
    command: str, extras: Sequence[str], *, install: str | None = None, also_missing: Iterable[str] = ()
) -> None:
    """Raise :class:`MissingExtra` unless every module of ``extras`` is installed.

    ``install`` is the extra the message tells the user to install (by default the one extra
    asked for); ``also_missing`` adds what the caller found missing itself (a program, say).
    """
    lacking: list[str] = []
    # The first missing module of each extra comes first, so that the names the message shows
    # stand for every extra it names.
    first: list[str] = []
    rest: list[str] = []
    for extra in extras:
        absent = missing_modules(extra)
        if absent:
            lacking.append(extra)
            for i, name in enumerate(absent):
                if name not in first and name not in rest:
                    (first if i == 0 else rest).append(name)
    missing = [*first, *rest, *also_missing]
    if not missing:
        return
    if install is None:
        if len(extras) != 1:
            raise ValueError(f"name the extra to install for {command}: it needs {', '.join(extras)}")
        install = extras[0]
    raise MissingExtra(command, lacking or [install], missing, install)
