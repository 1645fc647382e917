"""The NATS micro protocol (ADR-32), as natserve's services answer it: subjects and replies.

Pure: the service host (``_service_host``) subscribes and publishes; this module says on which
subjects and with what. A service instance answers three verbs, each in three forms::

    $SRV.<VERB>               every service
    $SRV.<VERB>.<name>        every instance of one service
    $SRV.<VERB>.<name>.<id>   one instance

``PING`` answers who it is, ``INFO`` its endpoints, ``STATS`` what each endpoint did: requests,
errors, the last error and the time spent, in nanoseconds. The replies are JSON, the shapes of
the ``io.nats.micro.v1`` schemas, so that ``nats micro ls/info/stats`` show natserve's services.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

__all__ = [
    "DEFAULT_QUEUE_GROUP",
    "INFO_RESPONSE_TYPE",
    "PING_RESPONSE_TYPE",
    "STATS_RESPONSE_TYPE",
    "VERBS",
    "EndpointStats",
    "Identity",
    "check_endpoint",
    "check_service",
    "control_subjects",
    "info_response",
    "ping_response",
    "rfc3339",
    "stats_response",
]

PREFIX = "$SRV"
VERBS = ("PING", "INFO", "STATS")
PING_RESPONSE_TYPE = "io.nats.micro.v1.ping_response"
INFO_RESPONSE_TYPE = "io.nats.micro.v1.info_response"
STATS_RESPONSE_TYPE = "io.nats.micro.v1.stats_response"
# The queue group of an endpoint that names none, as every micro implementation has it.
DEFAULT_QUEUE_GROUP = "q"

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
# A subject: no spaces, and '>' only as its last token.
_SUBJECT = re.compile(r"^[^ >]+(?:\.>)?$|^>$")


def check_service(name: str, version: str) -> None:
    """ValueError unless ``name`` is a micro service name and ``version`` a semantic version."""
    if not _NAME.match(name):
        raise ValueError(f"service name {name!r} must hold only letters, digits, '-' and '_'")
    if not _SEMVER.match(version):
        raise ValueError(f"service version {version!r} of {name!r} is not a semantic version (1.2.3)")


def check_endpoint(name: str, subject: str, queue_group: str) -> None:
    """ValueError unless the endpoint's name, subject and queue group are valid."""
    if not _NAME.match(name):
        raise ValueError(f"endpoint name {name!r} must hold only letters, digits, '-' and '_'")
    if not _SUBJECT.match(subject):
        raise ValueError(f"endpoint {name!r}: subject {subject!r} has a space or a '>' before its end")
    if not _SUBJECT.match(queue_group):
        raise ValueError(f"endpoint {name!r}: queue group {queue_group!r} has a space or a '>'")


def control_subjects(verb: str, name: str, id: str) -> tuple[str, str, str]:
    """The three subjects one instance answers ``verb`` on: all, by name, by name and id."""
    return f"{PREFIX}.{verb}", f"{PREFIX}.{verb}.{name}", f"{PREFIX}.{verb}.{name}.{id}"


def rfc3339(moment: datetime) -> str:
    """A UTC time as RFC 3339 with milliseconds and ``Z``, as the micro clients parse it."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class Identity:
    """Who a service instance is: the part every reply starts with."""

    __slots__ = ("description", "id", "metadata", "name", "version")

    def __init__(
        self, name: str, id: str, version: str, description: str, metadata: Mapping[str, str]
    ) -> None:
        self.name = name
        self.id = id
        self.version = version
        self.description = description
        self.metadata = dict(metadata)

    def header(self, response_type: str) -> dict[str, Any]:
        return {
            "type": response_type,
            "name": self.name,
            "id": self.id,
            "version": self.version,
            "metadata": self.metadata,
        }


class EndpointStats:
    """One endpoint as the micro protocol shows it, with the counts its requests add up.

    The host adds to the counters as requests start and end (a few attribute updates per
    request); the average is worked out when someone asks.
    """

    __slots__ = (
        "last_error",
        "metadata",
        "name",
        "num_errors",
        "num_requests",
        "processing_time",
        "queue_group",
        "subject",
    )

    def __init__(self, name: str, subject: str, queue_group: str, metadata: Mapping[str, str]) -> None:
        self.name = name
        self.subject = subject
        self.queue_group = queue_group
        self.metadata = metadata
        self.num_requests = 0
        self.num_errors = 0
        self.last_error = ""
        # Nanoseconds, summed over the requests that ended.
        self.processing_time = 0

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "subject": self.subject,
            "queue_group": self.queue_group,
            "metadata": dict(self.metadata),
        }

    def stats(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "subject": self.subject,
            "queue_group": self.queue_group,
            "num_requests": self.num_requests,
            "num_errors": self.num_errors,
            "last_error": self.last_error,
            "processing_time": self.processing_time,
            "average_processing_time": self.processing_time // self.num_requests if self.num_requests else 0,
        }


def _json(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply, separators=(",", ":")).encode()


def ping_response(identity: Identity) -> bytes:
    return _json(identity.header(PING_RESPONSE_TYPE))


def info_response(identity: Identity, endpoints: Iterable[EndpointStats]) -> bytes:
    reply = identity.header(INFO_RESPONSE_TYPE)
    reply["description"] = identity.description
    reply["endpoints"] = [e.info() for e in endpoints]
    return _json(reply)


def stats_response(identity: Identity, started: datetime, endpoints: Iterable[EndpointStats]) -> bytes:
    reply = identity.header(STATS_RESPONSE_TYPE)
    reply["started"] = rfc3339(started)
    reply["endpoints"] = [e.stats() for e in endpoints]
    return _json(reply)
