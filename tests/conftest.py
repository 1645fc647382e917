"""The root conftest: registers the support modules that define fixtures, and nothing else.

Fixtures and helpers live in ``tests/support`` (one module per concept, see its docstring);
test modules import helpers from there, never from a conftest.
"""

import pytest

# Before the modules are imported: their asserts report as a test module's do.
pytest.register_assert_rewrite("tests.support")

pytest_plugins = [
    "tests.support.nats_server",
    "tests.support.databases",
    "tests.support.names",
    "tests.support.models",
    "tests.support.registry",
    "tests.support.system",
    "tests.support.pool",
]
