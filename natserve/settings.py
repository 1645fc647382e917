"""Settings of the natserve processes: flags first, then ``NATSERVE_*`` environment variables.

Built once in ``natserve.cli.main()`` and passed down; nothing reads them at import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NATSERVE_", extra="ignore")

    home: Path = Field(default=Path("~/.natserve"), description="state: SQLite registry, NATS store")
    nats_url: str = "nats://127.0.0.1:4222"
    db_url: str | None = Field(default=None, description="SQLAlchemy async URL; SQLite in home if unset")
    prefix: str = "natserve"
    device: str | None = Field(default=None, description="cuda:N or cpu; the best local one if unset")
    worker_id: str | None = None
    # At most what the registry takes in a heartbeat (broker_client's MAX_HEARTBEAT_INTERVAL).
    heartbeat_interval: float = Field(default=2.0, gt=0, le=600)
    drain_timeout: float = Field(default=30.0, ge=0)
    # Concurrent batch-job requests per ready replica (workers/batches.py); 0 takes no batch work.
    batch_slots: int = Field(default=2, ge=0, le=256)
    # Online requests in flight per replica at which it starts no batch request; 0: never pauses.
    batch_pause_at: int = Field(default=4, ge=0, le=100_000)
    # The registry's dead window: a worker unheard of this long is dead (registry_service/
    # directory.py); default max(6 s, 3 x the worker's heartbeat interval).
    dead_after: float | None = Field(default=None, gt=0)
    # Models that start on demand (registry_service/ondemand/): the requests the registry holds
    # per model while it starts, and the seconds each may wait (429 and 504 past them).
    hold_max_requests: int = Field(default=1000, ge=1, le=1_000_000)
    hold_max_age: float = Field(default=300.0, gt=0, le=86400)
    # The bytes of each device a worker offers at most (its heartbeats report no more).
    memory_limit: int | None = Field(default=None, ge=1)
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"
    # Prometheus /metrics of the registry and/or worker of this process; off when unset.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    # Worker policy (workers/limits.py).
    allow_remote_code: bool = False
    model_roots: str | None = Field(
        default=None,
        description="directories model_uri paths must be in, os.pathsep-separated; "
        "default $NATSERVE_HOME/models and the Hugging Face cache",
    )
    max_tokens_limit: int | None = Field(default=None, ge=1)
    rate_limit: float | None = Field(default=None, gt=0, le=1e6)
    max_request_bytes: int | None = Field(default=None, ge=1)
    # Import torch and the model-loading code on a thread once a worker answers (workers/loading/
    # warmup.py): a launch after it does not pay seconds of imports.
    warm_up: bool = True
    # The CPU runner (workers/settings.py, docs/benchmarks.md): NATSERVE_CPU_KV=padded for the
    # left-padded dynamic cache, NATSERVE_TORCH_THREADS, NATSERVE_CPU_DTYPE=bfloat16.
    cpu_kv: Literal["slots", "padded"] = "slots"
    torch_threads: int | None = Field(default=None, ge=1, le=1024)
    cpu_dtype: Literal["float32", "bfloat16"] | None = None
    # The HTTP gateway (natserve/gateway): `natserve gateway --host/--port`; `natserve up` starts
    # one on http_host:http_port unless `--no-http` (NATSERVE_HTTP=0).
    http: bool = True
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=9997, ge=0, le=65535)
    http_max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    # Optional API keys of the gateway: comma-separated, and/or a file of one key a line.
    api_keys: str | None = Field(default=None, repr=False)
    api_keys_file: Path | None = None

    @field_validator("home", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("log_format", mode="before")
    @classmethod
    def _format(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("log_level", mode="after")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"{value!r} is not a log level (DEBUG, INFO, WARNING, ERROR)")
        return level

    @model_validator(mode="after")
    def _default_db(self) -> Settings:
        if not self.db_url:
            self.db_url = f"sqlite+aiosqlite:///{self.home / 'registry.db'}"
        return self

    @classmethod
    def build(cls, **overrides: Any) -> Settings:
        """Settings from the environment, with the flags that were given (not None) on top."""
        return cls(**{k: v for k, v in overrides.items() if v is not None})

    @property
    def database_url(self) -> str:
        assert self.db_url is not None
        return self.db_url
