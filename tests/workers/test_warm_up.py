"""The worker's warm-up does not stall the services beside it: no garbage collection runs while
its imports make their 460,000 objects, they are frozen afterwards, and torch's libraries are
loaded without the GIL (``workers/loading/warmup.py``; ``bench/startup.py`` measures the calls).

Each check runs in a fresh interpreter, the one a worker is: the imports happen once per process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = r"""
import asyncio, gc, json, sys, threading, time
sys.path.insert(0, sys.argv[1])
collections = []
gc.callbacks.append(lambda phase, info: phase == "start" and collections.append(info["generation"]))
from workers.loading.warmup import warm_up

async def main():
    done = threading.Event()
    result = {}

    def warm():
        collections.clear()  # those of the imports above
        result["seconds"] = warm_up()
        result["collections"] = list(collections)
        done.set()

    threading.Thread(target=warm).start()
    longest = 0.0
    while not done.is_set():
        started = time.perf_counter()
        await asyncio.sleep(0.005)
        longest = max(longest, time.perf_counter() - started - 0.005)
    result["longest_stall"] = longest
    result["frozen"] = gc.get_freeze_count()
    result["gc_enabled"] = gc.isenabled()
    print(json.dumps(result))

asyncio.run(main())
"""


def probe() -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(ROOT)], capture_output=True, text=True, timeout=300, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert isinstance(result, dict)
    return result


@pytest.mark.slow
def test_no_collection_runs_during_the_warm_up_and_its_objects_are_frozen() -> None:
    result = probe()
    assert isinstance(result["seconds"], float) and result["seconds"] > 0
    # Each full collection walked every object the imports had made so far: 100-380 ms apiece.
    assert result["collections"] == [], f"collections ran during the warm-up: {result['collections']}"
    assert isinstance(result["frozen"], int) and result["frozen"] > 100_000
    assert result["gc_enabled"] is True
    # Informational on a loaded machine; the warm-up alone held the GIL 150-400 ms at a time.
    print(f"longest event-loop stall during the warm-up: {result['longest_stall'] * 1000:.0f} ms")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux: dlopen through ctypes")
def test_torchs_libraries_are_loaded_before_its_import() -> None:
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from workers.loading.warmup import preload_torch_libraries\n"
        "n = preload_torch_libraries()\n"
        "maps = open('/proc/self/maps').read()\n"
        "assert 'libtorch_cpu' in maps and 'torch' not in sys.modules, maps[:200]\n"
        "import torch\n"
        "print(n, preload_torch_libraries(), torch.ones(2).sum().item())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(ROOT)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    loaded, again, total = out.stdout.split()
    # libtorch_global_deps and the torch._C extension; nothing once torch is imported.
    assert int(loaded) == 2 and int(again) == 0 and float(total) == 2.0
