"""The OpenMP wait policy of a benchmark process, set before torch or llama.cpp loads OpenMP.

Both read ``OMP_WAIT_POLICY`` once, when their OpenMP runtime loads (one ``libgomp.so.1`` per
process: llama.cpp binds to the one torch loaded). ``None`` does what ``natserve worker`` does,
``PASSIVE`` unless the environment sets it; ``"unset"`` leaves libgomp's default (spin a while,
then sleep); any other value is set as it is.
"""

from __future__ import annotations

import os

__all__ = ["set_wait_policy"]


def set_wait_policy(policy: str | None) -> None:
    if policy is None:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    elif policy == "unset":
        os.environ.pop("OMP_WAIT_POLICY", None)
    else:
        os.environ["OMP_WAIT_POLICY"] = policy
