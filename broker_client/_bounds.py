"""The bounds of what natserve takes on the wire: sizes, counts and ranges, in one place.

Every request model and the model definition take their limits from here, so that the registry,
the workers and the client (which checks before sending) refuse the same things with a 400 naming
the field. They are far above what real use needs and far below what would cost a service memory
or time: a definition of 10 MB stored and served on every list, a ``replica_index`` of 2**63, a
heartbeat that keeps a worker alive for years.
"""

from __future__ import annotations

__all__ = [
    "DEVICE_PATTERN",
    "INT64_MAX",
    "INT64_MIN",
    "MAX_BATCH_SIZE",
    "MAX_CHOICES",
    "MAX_CONTEXT_LENGTH",
    "MAX_DEFINITION_BYTES",
    "MAX_DESCRIPTION",
    "MAX_DEVICES",
    "MAX_HEARTBEAT_INTERVAL",
    "MAX_IDLE_TIMEOUT",
    "MAX_KEEPALIVE",
    "MAX_LIST",
    "MAX_LOGIT_BIAS",
    "MAX_LOGPROBS",
    "MAX_N",
    "MAX_PATTERN",
    "MAX_RECENT_ERRORS",
    "MAX_REPLICAS",
    "MAX_REQUEST_LIMITS",
    "MAX_SPECS",
    "MAX_STOP",
    "MAX_STOP_CHARS",
    "MAX_STOP_TOKEN_IDS",
    "MAX_TEXT",
    "MAX_TOKENS",
    "MAX_TOOLS",
    "MAX_WORKER_REPLICAS",
]

# A model definition, as JSON: chat templates run to tens of kilobytes, nothing real to 256.
MAX_DEFINITION_BYTES = 256 * 1024
# Specs of one definition, and the other lists of a definition (languages, architectures...).
MAX_SPECS = 64
MAX_LIST = 64
# A free-text field of a definition or a heartbeat (descriptions, names of things).
MAX_TEXT = 4096
# Tokens: a context window (the longest models have 10M), a request's max_tokens.
MAX_CONTEXT_LENGTH = 1 << 24
MAX_TOKENS = 1 << 24
# Stop strings and stop token ids of a request or a definition.
MAX_STOP = 256
MAX_STOP_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
# What a request may ask of the sampler, as OpenAI bounds it: choices per request (n), top
# alternatives per token (logprobs / top_logprobs), logit_bias entries (OpenAI takes 300; a
# vocabulary's worth would cost a per-row tensor of that size), tools of a chat (OpenAI: 128).
MAX_N = 16
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024
MAX_TOOLS = 128
# A constraint: a regex's characters, the strings a choice picks from.
MAX_PATTERN = 16384
MAX_CHOICES = 256
# A tool's or a JSON schema's description (tool descriptions run to a few kilobytes).
MAX_DESCRIPTION = 16384
# Replicas of a launch (so a replica index is below it), requests per replica, a batch.
MAX_REPLICAS = 64
MAX_REQUEST_LIMITS = 1 << 16
MAX_BATCH_SIZE = 1024
# The most chunks a stream's reader may take between two keepalive acks (_keepalive.py).
MAX_KEEPALIVE = 1024
# Heartbeats: devices and replicas of one worker, its recent errors, the longest interval (the
# dead window is three of them: a forged interval must not keep a worker alive for years).
MAX_DEVICES = 64
MAX_WORKER_REPLICAS = 4096
MAX_RECENT_ERRORS = 64
MAX_HEARTBEAT_INTERVAL = 600.0
# A device a worker loads on: "cpu", "cuda" or "cuda:N", nothing else (it reaches torch, file
# names and log lines).
DEVICE_PATTERN = r"^(cpu|cuda(:[0-9]{1,3})?)$"
# Seeds and other integers that reach torch or msgpack as 64-bit values.
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
# The longest idle timeout of a model that starts on demand: a month, far above any real use.
MAX_IDLE_TIMEOUT = 30 * 86400.0
