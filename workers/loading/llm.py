"""Loading a causal LM and its tokenizer with transformers, optionally 4/8-bit.

8-bit is torch's dynamic int8 linears on the CPU (:mod:`.cpu_int8`) and bitsandbytes on CUDA;
4-bit is bitsandbytes' nf4 on both.

A failed load leaves nothing allocated behind it, and its error names the path and the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from broker_client import BadRequest, NotFound

from ..devices import free_memory
from .checkpoint import check_complete, load_config, parse_device, pick_dtype, translating_errors
from .cpu_int8 import int8_linear_bytes, quantize_cpu_int8
from .sources import ModelSource
from .warmup import warm_up

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = ["QUANTIZATIONS", "LoadedLLM", "load_llm"]

QUANTIZATIONS = ("none", "8-bit", "4-bit")


def _context_length(config: Any, tokenizer: Any) -> int:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in (
        "max_position_embeddings",
        "n_positions",
        "max_sequence_length",
        "max_seq_len",
        "seq_length",
        "n_ctx",
    ):
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    # Tokenizers without a limit report a huge sentinel (int(1e30)).
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10_000_000:
        return limit
    return 2048


@dataclass
class LoadedLLM:
    """A causal LM ready to generate, with what the engine and the registry need to know."""

    model: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    context_length: int
    source: ModelSource
    quantization: str
    memory_bytes: int
    # Set by unload(); engines check it rather than touching a released model.
    released: bool = field(default=False, repr=False)

    def unload(self) -> None:
        """Drop the model and return its memory (CUDA cache included)."""
        self.model = None
        self.tokenizer = None
        self.released = True
        free_memory(self.device)


def _quantization_config(quantization: str, compute_dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    if quantization == "8-bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_type="nf4",
    )


def _normalize_quantization(quantization: str | None) -> str:
    q = (quantization or "none").strip().lower()
    aliases = {
        "": "none",
        "none": "none",
        "8-bit": "8-bit",
        "8bit": "8-bit",
        "int8": "8-bit",
        "4-bit": "4-bit",
        "4bit": "4-bit",
        "nf4": "4-bit",
    }
    if q not in aliases:
        raise BadRequest(f"quantization {quantization!r} is not supported; use one of {list(QUANTIZATIONS)}")
    return aliases[q]


def load_llm(
    source: ModelSource,
    *,
    quantization: str = "none",
    device: str = "cpu",
    trust_remote_code: bool = False,
    dtype: str | None = None,
) -> LoadedLLM:
    """Load a causal LM and its tokenizer from ``source`` onto ``device``.

    ``quantization`` is ``"none"``, ``"8-bit"`` or ``"4-bit"``. ``dtype`` defaults to bfloat16
    on CUDA (float16 where bf16 is missing) and float32 on the CPU; for 4-bit it is the compute
    dtype. 8-bit on the CPU computes in float32 whatever ``dtype`` says (torch's int8 linears
    take fp32 input).
    """
    quant = _normalize_quantization(quantization)
    dev = parse_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    cpu_int8 = quant == "8-bit" and dev.type == "cpu"
    if cpu_int8 and str(torch_dtype) != "torch.float32":
        logger.info("8-bit on the CPU computes in float32, not %s", torch_dtype)
        torch_dtype = pick_dtype("float32", dev)
    path = source.path
    if not (path / "config.json").is_file():
        raise NotFound(f"{path} holds no config.json")

    warm_up()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = load_config(path, trust_remote_code)
    model_type = getattr(config, "model_type", None)
    has_remote_code = bool(getattr(config, "auto_map", None)) and trust_remote_code
    if not has_remote_code and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise BadRequest(
            f"the model in {path} (model_type {model_type!r}) is not a causal language model "
            "that transformers can generate with"
        )

    kwargs: dict[str, Any] = {
        "dtype": torch_dtype,
        "trust_remote_code": trust_remote_code,
        # Straight onto the target device: no full copy in CPU memory first.
        "device_map": {"": str(dev)},
        # transformers only warns about weights missing from the checkpoint (and then
        # initialises them randomly); the info lets us refuse such a model instead.
        "output_loading_info": True,
    }
    if quant != "none" and not cpu_int8:
        kwargs["quantization_config"] = _quantization_config(quant, torch_dtype)

    model: Any = None
    tokenizer: Any = None
    info: dict[str, Any] = {}
    with translating_errors("the tokenizer", path, dev):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    try:
        with translating_errors(f"the model ({quant})", path, dev):
            result: Any
            try:
                result = AutoModelForCausalLM.from_pretrained(
                    path, config=config, attn_implementation="sdpa", **kwargs
                )
            except ValueError as exc:
                if "sdpa" not in str(exc).lower() and "attn" not in str(exc).lower():
                    raise
                logger.info("%s does not support SDPA attention, loading the default", path)
                result = AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)
            model, info = result
            result = None
            model.eval()
        check_complete(info, path, "causal LM")
        extra_bytes = 0
        if cpu_int8:
            with translating_errors("the model's int8 linears", path, dev):
                quantize_cpu_int8(model)
            extra_bytes = int8_linear_bytes(model)

        if tokenizer.pad_token is None:
            if tokenizer.eos_token is not None:
                # Batched generation pads; eos is the usual stand-in and is masked out anyway.
                tokenizer.pad_token = tokenizer.eos_token
            else:
                logger.warning("tokenizer in %s has neither pad nor eos token", path)
        # Decoder-only models must be left-padded so every row's next token follows its prompt.
        tokenizer.padding_side = "left"

        loaded = LoadedLLM(
            model=model,
            tokenizer=tokenizer,
            device=dev,
            dtype=torch_dtype,
            context_length=_context_length(model.config, tokenizer),
            source=source,
            quantization=quant,
            memory_bytes=int(model.get_memory_footprint()) + extra_bytes,
        )
    except BaseException:
        model = tokenizer = None
        free_memory(dev)
        raise
    logger.info(
        "loaded %s (%s, %s, %s) on %s: %.1f MiB, context %d",
        source.ref or path,
        model_type,
        quant,
        str(torch_dtype).removeprefix("torch."),
        dev,
        loaded.memory_bytes / 2**20,
        loaded.context_length,
    )
    return loaded
