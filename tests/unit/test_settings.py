"""natserve's settings as the CLI builds them: flags over the environment, and the worker's
warm-up switch."""

from __future__ import annotations

from pathlib import Path

import pytest

from natserve.settings import Settings


def test_settings_flags_over_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATSERVE_HOME", str(tmp_path / "env-home"))
    monkeypatch.setenv("NATSERVE_PREFIX", "fromenv")
    monkeypatch.delenv("NATSERVE_DB_URL", raising=False)
    settings = Settings.build(prefix=None, home=str(tmp_path / "flag-home"))
    assert settings.prefix == "fromenv"
    assert settings.home == tmp_path / "flag-home"
    # The SQLite default follows the home that won.
    assert settings.db_url == f"sqlite+aiosqlite:///{tmp_path / 'flag-home' / 'registry.db'}"
    monkeypatch.setenv("NATSERVE_LOG_LEVEL", "chatty")
    with pytest.raises(ValueError, match="log level"):
        Settings.build()


def test_warm_up_is_on_unless_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from natserve.cli import _settings, build_parser

    monkeypatch.delenv("NATSERVE_WARM_UP", raising=False)
    assert _settings(build_parser().parse_args(["worker"])).warm_up is True
    assert _settings(build_parser().parse_args(["up", "--no-warm-up"])).warm_up is False
    monkeypatch.setenv("NATSERVE_WARM_UP", "0")
    assert _settings(build_parser().parse_args(["worker"])).warm_up is False
