"""How the control plane answers while ``natserve up`` starts: registry and ``$SRV`` calls from
its ready line until well after the worker's warm-up is over.

``natserve up`` runs as a user runs it (its own home and port, the warm-up on, as by default).
From its ready line on, a prober sends one call every ``--every`` seconds, on a fixed schedule
whatever the answers do (so that a stall delays every call sent during it, as it would delay
real clients), round-robin over:

    registry   natserve.registry.list, natserve.models.list, natserve.workers.list
    $SRV       $SRV.PING / $SRV.INFO / $SRV.STATS of natserve-registry and of natserve-worker

and times each from its scheduled send to its answer. It stops ``--after`` seconds after the
worker's warm-up ended (its "model loader warmed up" log line), or at ``--seconds``. Reports
p50 / p99 / max per group and the worst second; ``--compare`` runs once more with
``--no-warm-up`` (no imports after ready: the floor).

    python bench/startup.py [--every 0.02] [--after 3] [--seconds 40] [--compare] [--json]

Target (issue 13): every group within 100 ms at p99 throughout start-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

REGISTRY_CALLS = ["registry.list", "models.list", "workers.list"]
SRV_CALLS = [
    f"$SRV.{verb}.{service}"
    for service in ("natserve-registry", "natserve-worker")
    for verb in ("PING", "INFO", "STATS")
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Up:
    """``natserve up`` as a subprocess, its stderr watched for the warm-up's end."""

    home: Path
    port: int
    warm_up: bool
    proc: subprocess.Popen[str] | None = None
    ready_at: float = 0.0
    ready_line: str = ""
    warmed_at: float | None = None
    log: list[str] = field(default_factory=list)

    def start(self, timeout: float = 120.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NATSERVE_")}
        env.update(NATSERVE_HOME=str(self.home), NATSERVE_LOG_LEVEL="INFO")
        args = [sys.executable, "-m", "natserve", "up", "--port", str(self.port), "--device", "cpu"]
        if not self.warm_up:
            args.append("--no-warm-up")
        started = time.monotonic()
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        threading.Thread(target=self._pump_err, daemon=True).start()
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if "ready on" in line:
                self.ready_at, self.ready_line = time.monotonic(), line.strip()
                break
            if time.monotonic() - started > timeout:
                break
        if not self.ready_at:
            raise RuntimeError(f"natserve up did not get ready:\n{''.join(self.log[-20:])}")
        self.startup = self.ready_at - started

    def _pump_err(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            if "warmed up in" in line and self.warmed_at is None:
                self.warmed_at = time.monotonic()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


async def probe(
    up: Up, *, every: float, after: float, seconds: float
) -> dict[str, list[tuple[float, float]]]:
    """(seconds since ready, latency) of every call, per subject."""
    import nats

    token = (up.home / "nats.token").read_text().strip()
    nc = await nats.connect(f"nats://127.0.0.1:{up.port}", token=token)
    subjects = [f"natserve.{s}" for s in REGISTRY_CALLS] + SRV_CALLS
    results: dict[str, list[tuple[float, float]]] = {s: [] for s in subjects}
    tasks: set[asyncio.Task[None]] = set()

    async def call(subject: str, due: float) -> None:
        try:
            await nc.request(subject, b"{}" if subject.startswith("natserve.") else b"", timeout=10)
            results[subject].append((due - up.ready_at, time.monotonic() - due))
        except Exception:
            results[subject].append((due - up.ready_at, float("inf")))

    n = 0
    start = time.monotonic()
    while True:
        due = start + n * every
        now = time.monotonic()
        if due > now:
            await asyncio.sleep(due - now)  # the schedule, not a synchronisation
        end = (up.warmed_at + after) if up.warmed_at is not None else up.ready_at + seconds
        if time.monotonic() > min(end, up.ready_at + seconds):
            break
        task = asyncio.create_task(call(subjects[n % len(subjects)], due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        n += 1
    if tasks:
        await asyncio.wait(tasks, timeout=15)
    await nc.close()
    return results


def summary(results: dict[str, list[tuple[float, float]]]) -> dict[str, Any]:
    groups = {
        "registry": [f"natserve.{s}" for s in REGISTRY_CALLS],
        "$SRV natserve-registry": [s for s in SRV_CALLS if s.endswith("natserve-registry")],
        "$SRV natserve-worker": [s for s in SRV_CALLS if s.endswith("natserve-worker")],
    }
    out: dict[str, Any] = {}
    for name, subjects in groups.items():
        points = [p for s in subjects for p in results[s]]
        times = sorted(lat for _, lat in points)
        if not times:
            continue
        worst = max(points, key=lambda p: p[1])
        out[name] = {
            "calls": len(times),
            "p50_ms": round(statistics.median(times) * 1000, 1),
            "p99_ms": round(times[min(len(times) - 1, int(0.99 * len(times)))] * 1000, 1),
            "max_ms": round(times[-1] * 1000, 1),
            "worst_at_s": round(worst[0], 2),
            "over_100ms": sum(1 for t in times if t > 0.1),
        }
    return out


def run(warm_up: bool, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="natserve-startup-") as home:
        up = Up(Path(home), free_port(), warm_up)
        up.start()
        try:
            results = asyncio.run(probe(up, every=args.every, after=args.after, seconds=args.seconds))
        finally:
            up.stop()
        return {
            "warm_up": warm_up,
            "ready_s": round(up.startup, 2),
            "warm_up_ended_s_after_ready": round(up.warmed_at - up.ready_at, 2) if up.warmed_at else None,
            "groups": summary(results),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--every", type=float, default=0.02, help="seconds between two calls (default 0.02)")
    parser.add_argument("--after", type=float, default=3.0, help="seconds to go on after the warm-up ended")
    parser.add_argument("--seconds", type=float, default=40.0, help="longest probe after ready")
    parser.add_argument("--compare", action="store_true", help="also run with --no-warm-up")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    runs = [run(True, args)]
    if args.compare:
        # As long as the run with the warm-up lasted: the same stretch of start-up.
        ended = runs[0]["warm_up_ended_s_after_ready"]
        if ended is not None:
            args.seconds = min(args.seconds, ended + args.after)
        runs.append(run(False, args))
    if args.json:
        print(json.dumps(runs, indent=2))
        return 0
    for r in runs:
        print(
            f"warm-up {'on' if r['warm_up'] else 'off'}: ready in {r['ready_s']} s; "
            f"warm-up ended {r['warm_up_ended_s_after_ready']} s after ready"
        )
        for name, g in r["groups"].items():
            print(
                f"  {name:24} {g['calls']:5} calls  p50 {g['p50_ms']:6.1f} ms  p99 {g['p99_ms']:6.1f} ms  "
                f"max {g['max_ms']:7.1f} ms (at +{g['worst_at_s']} s)  >100 ms: {g['over_100ms']}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
