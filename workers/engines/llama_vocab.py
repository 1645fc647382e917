"""A GGUF model's tokenizer, as the replica and the output side use a Hugging Face one.

llama.cpp keeps the vocabulary, the tokenizer and the chat template inside the GGUF file. The
replica tokenizes prompts and renders chats with whatever it is handed as ``tokenizer``, and the
engines' :class:`~workers.engines.detokenizer.IncrementalDetokenizer` decodes with it, so this
class gives them the few methods they call (``encode``, ``decode``, ``get_vocab``,
``chat_template``, ``apply_chat_template``, ``bos_token``, ``eos_token``) over llama.cpp's own
tokenizer. Prompts are tokenized with special tokens parsed, as Hugging Face tokenizers and
llama.cpp's ``Llama`` do, so a chat template's ``<|im_start|>`` is one token.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from datetime import datetime
from typing import Any

__all__ = ["GGUFTokenizer"]


class GGUFTokenizer:
    """llama.cpp's tokenizer of one loaded GGUF model (thread-safe: it only reads the vocab)."""

    def __init__(self, llama_cpp: Any, vocab: Any, metadata: dict[str, str]) -> None:
        self._lib = llama_cpp
        self._vocab = vocab
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
        self.chat_template: str | None = metadata.get("tokenizer.chat_template")
        self._buf = ctypes.create_string_buffer(256)
        bos = int(llama_cpp.llama_vocab_bos(vocab))
        eos = int(llama_cpp.llama_vocab_eos(vocab))
        self.bos_token_id: int | None = bos if bos >= 0 else None
        self.eos_token_id: int | None = eos if eos >= 0 else None
        self.bos_token: str | None = (
            self.piece(bos, special=True).decode("utf-8", "replace") if bos >= 0 else None
        )
        self.eos_token: str | None = (
            self.piece(eos, special=True).decode("utf-8", "replace") if eos >= 0 else None
        )
        self._vocab_map: dict[str, int] | None = None

    def end_of_generation_ids(self) -> frozenset[int]:
        """Every token llama.cpp ends a generation on (eos, eot, <|im_end|>...)."""
        is_eog = self._lib.llama_vocab_is_eog
        vocab = self._vocab
        return frozenset(t for t in range(self.n_vocab) if is_eog(vocab, t))

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token (special tokens render as b"" unless ``special``)."""
        buf = self._buf
        n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            big = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self._vocab, token, big, len(big), 0, special)
            return big.raw[:n]
        return buf.raw[:n]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        data = text.encode("utf-8")
        lib = self._lib
        # A token covers at least one byte, plus BOS/EOS when added.
        cap = len(data) + 8
        tokens = (lib.llama_token * cap)()
        n = lib.llama_tokenize(self._vocab, data, len(data), tokens, cap, add_special_tokens, True)
        if n < 0:
            cap = -n
            tokens = (lib.llama_token * cap)()
            n = lib.llama_tokenize(self._vocab, data, len(data), tokens, cap, add_special_tokens, True)
        return list(tokens[:n])

    def decode(
        self,
        ids: Sequence[int],
        skip_special_tokens: bool = True,
        clean_up_tokenization_spaces: bool = False,
    ) -> str:
        """The text of ``ids``; special tokens are left out unless ``skip_special_tokens`` is False.
        Bytes of an unfinished character come out as U+FFFD, which the incremental detokenizer
        reads as "wait for the next token"."""
        lib = self._lib
        n_ids = len(ids)
        if not n_ids:
            return ""
        arr = (lib.llama_token * n_ids)(*ids)
        cap = 16 * n_ids + 16
        out = ctypes.create_string_buffer(cap)
        n = lib.llama_detokenize(self._vocab, arr, n_ids, out, cap, False, not skip_special_tokens)
        if n < 0:
            cap = -n
            out = ctypes.create_string_buffer(cap)
            n = lib.llama_detokenize(self._vocab, arr, n_ids, out, cap, False, not skip_special_tokens)
        return out.raw[:n].decode("utf-8", "replace")

    def get_vocab(self) -> dict[str, int]:
        """Token text to id (built once, on first use: ~50k ctypes calls)."""
        if self._vocab_map is None:
            self._vocab_map = {
                self.piece(t, special=True).decode("utf-8", "replace"): t for t in range(self.n_vocab)
            }
        return self._vocab_map

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        chat_template: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        tokenize: bool = False,
        add_generation_prompt: bool = True,
        **template_vars: Any,
    ) -> str:
        """Renders a Jinja chat template (the GGUF's own unless ``chat_template``) in the sandbox
        and with the globals and variables transformers gives it (``tools`` and any extra keyword
        as template variables); its ``TemplateError``s go to the caller."""
        if tokenize:
            raise ValueError("GGUFTokenizer.apply_chat_template renders text only (tokenize=False)")
        template = chat_template or self.chat_template
        if not template:
            raise ValueError("the GGUF file has no tokenizer.chat_template")
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        def strftime_now(fmt: str) -> str:
            return datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        return env.from_string(template).render(
            **template_vars,
            messages=messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )
