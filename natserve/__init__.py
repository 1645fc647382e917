"""natserve: an LLM inference worker pool driven by NATS.

The ``natserve`` command lives in :mod:`natserve.cli`, ``natserve up`` in :mod:`natserve.embedded`,
settings in :mod:`natserve.settings`. The Python client is :mod:`broker_client`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("natserve")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
