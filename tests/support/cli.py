"""The ``natserve`` command as users run it: one command to its end (``natserve``), or a
long-running one (``Running``: ``natserve up``, ``registry``, ``worker``) whose output is read on
threads."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This environment without NATSERVE_* variables, a home in ``tmp_path``, and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATSERVE_")}
    env["NATSERVE_HOME"] = str(tmp_path / "home")
    env.update(extra)
    return env


def natserve(*args: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """One CLI command; ``env`` adds environment variables (NATSERVE_* from the caller are dropped)."""
    return subprocess.run(
        [sys.executable, "-m", "natserve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(tmp_path, **env),
    )


def assert_one_error_line(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The command failed with ``code`` and said why in one ``error: ...`` line; returns it."""
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    return lines[0]


class Running:
    """A long-running ``natserve`` command as a subprocess, its output read on threads."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "natserve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._pump_err, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _pump_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no ready line in {timeout} s:\n{''.join(self.stderr[-30:])}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(
                    f"natserve exited ({self.proc.wait()}) before ready:\n{''.join(self.stderr[-30:])}"
                )
            if "ready" in line:
                return line

    def children(self, name: str) -> list[int]:
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().split(") ")
                comm = fields[0].split(" (", 1)[1]
                ppid = int(fields[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == self.proc.pid and comm == name:
                pids.append(int(stat.parent.name))
        return pids

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
