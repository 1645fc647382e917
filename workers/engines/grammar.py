"""Constrained decoding: the output of a request matches a JSON schema, any JSON object, a regex
or one of some strings.

llguidance does the work (a maintained grammar engine, Rust, with Python bindings). It was
chosen by ``bench/grammar_mask.py``, which measures llguidance, xgrammar and outlines-core side by
side on SmolLM2's tokenizer (49,152 tokens) and a JSON schema of six fields (docs/benchmarks.md):
xgrammar's masks were the cheapest (median 3.5 µs a token against llguidance's 8.9 µs; both
under 0.2 ms a step for 32 rows, against a decode step of ~100 ms), llguidance compiled the
schema in 2 ms against xgrammar's 17 ms and outlines-core's 0.7 s, with no first-mask cost.
Schemas are compiled per request, inside ``generate`` on the caller's event loop, so the compile
time is the one that a client sending new schemas sees.

* :class:`GrammarCompiler` turns a :class:`~workers.engines.api.Constraint` into a
  :class:`Grammar` (cached by the constraint's key: a client that sends the same schema again
  gets the compiled one), raising :class:`~workers.engines.api.InvalidRequestError` with
  llguidance's reason when it does not compile. It compiles on the caller's thread, inside
  ``generate`` (a schema of six fields: 2 ms, 45 ms on a loaded machine). The llguidance view
  of the tokenizer is built on a thread of its own when the engine starts
  (:meth:`GrammarCompiler.warm`; 1.3 s for SmolLM2's 49,152 tokens, 7 s on a loaded machine).
* :meth:`Grammar.start` gives one row its own :class:`GrammarState` (a copy of the compiled
  matcher, so the ``n`` choices of a request advance independently).
* The sampler adds :func:`grammar_bias` (0 or -inf per token) to the logits of the constrained
  rows of a step, before it samples; the output processor calls :meth:`GrammarState.advance`
  with every accepted token, which says when the grammar is complete and allows nothing more,
  so the row ends there.

The eos tokens are the engine's: the grammar allows them once the output is complete.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from importlib.util import find_spec
from typing import Any

import numpy as np
import torch

from .api import Constraint, InvalidRequestError

__all__ = ["Grammar", "GrammarCompiler", "GrammarState", "grammar_bias", "grammar_source"]

logger = logging.getLogger(__name__)

# Compiled grammars kept per engine; each holds its matcher's compiled lexer and parser tables.
_CACHE_SIZE = 64

# JSON on one line with a space after "," and ":" (json.dumps' own style), nothing else. Measured
# with SmolLM2-135M, three prompts asking for a JSON object: free whitespace let it wander off
# into newlines and indentation (2 of 3 ran out of tokens), no whitespace at all made it write
# {"":null,...} until the end, this style ended all three as whole objects.
_BIAS = np.array([-np.inf, 0.0], dtype=np.float32)  # by mask bit: not allowed, allowed

_JSON_OPTIONS: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_source(constraint: Constraint) -> str:
    """llguidance's grammar (a JSON string) of ``constraint``; ``InvalidRequestError`` when the
    constraint's value is of the wrong shape."""
    import llguidance

    kind, value = constraint.kind, constraint.value
    if kind == "json_object":
        return str(llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS))
    if kind == "json_schema":
        if not isinstance(value, dict):
            raise InvalidRequestError(
                f"a json_schema constraint takes a JSON object, got {type(value).__name__}"
            )
        try:
            return str(llguidance.LLMatcher.grammar_from_json_schema(value, defaults=_JSON_OPTIONS))
        except (ValueError, TypeError) as exc:
            raise InvalidRequestError(f"the JSON schema does not compile: {exc}") from None
    if kind == "regex":
        if not isinstance(value, str) or not value:
            raise InvalidRequestError(f"a regex constraint takes a non-empty pattern string, got {value!r}")
        return str(llguidance.LLMatcher.grammar_from_regex(value))
    if kind == "choice":
        if (
            not isinstance(value, (tuple, list))
            or not value
            or not all(isinstance(v, str) and v for v in value)
        ):
            raise InvalidRequestError(f"a choice constraint takes non-empty strings, got {value!r}")
        # Lark string literals take JSON's escapes, so json.dumps quotes any string safely.
        lark = "start: " + " | ".join(json.dumps(v) for v in dict.fromkeys(value))
        return str(llguidance.LLMatcher.grammar_from_lark(lark))
    raise InvalidRequestError(f"unknown constraint kind {kind!r}")


def _key(constraint: Constraint) -> str:
    value = constraint.value
    if isinstance(value, tuple):
        value = list(value)
    try:
        return constraint.kind + "\0" + json.dumps(value, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"the {constraint.kind} constraint is not JSON data: {exc}") from None


class GrammarState:
    """The grammar of one running row: what it allows next, advanced by every accepted token
    (generation thread)."""

    __slots__ = ("matcher", "words")

    def __init__(self, matcher: Any, words: int) -> None:
        self.matcher = matcher
        self.words = words  # 32-bit words of its mask (the grammar's vocabulary, rounded up)

    def advance(self, token: int) -> bool:
        """Accepts ``token``; True when the output is complete and the grammar allows nothing
        but the end. A token the mask did not allow is a ``RuntimeError`` (a bug, not input)."""
        matcher = self.matcher
        if not matcher.consume_token(token):
            raise RuntimeError(f"token {token} broke the grammar: {matcher.get_error()}")
        return bool(matcher.is_stopped())


def grammar_bias(states: Sequence[GrammarState], vocab: int) -> torch.Tensor:
    """``[len(states), vocab]`` float32 (CPU): 0 for the tokens each row's grammar allows next,
    -inf for the others, of the model's ``vocab`` (a tokenizer may have more ids than the model
    has outputs), to add to the rows' logits."""
    words = states[0].words
    bitmask = np.empty((len(states), words), dtype=np.int32)
    row_bytes = words * 4
    base = bitmask.ctypes.data
    for i, state in enumerate(states):
        # Writes the row's mask in place (llguidance drops the GIL while it computes).
        state.matcher.unsafe_compute_mask_ptr(base + i * row_bytes, row_bytes)
    # numpy, and an additive mask: at 32 rows of 49,152 tokens, unpacking plus a table lookup
    # and one add took 2.5 ms, a bool mask through torch's masked_fill 6.9 ms (best of 30, one
    # thread), and torch's own bit unpacking ~50 ms a step on a loaded machine (its threads'
    # hand-overs).
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, count=vocab, bitorder="little")
    return torch.from_numpy(_BIAS[bits])


class Grammar:
    """One compiled constraint; :meth:`start` gives a row its own state."""

    __slots__ = ("_matcher", "_words")

    def __init__(self, matcher: Any, words: int) -> None:
        self._matcher = matcher
        self._words = words

    def start(self) -> GrammarState:
        return GrammarState(self._matcher.deep_copy(), self._words)


class GrammarCompiler:
    """Compiles constraints against one tokenizer, caching the results (any thread)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._vocab = vocab_size
        # llguidance needs every id of the tokenizer, which may have more than the model outputs
        # (an eos past them); the masks cover all, the sampler reads the model's part.
        try:
            self._ids = max(vocab_size, len(tokenizer))
        except TypeError:
            self._ids = vocab_size
        self._eos = sorted(int(t) for t in eos_token_ids if 0 <= int(t) < vocab_size)
        self._ll_tokenizer: Any = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Grammar] = OrderedDict()

    def warm(self) -> None:
        """Builds llguidance's view of the tokenizer on a daemon thread (seconds of CPU for a
        large vocabulary), so that the first constrained request does not wait for it on the
        caller's event loop. Nothing happens without llguidance installed."""
        if self._ll_tokenizer is not None or find_spec("llguidance") is None:
            return
        threading.Thread(target=self._warm, name="natserve-grammar-tokenizer", daemon=True).start()

    def _warm(self) -> None:
        try:
            with self._lock:
                self._tokens()
        except Exception:  # the first constrained request will say why
            logger.debug("building the grammar tokenizer failed", exc_info=True)

    def _tokens(self) -> Any:
        if self._ll_tokenizer is None:
            import llguidance.hf

            eos: Any = self._eos or None
            if eos is None:
                own = getattr(self._tokenizer, "eos_token_id", None)
                if own is None or not 0 <= own < self._vocab:
                    raise InvalidRequestError(
                        "constrained output needs an end-of-sequence token inside the vocabulary; "
                        f"this model has none (vocabulary {self._vocab}, tokenizer eos {own!r})"
                    )
            try:
                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self._tokenizer, n_vocab=self._ids, eos_token=eos
                )
            except ValueError as exc:
                raise InvalidRequestError(
                    f"constrained output is not available for this tokenizer: {exc}"
                ) from None
        return self._ll_tokenizer

    def compile(self, constraint: Constraint) -> Grammar:
        """The compiled ``constraint``; ``InvalidRequestError`` saying why it does not compile."""
        import llguidance

        key = _key(constraint)
        with self._lock:
            grammar = self._cache.get(key)
            if grammar is not None:
                self._cache.move_to_end(key)
                return grammar
            tokens = self._tokens()
        source = grammar_source(constraint)
        matcher = llguidance.LLMatcher(tokens, source, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(
                f"the {constraint.kind} constraint does not compile: {matcher.get_error()}"
            )
        grammar = Grammar(matcher, (self._ids + 31) // 32)
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar
