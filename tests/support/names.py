"""Unique names, so that tests sharing one nats-server never see each other's subjects."""

from __future__ import annotations

import uuid

import pytest

from broker_client import Subjects


@pytest.fixture
def unique() -> str:
    """A short unique token for model names, uids and prefixes."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def prefix(unique: str) -> str:
    """A subject prefix of the test's own."""
    return f"t{unique}"


@pytest.fixture
def subjects(prefix: str) -> Subjects:
    return Subjects(prefix)
