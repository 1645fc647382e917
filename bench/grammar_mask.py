"""Per-token cost of a grammar engine's token mask: llguidance, xgrammar and outlines-core side by
side, on SmolLM2's tokenizer (49,152 tokens) and a JSON schema of a few fields.

For each library, in this one process: the time to make its view of the tokenizer, to compile
the schema, and then, for every token of a valid JSON instance of the schema (SmolLM2's own
tokens of it), the time to compute the mask of allowed tokens (into a bitmask, as an engine
would) and to advance by the token. Several instances are walked, ``--rounds`` times each; the
first walk warms each library's caches (lexer states, lazily built tables) and is reported on
its own (``first_*``), the others give the steady per-token figures (median and p90).

    python bench/grammar_mask.py [--rounds N] [--libs llguidance,xgrammar,outlines-core] [--json]

The libraries are not natserve's dependencies but llguidance (the ``worker`` extra); install the
other two to compare: ``pip install xgrammar outlines-core``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SMOLLM2 = Path(os.environ.get("NATSERVE_TEST_SMOLLM2", "~/.cache/natserve-test/smollm2")).expanduser()

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string"},
        "city": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "city", "tags", "active"],
    "additionalProperties": False,
}

INSTANCES = [
    {
        "name": "Ada Lovelace",
        "age": 36,
        "email": "ada@example.org",
        "city": "London",
        "tags": ["math", "engines"],
        "active": False,
    },
    {
        "name": "Grace Hopper",
        "age": 85,
        "email": "grace.hopper@navy.mil",
        "city": "Arlington",
        "tags": ["cobol", "compilers", "navy"],
        "active": True,
    },
    {"name": "Zoë Ünal", "age": 7, "email": "z@x.io", "city": "İzmir", "tags": [], "active": True},
]


class Lib:
    """One library's walk: ``prepare`` builds and compiles; ``start`` makes a fresh matcher;
    ``mask`` fills the bitmask; ``advance`` takes one token."""

    name = ""

    def prepare(self, tokenizer: Any, vocab: int, eos: int) -> dict[str, float]:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def mask(self) -> None:
        raise NotImplementedError

    def advance(self, token: int) -> None:
        raise NotImplementedError


class LLGuidance(Lib):
    name = "llguidance"

    def prepare(self, tokenizer: Any, vocab: int, eos: int) -> dict[str, float]:
        import llguidance
        import llguidance.hf
        import numpy as np

        t0 = time.perf_counter()
        self.tokens = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=eos)
        t1 = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            SCHEMA, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        )
        self.compiled = llguidance.LLMatcher(self.tokens, grammar, log_level=0)
        assert not self.compiled.is_error(), self.compiled.get_error()
        t2 = time.perf_counter()
        self.bitmask = np.zeros((vocab + 31) // 32, dtype=np.int32)
        return {"tokenizer_s": t1 - t0, "compile_s": t2 - t1}

    def start(self) -> None:
        self.matcher = self.compiled.deep_copy()

    def mask(self) -> None:
        self.matcher.unsafe_compute_mask_ptr(self.bitmask.ctypes.data, self.bitmask.nbytes)

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise AssertionError(f"llguidance refused token {token}: {self.matcher.get_error()}")


class XGrammar(Lib):
    name = "xgrammar"

    def prepare(self, tokenizer: Any, vocab: int, eos: int) -> dict[str, float]:
        import xgrammar as xgr

        t0 = time.perf_counter()
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=[eos])
        self.compiler = xgr.GrammarCompiler(info)
        t1 = time.perf_counter()
        self.compiled = self.compiler.compile_json_schema(
            json.dumps(SCHEMA), any_whitespace=False, separators=(", ", ": ")
        )
        t2 = time.perf_counter()
        self.bitmask = xgr.allocate_token_bitmask(1, vocab)
        self._xgr = xgr
        return {"tokenizer_s": t1 - t0, "compile_s": t2 - t1}

    def start(self) -> None:
        self.matcher = self._xgr.GrammarMatcher(self.compiled)

    def mask(self) -> None:
        self.matcher.fill_next_token_bitmask(self.bitmask)

    def advance(self, token: int) -> None:
        if not self.matcher.accept_token(token):
            raise AssertionError(f"xgrammar refused token {token}")


class OutlinesCore(Lib):
    name = "outlines-core"

    def prepare(self, tokenizer: Any, vocab: int, eos: int) -> dict[str, float]:
        import numpy as np
        from outlines_core import Guide, Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema

        t0 = time.perf_counter()
        # outlines-core takes each token's bytes; SmolLM2's vocabulary is GPT-2 byte-level.
        table = _byte_decoder()
        by_bytes: dict[bytes, list[int]] = {}
        special = set(tokenizer.all_special_ids)
        for token, token_id in tokenizer.get_vocab().items():
            if token_id in special or token_id >= vocab:
                continue
            raw = bytes(table[c] for c in token) if all(c in table for c in token) else token.encode()
            by_bytes.setdefault(raw, []).append(token_id)
        vocabulary = Vocabulary(eos, by_bytes)
        t1 = time.perf_counter()
        regex = build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern=" ?")
        self.index = Index(regex, vocabulary)
        t2 = time.perf_counter()
        self._guide = Guide
        self.mask_buf = np.zeros((vocab + 31) // 32, dtype=np.int32)
        return {"tokenizer_s": t1 - t0, "compile_s": t2 - t1}

    def start(self) -> None:
        self.guide = self._guide(self.index)

    def mask(self) -> None:
        self.guide.write_mask_into(self.mask_buf.ctypes.data, self.mask_buf.size, self.mask_buf.itemsize)

    def advance(self, token: int) -> None:
        self.guide.advance(token)


LIBS: dict[str, Callable[[], Lib]] = {
    "llguidance": LLGuidance,
    "xgrammar": XGrammar,
    "outlines-core": OutlinesCore,
}


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def walk(lib: Lib, sequences: list[list[int]]) -> list[float]:
    """Mask + advance of every token of every sequence: seconds per token."""
    out = []
    for ids in sequences:
        lib.start()
        for token in ids:
            t0 = time.perf_counter()
            lib.mask()
            lib.advance(token)
            out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--libs", default=",".join(LIBS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    vocab = len(tokenizer)
    eos = int(tokenizer.eos_token_id)
    sequences = [
        tokenizer.encode(json.dumps(x, ensure_ascii=False), add_special_tokens=False) for x in INSTANCES
    ]
    tokens = sum(len(s) for s in sequences)
    print(f"SmolLM2: {vocab} tokens; {len(sequences)} instances, {tokens} tokens a walk", file=sys.stderr)
    results: dict[str, Any] = {"vocab": vocab, "tokens_per_walk": tokens, "rounds": args.rounds}
    libs = []
    for name in args.libs.split(","):
        lib = LIBS[name]()
        try:
            setup = lib.prepare(tokenizer, vocab, eos)
        except ImportError as exc:
            print(f"{name}: not installed ({exc})", file=sys.stderr)
            continue
        libs.append(lib)
        first = walk(lib, sequences)
        results[name] = {**setup, "first_us": 1e6 * statistics.mean(first)}
    # Steady state: the libraries take turns, round by round, so that a change in the machine's
    # load hits them alike.
    steady: dict[str, list[float]] = {lib.name: [] for lib in libs}
    for _ in range(args.rounds):
        for lib in libs:
            steady[lib.name].extend(walk(lib, sequences))
    for lib in libs:
        values = sorted(steady[lib.name])
        results[lib.name].update(
            median_us=1e6 * statistics.median(values),
            p90_us=1e6 * values[int(0.9 * (len(values) - 1))],
            mean_us=1e6 * statistics.mean(values),
        )
    heads = ("tokenizer s", "compile s", "first µs", "median µs", "p90 µs", "mean µs")
    print(f"{'library':<14} " + " ".join(f"{h:>11}" for h in heads))
    for lib in libs:
        r = results[lib.name]
        print(
            f"{lib.name:<14} {r['tokenizer_s']:>11.2f} {r['compile_s']:>11.3f} {r['first_us']:>11.0f} "
            f"{r['median_us']:>11.1f} {r['p90_us']:>11.1f} {r['mean_us']:>11.1f}"
        )
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
