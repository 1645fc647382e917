"""Xinference's REST shapes for the custom-model workflow, translated to natserve's: pure.

The routes Xinference's ``RESTfulClient`` calls for register, launch, get, list, describe,
terminate and unregister (see :mod:`natserve.gateway.app`) send bodies with Xinference's own
fields, most of them ``null`` unless the caller set them. Those natserve has an equal of are
passed on, natserve's own launch options are taken too (``worker_id``, ``max_batch_size``,
``max_tokens_limit``, ``rate_limit``, ``timeout``), a field natserve cannot honour is a 400 that
names it unless it holds the value that asks for nothing, and an unknown one is a 400.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import InvalidField

__all__ = ["launch_arguments", "register_arguments"]

# Xinference's launch field -> AsyncClient.launch_model's keyword.
_LAUNCH_FIELDS = {
    "model_name": "model_name",
    "model_type": "model_type",
    "model_uid": "model_uid",
    "model_format": "model_format",
    "model_size_in_billions": "model_size_in_billions",
    "quantization": "quantization",
    "replica": "replica",
    "n_gpu": "n_gpu",
    "request_limits": "request_limits",
    # natserve's own
    "worker_id": "worker_id",
    "max_batch_size": "max_batch_size",
    "max_tokens_limit": "max_tokens_limit",
    "rate_limit": "rate_limit",
    "timeout": "timeout",
}


def _absent(v: Any) -> bool:
    return v is None or v == [] or v == {}


# Xinference's fields natserve has no equal of, and the values of them that ask for nothing.
_LAUNCH_NEUTRAL: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model_engine": (
        lambda v: v is None or (isinstance(v, str) and v.lower() == "transformers"),
        "natserve runs every model with transformers",
    ),
    "n_worker": (lambda v: v is None or (type(v) is int and v == 1), "a natserve replica runs on one worker"),
    "worker_ip": (_absent, "natserve places by worker_id, not by address"),
    "gpu_idx": (_absent, "natserve picks the device (n_gpu=0 asks for the CPU, worker_id pins a worker)"),
    "replica_config": (_absent, "natserve places the replicas itself (replica=N)"),
    "peft_model_config": (_absent, "natserve loads no adapters"),
    "model_path": (_absent, "give the path as the spec's model_uri when registering"),
    "enable_thinking": (_absent, "natserve has no thinking switch"),
    "enable_virtual_env": (lambda v: v is None or v is False, "natserve runs no virtual environments"),
    "virtual_env_packages": (_absent, "natserve runs no virtual environments"),
    "virtual_env_find_links": (_absent, "natserve runs no virtual environments"),
    "envs": (_absent, "natserve sets no environment per launch"),
}


def launch_arguments(body: Any, *, wait: bool) -> dict[str, Any]:
    """``POST /v1/models``: the keyword arguments of ``AsyncClient.launch_model``."""
    if type(body) is not dict:
        raise InvalidField(f"the launch body must be a JSON object, got {type(body).__name__}", param=None)
    arguments: dict[str, Any] = {"wait": wait, "progress": False}
    for key, value in body.items():
        target = _LAUNCH_FIELDS.get(key)
        if target is not None:
            if key == "n_gpu" and value is None:
                value = 0  # Xinference's n_gpu=None means the CPU only
            if value is not None:
                arguments[target] = value
            continue
        neutral = _LAUNCH_NEUTRAL.get(key)
        if neutral is None:
            raise InvalidField(
                f"{key!r} is not a launch option natserve knows", param=key, code="unsupported_parameter"
            )
        check, why = neutral
        if not check(value):
            raise InvalidField(
                f"{key} {value!r} is not supported: {why}", param=key, code="unsupported_value"
            )
    if "model_name" not in arguments:
        raise InvalidField("'model_name' is required", param="model_name", code="missing")
    return arguments


def register_arguments(model_type: str, body: Any) -> dict[str, Any]:
    """``POST /v1/model_registrations/{model_type}``: ``AsyncClient.register_model``'s arguments."""
    if type(body) is not dict:
        raise InvalidField(f"the register body must be a JSON object, got {type(body).__name__}", param=None)
    arguments: dict[str, Any] = {"model_type": model_type, "persist": False}
    for key, value in body.items():
        if key == "model":
            if not isinstance(value, str | dict):
                raise InvalidField(
                    "model must be the definition, as a JSON string or an object", param="model"
                )
            arguments["model"] = value
        elif key == "persist":
            if value is not None and type(value) is not bool:
                raise InvalidField(f"persist must be a boolean, got {value!r}", param="persist")
            arguments["persist"] = bool(value)
        elif key == "worker_ip":
            if value is not None:
                raise InvalidField(
                    "worker_ip is not supported: a natserve registration holds for the whole pool",
                    param="worker_ip",
                    code="unsupported_value",
                )
        else:
            raise InvalidField(
                f"{key!r} is not a field of a registration", param=key, code="unsupported_parameter"
            )
    if "model" not in arguments:
        raise InvalidField("'model' is required: the definition", param="model", code="missing")
    return arguments
