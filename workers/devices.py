"""The devices this worker can load models on, with their memory, and which one to prefer.

CPU memory comes from ``/proc/meminfo`` (``MemAvailable`` is what the kernel could hand out
without swapping, which is the number placement needs), falling back to ``os.sysconf`` where
there is no procfs. CUDA memory comes from ``torch.cuda.mem_get_info``, which asks the driver,
so it sees other processes on the same GPU too.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from broker_client import DeviceInfo

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = [
    "best_device",
    "cpu_device",
    "cuda_devices",
    "device_info",
    "free_memory",
    "gpu_driver_possible",
    "list_devices",
]

_MEMINFO = Path("/proc/meminfo")


def _meminfo() -> dict[str, int]:
    """``/proc/meminfo`` in bytes; empty where there is none (macOS, some sandboxes)."""
    values: dict[str, int] = {}
    try:
        text = _MEMINFO.read_text()
    except OSError:
        return values
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if not parts or not parts[0].isdigit():
            continue
        scale = 1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1
        values[key.strip()] = int(parts[0]) * scale
    return values


def _sysconf(name: str) -> int:
    try:
        value = os.sysconf(name)
    except (AttributeError, OSError, ValueError):
        return 0
    return max(int(value), 0)


def _cpu_description() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count() or 1} cores)".strip()


def cpu_device() -> DeviceInfo:
    info = _meminfo()
    total = info.get("MemTotal", 0)
    free = info.get("MemAvailable", info.get("MemFree", 0))
    if not total:
        page = _sysconf("SC_PAGE_SIZE")
        total = page * _sysconf("SC_PHYS_PAGES")
        # SC_AVPHYS_PAGES does not count reclaimable caches, so it underestimates; better than 0.
        free = page * _sysconf("SC_AVPHYS_PAGES")
    return DeviceInfo(
        name="cpu", kind="cpu", total_memory=total, free_memory=free, description=_cpu_description()
    )


# Device nodes that a GPU driver torch can use creates on Linux: NVIDIA (desktop and server,
# Jetson), ROCm, WSL's GPU paravirtualisation. With none of them torch sees no GPU, and the
# worker need not import torch (1-3 s) to learn that.
_GPU_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/nvhost-ctrl-gpu", "/dev/kfd", "/dev/dxg")


def gpu_driver_possible() -> bool:
    """False where torch cannot see a GPU: Linux without any GPU driver's device node."""
    return not sys.platform.startswith("linux") or any(os.path.exists(node) for node in _GPU_NODES)


def _cuda_available() -> bool:
    if "torch" not in sys.modules and not gpu_driver_possible():
        return False
    try:
        import torch
    except ImportError:
        return False
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # a broken driver install must not take the worker down
        logger.warning("torch.cuda.is_available() failed", exc_info=True)
        return False


def cuda_devices() -> list[DeviceInfo]:
    if not _cuda_available():
        return []
    import torch

    devices = []
    for index in range(torch.cuda.device_count()):
        try:
            free, total = torch.cuda.mem_get_info(index)
            name = torch.cuda.get_device_name(index)
        except Exception:
            logger.warning("cannot query cuda:%d", index, exc_info=True)
            continue
        devices.append(
            DeviceInfo(
                name=f"cuda:{index}",
                kind="cuda",
                total_memory=int(total),
                free_memory=int(free),
                description=name,
            )
        )
    return devices


def list_devices() -> list[DeviceInfo]:
    """Every CUDA device, then the CPU (which is always there)."""
    return [*cuda_devices(), cpu_device()]


def device_info(name: str) -> DeviceInfo | None:
    """The current state of one device by name (``cpu``, ``cuda:0``; ``cuda`` means ``cuda:0``)."""
    if name == "cuda":
        name = "cuda:0"
    if name == "cpu":
        return cpu_device()
    for device in cuda_devices():
        if device.name == name:
            return device
    return None


def best_device() -> str:
    """The CUDA device with the most free memory, else ``cpu``."""
    gpus = cuda_devices()
    if gpus:
        return max(gpus, key=lambda d: d.free_memory).name
    return "cpu"


def free_memory(device: str | torch.device | None = None) -> None:
    """Return what dropped models held: a garbage collection, then, for a CUDA device (or for
    ``None``: any), the CUDA caching allocator's unused blocks.

    torch is not imported for it: a process that never imported torch holds no CUDA memory.
    """
    gc.collect()
    if device is not None and not str(device).startswith("cuda"):
        return
    loaded = sys.modules.get("torch")
    if loaded is None:
        return
    # A broken driver must not turn a clean-up (after a failed launch, say) into a new error.
    with contextlib.suppress(Exception):
        if loaded.cuda.is_available():
            loaded.cuda.empty_cache()
