"""Placement by memory, pure: the estimate of what a replica needs (weights by quantization and
device, the KV cache by context and batch) and the rules that place replicas where they fit.
The registry placing and re-placing them with fake workers is tests/registry/test_placement.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from broker_client import DeviceInfo, Unavailable, WorkerInfo
from registry_service.memory import GIB, estimate_bytes
from registry_service.placement import place_replicas

# ---------------------------------------------------------------------------- the estimate


def spec(size: float, **extra: Any) -> dict[str, Any]:
    return {"model_format": "pytorch", "model_size_in_billions": size, "model_id": "org/m", **extra}


def test_weights_follow_the_quantization_and_the_device() -> None:
    def need(q: str, kind: str) -> int:
        return estimate_bytes(spec(7), quantization=q, device_kind=kind, model_type="embedding")

    # Weights and overhead only for an embedding model: 2 B/param fp16 on a GPU, fp32 on the CPU.
    assert abs(need("none", "cpu") - 2 * (need("none", "cuda") - (512 << 20))) <= 2
    assert need("8-bit", "cuda") < need("none", "cuda") / 1.6
    assert need("4-bit", "cuda") < need("8-bit", "cuda") / 1.4
    assert 7e9 * 2 < need("none", "cuda") < 7e9 * 2 * 1.3


def test_the_kv_cache_grows_with_the_context_and_the_batch() -> None:
    def need(**kw: Any) -> int:
        return estimate_bytes(spec(8), quantization="none", device_kind="cuda", **kw)

    assert need(context_length=1024) < need(context_length=2048)
    # The static engine's KV length is capped at 2048 positions per slot.
    assert need(context_length=2048) == need(context_length=32768)
    assert need(context_length=2048, max_batch_size=8) < need(context_length=2048, max_batch_size=32)
    # An 8B fp16 model with 32 slots of 2048 tokens: ~27 GiB (the real Llama 3 8B: ~25 GiB).
    assert 24 * GIB < need(context_length=8192) < 30 * GIB


def test_the_cpu_counts_its_slots_at_start_and_one_long_request() -> None:
    """The CPU's static slots: max_batch x 256 positions allocated at start, plus one full
    context of growth, in fp32 (twice the GPU's fp16 per token)."""

    def kv(kind: str, **kw: Any) -> int:
        with_kv = estimate_bytes(spec(1), quantization="none", device_kind=kind, **kw)
        without = estimate_bytes(spec(1), quantization="none", device_kind=kind, model_type="embedding")
        return with_kv - without

    per_token = kv("cuda", context_length=256, max_batch_size=1) * 2 / 256  # fp32 on the CPU
    assert kv("cpu", context_length=2048, max_batch_size=32) == pytest.approx(
        per_token * (32 * 256 + 2048), rel=1e-6
    )
    assert kv("cpu", context_length=2048, max_batch_size=8) == pytest.approx(
        per_token * (8 * 256 + 2048), rel=1e-6
    )
    # A context shorter than the initial slots: the slots are that short.
    assert kv("cpu", context_length=128, max_batch_size=4) == pytest.approx(
        per_token * (4 * 128 + 128), rel=1e-6
    )
    assert kv("cpu", context_length=8192) > kv("cpu", context_length=2048)


def test_echo_and_unsized_models_need_nothing() -> None:
    assert estimate_bytes(spec(70, model_uri="echo:"), quantization="none", device_kind="cuda") == 0
    assert estimate_bytes({"model_id": "org/m"}, quantization="none", device_kind="cuda") == 0


# ---------------------------------------------------------------------------- placement


def gguf(size: float, quantization: str, **kw: Any) -> int:
    spec = {
        "model_format": "ggufv2",
        "model_size_in_billions": size,
        "model_id": "org/m-GGUF",
        "model_file_name_template": "m.{quantization}.gguf",
    }
    return estimate_bytes(spec, quantization=quantization, device_kind="cpu", **kw)


def test_a_gguf_model_costs_its_file_and_the_kv_of_every_sequence() -> None:
    # The weights follow the GGUF type's bits per weight: Q4_K_M ~ 4.9, Q8_0 8.5, F16 16.
    base = gguf(7, "Q4_K_M", context_length=256, max_batch_size=1)
    assert 7e9 * 4.89 / 8 < base < 7e9 * 4.89 / 8 * 1.05 + 300 * (1 << 20)
    assert gguf(7, "Q8_0", context_length=256, max_batch_size=1) - base == pytest.approx(
        7e9 * (8.5 - 4.89) / 8 * 1.05, rel=0.01
    )
    assert gguf(7, "F16", context_length=256, max_batch_size=1) > gguf(
        7, "Q8_0", context_length=256, max_batch_size=1
    )
    # Unlisted types by the number in their name; lower case as Xinference's templates use it.
    assert gguf(7, "q4_k_m", context_length=256) == gguf(7, "Q4_K_M", context_length=256)
    assert gguf(7, "Q5_K_S", context_length=256) < gguf(7, "Q6_K", context_length=256)

    # Every sequence has the KV cells of a whole context (in 256s): linear in both.
    def kv(context: int, batch: int) -> int:
        return gguf(7, "Q4_K_M", context_length=context, max_batch_size=batch)

    per_sequence = kv(2048, 2) - kv(2048, 1)
    assert kv(2048, 8) - kv(2048, 4) == pytest.approx(4 * per_sequence, abs=8)
    assert kv(4096, 2) - kv(4096, 1) == pytest.approx(2 * per_sequence, abs=8)
    assert gguf(7, "Q4_K_M", context_length=2000, max_batch_size=1) == gguf(
        7, "Q4_K_M", context_length=2048, max_batch_size=1
    )
    # The default: a context of 2048 for 32 sequences; a 7B model's f16 KV is ~128 KiB a token.
    default = gguf(7, "Q4_K_M") - base
    assert 6 * GIB < default < 10 * GIB
    # The same on a GPU placement: llama.cpp runs on the CPU.
    assert gguf(7, "Q4_K_M") == estimate_bytes(
        {"model_format": "ggufv2", "model_size_in_billions": 7, "model_id": "org/m-GGUF"},
        quantization="Q4_K_M",
        device_kind="cuda",
    )


def worker(worker_id: str, *gpus: float, cpu: float = 8, status: str | None = None) -> WorkerInfo:
    devices = [
        DeviceInfo(name=f"cuda:{i}", kind="cuda", total_memory=80 * GIB, free_memory=int(free * GIB))
        for i, free in enumerate(gpus)
    ]
    devices.append(DeviceInfo(name="cpu", kind="cpu", total_memory=64 * GIB, free_memory=int(cpu * GIB)))
    extra = {"status": status} if status else {}
    return WorkerInfo.model_validate(
        {
            "worker_id": worker_id,
            "host": "h",
            "pid": 1,
            "version": "0",
            "devices": devices,
            "started_at": 0,
            "last_seen": 0,
            "heartbeat_interval": 2,
            **extra,
        }
    )


def gib(n: float) -> Callable[[str], int]:
    return lambda kind: int(n * GIB)


def test_replicas_go_where_they_fit() -> None:
    alive = [worker("big", 30), worker("small", 6)]
    # 10 GiB fits on big only: both replicas there, one per worker when it can.
    assert [p.worker_id for p in place_replicas(alive, 2, need=gib(10))] == ["big", "big"]
    assert [p.worker_id for p in place_replicas(alive, 2, need=gib(5))] == ["big", "small"]
    # What this registry promised to replicas still loading counts as taken.
    with pytest.raises(Unavailable, match=r"most free memory seen is 6\.0 GiB"):
        place_replicas(alive, 1, need=gib(10), reserved={("big", "cuda:0"): 25 * GIB})
    # And one launch's replicas count against each other.
    assert [p.worker_id for p in place_replicas([worker("one", 25)], 2, need=gib(10))] == ["one", "one"]
    with pytest.raises(Unavailable, match="replica 2"):
        place_replicas([worker("one", 25)], 3, need=gib(10))


def test_replicas_of_one_model_go_to_different_workers_while_there_are_enough() -> None:
    alive = [worker("a", 30), worker("b", 20), worker("c", 10)]
    # A launch spreads its replicas, whatever the memory says.
    assert sorted(p.worker_id for p in place_replicas(alive, 3, need=gib(5))) == ["a", "b", "c"]
    # A re-placed replica counts the siblings it still has: replica 1, lost, while replica 0 is
    # on a (the most free memory), goes to b; with siblings on a and b, to c.
    [p] = place_replicas(alive, 1, need=gib(5), first_index=1, siblings={"a": 1})
    assert (p.replica_index, p.worker_id) == (1, "b")
    [p] = place_replicas(alive, 1, need=gib(5), first_index=2, siblings={"a": 1, "b": 1})
    assert p.worker_id == "c"
    # A preference: with room only beside a sibling, it shares that worker rather than fail.
    [p] = place_replicas(alive, 1, need=gib(25), first_index=1, siblings={"a": 1})
    assert p.worker_id == "a"
    # And with every worker holding one, the one with the most room takes the next.
    [p] = place_replicas(alive, 1, need=gib(5), first_index=3, siblings={"a": 1, "b": 1, "c": 1})
    assert p.worker_id == "a"


def test_nothing_has_room_names_the_need_and_the_most_free_memory() -> None:
    alive = [worker("a", 20), worker("b", 40), worker("c", cpu=100)]
    with pytest.raises(Unavailable) as info:
        place_replicas(alive, 1, need=gib(767.1), what="'huge' (1000B parameters, 4-bit)")
    message = info.value.message
    assert "replica 0 of 'huge' (1000B parameters, 4-bit)" in message
    # The device with the most free memory is c's CPU (a CPU-only worker is a candidate too).
    assert "needs about 767.1 GiB on the CPU" in message
    assert "most free memory seen is 100.0 GiB (cpu of worker 'c')" in message
    with pytest.raises(
        Unavailable, match=r"on a GPU; the most free memory seen is 40.0 GiB \(cuda:0 of worker 'b'\)"
    ):
        place_replicas(alive[:2], 1, need=gib(767.1))


def test_stopping_workers_take_no_replicas() -> None:
    alive = [worker("leaving", 80, status="stopping"), worker("staying", 10)]
    assert [p.worker_id for p in place_replicas(alive, 2)] == ["staying", "staying"]
    with pytest.raises(Unavailable, match="is stopping"):
        place_replicas(alive, 1, worker_id="leaving")


def test_a_pinned_worker_without_room_is_a_503() -> None:
    with pytest.raises(Unavailable, match=r"needs about 50\.0 GiB"):
        place_replicas([worker("a", 80), worker("b", 10)], 1, worker_id="b", need=gib(50))


def test_cpu_8bit_counts_the_fp32_embedding_and_the_head_copy() -> None:
    """8-bit on the CPU keeps the embedding in fp32 and quantizes a copy of a tied output head
    (workers/loading/cpu_int8.py): more than 1 B a parameter, still far below fp32's 4 B."""

    def need(size: float, q: str, kind: str) -> int:
        return estimate_bytes(spec(size), quantization=q, device_kind=kind, model_type="embedding")

    # SmolLM2-135M: 135M parameters, 28M of them the (tied) embedding, measured by the loader
    # at 135M x 1 B + 28M x 4 B + 28M x 1 B = 275 MB; the estimate may not be below it.
    small = need(0.135, "8-bit", "cpu")
    assert small >= 275e6, small
    assert small < need(0.135, "none", "cpu") / 1.5
    # The GPU's 8-bit (bitsandbytes) is unchanged: 1 B a parameter.
    assert need(8, "8-bit", "cuda") < need(8, "8-bit", "cpu")
    # For a large model the embedding is a small share: close to 1 B a parameter.
    assert need(70, "8-bit", "cpu") < need(70, "none", "cpu") / 3
