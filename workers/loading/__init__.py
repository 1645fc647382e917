"""Model loading: find a model's files, read them into memory, and warm up the imports it needs.

* :mod:`.sources`: a spec's ``model_uri`` or ``model_id`` to a local folder (downloading from the
  Hugging Face Hub into its cache when allowed);
* :mod:`.hub`: those downloads (a snapshot or one file), their progress and their errors;
* :mod:`.llm`: a causal LM and its tokenizer (4/8-bit; :mod:`.cpu_int8`: 8-bit on the CPU);
* :mod:`.embedding`: a sentence-embedding model;
* :mod:`.gguf`: the GGUF file of a ``ggufv2`` spec, loaded by llama.cpp (the ``gguf`` extra);
* :mod:`.checkpoint`: what both do with a checkpoint (device, dtype, config, errors);
* :mod:`.warmup`: the imports of every load, once per process, ahead of the first one.

Nothing here imports torch or transformers at import time: the worker imports this package at
its start and answers before they are loaded.
"""

from .embedding import POOLING_MODES, LoadedEmbedding, load_embedding
from .gguf import GGUF_INSTALL, LoadedGGUF, llama_cpp_available, load_gguf, resolve_gguf
from .llm import QUANTIZATIONS, LoadedLLM, load_llm
from .sources import ModelSource, ProgressCallback, parse_model_uri, progress_tqdm, resolve_source
from .warmup import set_threads, warm_up

__all__ = [
    "GGUF_INSTALL",
    "POOLING_MODES",
    "QUANTIZATIONS",
    "LoadedEmbedding",
    "LoadedGGUF",
    "LoadedLLM",
    "ModelSource",
    "ProgressCallback",
    "llama_cpp_available",
    "load_embedding",
    "load_gguf",
    "load_llm",
    "parse_model_uri",
    "progress_tqdm",
    "resolve_gguf",
    "resolve_source",
    "set_threads",
    "warm_up",
]
