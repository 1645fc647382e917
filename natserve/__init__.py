"""natserve: an LLM inference worker pool driven by NATS.

The ``natserve`` command lives in :mod:`natserve.cli`, ``natserve up`` in :mod:`natserve.embedded`,
settings in :mod:`natserve.settings`. The Python client is :mod:`broker_client`.
"""

from broker_client import __version__

__all__ = ["__version__"]
