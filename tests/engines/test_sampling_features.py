"""What clients ask of the sampler, on both model engines (the static one in its CPU mode):
logprobs against transformers' own logits, penalties and biases against plain reference
implementations written here, ``min_p``, ``n`` choices with seeds, and constrained decoding
(regex, choice, JSON schema; SmolLM2 for JSON a real model writes). Every wait is bounded by
``asyncio.wait_for``; nothing sleeps to synchronise."""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.engines import TIMEOUT, Result, collect, next_delta, prompts_of, reference
from tests.support.models import tiny_llama_and_tokenizer
from workers.engines.api import (
    Constraint,
    Delta,
    InvalidRequestError,
    RequestCancelledError,
    SamplingParams,
)
from workers.engines.batching import BatchingEngine
from workers.engines.core import EngineCore
from workers.engines.request import choice_seed
from workers.engines.static import StaticBatchingEngine

# float32 logits of one batched, left-padded forward against the same tokens alone.
ATOL = 2e-4


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    return tiny_llama_and_tokenizer()


def _make(kind: str, tiny: tuple[Any, Any], **kwargs: Any) -> EngineCore:
    model, tokenizer = tiny
    options: dict[str, Any] = {"max_batch_size": 16, **kwargs}
    if kind == "static":
        return StaticBatchingEngine(model, tokenizer, **{"max_seq_len": 192, **options})
    return BatchingEngine(model, tokenizer, **options)


@pytest.fixture(params=["batching", "static"])
def free_engine(request: pytest.FixtureRequest, tiny: tuple[Any, Any]) -> Iterator[EngineCore]:
    """EOS off, so that every case runs its full length; both engines."""
    eng = _make(request.param, tiny, eos_token_ids=())
    eng.start()
    yield eng
    eng.close()


@pytest.fixture(params=["batching", "static"])
def engine(request: pytest.FixtureRequest, tiny: tuple[Any, Any]) -> Iterator[EngineCore]:
    """With the tokenizer's eos, which a grammar allows once its output is complete."""
    eng = _make(request.param, tiny)
    eng.start()
    yield eng
    eng.close()


def logits_of(model: Any, ids: Sequence[int]) -> torch.Tensor:
    """transformers' logits of ``ids`` alone, ``[len(ids), V]`` float."""
    with torch.inference_mode():
        return model(torch.tensor([list(ids)])).logits[0].float()


async def run_all(
    engine: EngineCore, jobs: Sequence[tuple[list[int], SamplingParams]], timeout: float = TIMEOUT
) -> list[Result]:
    """Every job at once, so they share the batch."""
    return list(await asyncio.gather(*(collect(engine.generate(p, s), timeout) for p, s in jobs)))


def by_index(result: Result) -> dict[int, list[Delta]]:
    out: dict[int, list[Delta]] = {}
    for d in result.deltas:
        out.setdefault(d.index, []).append(d)
    return out


def ids_of(deltas: Sequence[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


# ---------------------------------------------------------------- logprobs


async def test_logprobs_equal_log_softmax_of_the_model_logits(
    free_engine: EngineCore, tiny: tuple[Any, Any]
) -> None:
    model, tokenizer = tiny
    prompts = prompts_of(tokenizer, 4, seed=3)
    jobs = [
        (prompts[0], SamplingParams(max_tokens=6, temperature=0, logprobs=5)),
        (prompts[1], SamplingParams(max_tokens=6, temperature=0.7, seed=1, logprobs=3)),
        (prompts[2], SamplingParams(max_tokens=6, temperature=1.3, seed=2, logprobs=0, top_k=20)),
        (prompts[3], SamplingParams(max_tokens=6, temperature=0)),  # asks for none
    ]
    results = await run_all(free_engine, jobs)
    assert all(d.logprobs is None for d in results[3].deltas)
    for (prompt, params), result in zip(jobs[:3], results[:3], strict=True):
        lps = [lp for d in result.deltas for lp in d.logprobs or []]
        assert [lp.token_id for lp in lps] == result.ids
        full = logits_of(model, prompt + result.ids)
        for j, lp in enumerate(lps):
            expected = torch.log_softmax(full[len(prompt) - 1 + j] / (params.temperature or 1.0), dim=-1)
            assert lp.logprob == pytest.approx(float(expected[lp.token_id]), abs=ATOL)
            k = params.logprobs or 0
            assert len(lp.top) == k
            values, top_ids = expected.topk(k) if k else (torch.empty(0), torch.empty(0))
            assert [t for t, _ in lp.top] == top_ids.tolist()
            assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=ATOL)


async def test_prompt_logprobs_come_once_on_the_first_delta(
    free_engine: EngineCore, tiny: tuple[Any, Any]
) -> None:
    model, tokenizer = tiny
    prompt = prompts_of(tokenizer, 3, seed=5)[2]
    result = await collect(
        free_engine.generate(prompt, SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=2))
    )
    first = result.deltas[0].prompt_logprobs
    assert first is not None and all(d.prompt_logprobs is None for d in result.deltas[1:])
    assert len(first) == len(prompt) and first[0] is None
    logp = torch.log_softmax(logits_of(model, prompt), dim=-1)
    for j, lp in enumerate(first[1:], start=1):
        assert lp is not None and lp.token_id == prompt[j]
        assert lp.logprob == pytest.approx(float(logp[j - 1, prompt[j]]), abs=ATOL)
        assert [t for t, _ in lp.top] == logp[j - 1].topk(2).indices.tolist()


# ---------------------------------------------------------------- penalties and biases


def penalised_reference(
    model: Any,
    prompt: list[int],
    steps: int,
    *,
    repetition: float = 1.0,
    presence: float = 0.0,
    frequency: float = 0.0,
    bias: Sequence[tuple[int, float]] = (),
) -> list[int]:
    """Greedy decoding with the penalties written out plainly, one token at a time."""
    ids = list(prompt)
    out: list[int] = []
    for _ in range(steps):
        logits = logits_of(model, ids)[-1].tolist()
        for token, b in bias:
            logits[token] += b
        if repetition != 1.0:  # Hugging Face: over the prompt and the generated tokens
            for token in set(ids):
                logits[token] = (
                    logits[token] * repetition if logits[token] < 0 else logits[token] / repetition
                )
        for token in set(out):  # OpenAI: over the generated tokens only
            logits[token] -= presence + frequency * out.count(token)
        tok = max(range(len(logits)), key=logits.__getitem__)
        out.append(tok)
        ids.append(tok)
    return out


async def test_penalties_and_biases_match_a_plain_reference(
    free_engine: EngineCore, tiny: tuple[Any, Any]
) -> None:
    model, tokenizer = tiny
    # Prompts whose plain greedy continuation repeats tokens within 10 steps, so that the
    # penalties have something to act on; the last one does not.
    pool = prompts_of(tokenizer, 11, seed=7)
    prompts = [pool[4], pool[8], pool[9], pool[10], pool[0]]
    settings: list[dict[str, Any]] = [
        {"repetition": 1.8},
        {"presence": 1.5},
        {"frequency": 2.0, "presence": 2.0},
        {"repetition": 0.7, "frequency": -0.5, "bias": [(17, 4.0), (40, -2.5)]},
        {},  # a plain row in the same batch
    ]
    jobs = [
        (
            p,
            SamplingParams(
                max_tokens=10,
                temperature=0,
                repetition_penalty=s.get("repetition", 1.0),
                presence_penalty=s.get("presence", 0.0),
                frequency_penalty=s.get("frequency", 0.0),
                logit_bias=tuple(s.get("bias", ())),
            ),
        )
        for p, s in zip(prompts, settings, strict=True)
    ]
    results = await run_all(free_engine, jobs)
    for (prompt, _), s, result in zip(jobs, settings, results, strict=True):
        assert result.ids == penalised_reference(model, prompt, 10, **s), s
    # The settings change something: without them the rows decode differently.
    changed = [r.ids != penalised_reference(model, p, 10) for p, r in zip(prompts[:4], results, strict=False)]
    assert all(changed), changed


async def test_repetition_penalty_is_hugging_faces(free_engine: EngineCore, tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    prompt = prompts_of(tokenizer, 2, seed=9)[1]
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=8,
            do_sample=False,
            repetition_penalty=1.6,
            eos_token_id=None,
            pad_token_id=model.generation_config.pad_token_id,
        )
    result = await collect(
        free_engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0, repetition_penalty=1.6))
    )
    assert result.ids == out[0, len(prompt) :].tolist()


async def test_logit_bias_forces_and_bans_tokens(free_engine: EngineCore, tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    prompt = prompts_of(tokenizer, 1, seed=2)[0]
    plain = reference(model, prompt, 6, None)
    banned = plain[0]
    forced, without, sampled = await run_all(
        free_engine,
        [
            (prompt, SamplingParams(max_tokens=6, temperature=0, logit_bias=((33, 100.0),))),
            (prompt, SamplingParams(max_tokens=6, temperature=0, logit_bias=((banned, -100.0),))),
            (prompt, SamplingParams(max_tokens=6, temperature=1.0, seed=4, logit_bias=((33, 100.0),))),
        ],
    )
    assert forced.ids == [33] * 6 and sampled.ids == [33] * 6
    assert banned not in without.ids and without.ids[0] != plain[0]


async def test_min_p_drops_unlikely_tokens(free_engine: EngineCore, tiny: tuple[Any, Any]) -> None:
    _, tokenizer = tiny
    prompts = prompts_of(tokenizer, 3, seed=4)
    greedy, only_max, *floored = await run_all(
        free_engine,
        [
            (prompts[0], SamplingParams(max_tokens=8, temperature=0)),
            # min_p 1 keeps only the most likely token: sampling becomes greedy.
            (prompts[0], SamplingParams(max_tokens=8, temperature=1.0, seed=3, min_p=1.0)),
            *[
                (p, SamplingParams(max_tokens=8, temperature=1.5, seed=s, min_p=0.2, logprobs=1))
                for s, p in enumerate(prompts)
            ],
        ],
    )
    assert only_max.ids == greedy.ids
    for result in floored:
        for lp in (lp for d in result.deltas for lp in d.logprobs or []):
            # Every sampled token had at least 0.2 times the top token's probability.
            assert lp.logprob >= math.log(0.2) + lp.top[0][1] - 1e-5


# ---------------------------------------------------------------- n choices


async def test_n_choices_are_seeded_and_reproducible(free_engine: EngineCore, tiny: tuple[Any, Any]) -> None:
    _, tokenizer = tiny
    prompt, other = prompts_of(tokenizer, 2, seed=11)
    params = SamplingParams(max_tokens=8, temperature=1.2, seed=11, n=4)
    first = await collect(free_engine.generate(prompt, params))
    # Again, with other requests beside it in the batch.
    again, *_ = await run_all(
        free_engine,
        [
            (prompt, params),
            (other, SamplingParams(max_tokens=8, temperature=0.9)),
            (other, SamplingParams(max_tokens=4)),
        ],
    )
    singles = await run_all(
        free_engine,
        [(prompt, SamplingParams(max_tokens=8, temperature=1.2, seed=choice_seed(11, i))) for i in range(4)],
    )
    choices, choices_again = by_index(first), by_index(again)
    assert sorted(choices) == [0, 1, 2, 3]
    for i in range(4):
        deltas = choices[i]
        assert [d.finish_reason for d in deltas if d.finish_reason] == ["length"]
        assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 8
        assert ids_of(deltas) == ids_of(choices_again[i]) == singles[i].ids
        assert "".join(d.text for d in deltas) == singles[i].text
    assert choice_seed(11, 0) == 11
    # Four draws, not four copies of one.
    assert len({tuple(ids_of(choices[i])) for i in range(4)}) > 1


async def test_n_greedy_choices_equal_one_greedy_request(
    free_engine: EngineCore, tiny: tuple[Any, Any]
) -> None:
    model, tokenizer = tiny
    prompt = prompts_of(tokenizer, 3, seed=1)[2]
    whole = await collect(
        free_engine.generate(
            prompt, SamplingParams(max_tokens=6, temperature=0, n=3, logprobs=2), stream=False
        )
    )
    expected = reference(model, prompt, 6, None)
    choices = by_index(whole)
    assert sorted(choices) == [0, 1, 2]
    for deltas in choices.values():
        assert ids_of(deltas) == expected
        assert [lp.token_id for d in deltas for lp in d.logprobs or []] == expected


async def test_cancelling_an_n_request_ends_every_choice(
    free_engine: EngineCore, tiny: tuple[Any, Any]
) -> None:
    _, tokenizer = tiny
    prompt = prompts_of(tokenizer, 1, seed=6)[0]
    stream = free_engine.generate(
        prompt, SamplingParams(max_tokens=180, temperature=1.0, n=3), request_id="n-cancel"
    )
    await next_delta(stream, "the first choice")
    assert free_engine.cancel("n-cancel")

    async def drain() -> None:
        async for _ in stream:
            pass

    with pytest.raises(RequestCancelledError):
        await asyncio.wait_for(drain(), TIMEOUT)
    # The rows are gone: a full batch of new requests still fits and finishes.
    done = await run_all(free_engine, [(prompt, SamplingParams(max_tokens=2)) for _ in range(16)])
    assert all(r.last.finish_reason == "length" for r in done)
    assert not free_engine.cancel("n-cancel")


@pytest.mark.parametrize("kind", ["batching", "static"])
def test_n_above_the_batch_is_refused(kind: str, tiny: tuple[Any, Any]) -> None:
    engine = _make(kind, tiny, max_batch_size=4)
    engine.start()
    try:
        with pytest.raises(ValueError, match=re.escape("n 5 exceeds the 4 rows this engine runs at once")):
            engine.generate([1, 2, 3], SamplingParams(max_tokens=2, n=5))
        with pytest.raises(ValueError, match="logit_bias token id 9999 is outside the vocabulary"):
            engine.generate([1, 2, 3], SamplingParams(max_tokens=2, logit_bias=((9999, 1.0),)))
    finally:
        engine.close()


# ---------------------------------------------------------------- constrained decoding


async def test_regex_and_choice_constraints_hold(engine: EngineCore, tiny: tuple[Any, Any]) -> None:
    _, tokenizer = tiny
    prompts = prompts_of(tokenizer, 4, seed=8)
    regex = Constraint("regex", r"[a-z]{2,6}-[0-9]{1,3}")
    choice = Constraint("choice", ("red", "green", 'say "blue"'))
    jobs = [
        (p, SamplingParams(max_tokens=30, temperature=1.0, seed=s, constraint=regex))
        for s, p in enumerate(prompts)
    ]
    jobs += [
        (p, SamplingParams(max_tokens=30, temperature=1.0, seed=s, constraint=choice, n=2))
        for s, p in enumerate(prompts)
    ]
    results = await run_all(engine, jobs)
    for result in results[:4]:
        assert re.fullmatch(r"[a-z]{2,6}-[0-9]{1,3}", result.text), result.text
        assert result.last.finish_reason == "stop"
    for result in results[4:]:
        for deltas in by_index(result).values():
            assert "".join(d.text for d in deltas) in choice.value
            assert deltas[-1].finish_reason == "stop"


async def test_json_schema_constraint_holds_on_the_tiny_model(
    engine: EngineCore, tiny: tuple[Any, Any]
) -> None:
    _, tokenizer = tiny
    schema = {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green"]},
            "count": {"type": "integer", "minimum": 0, "maximum": 99},
            "ok": {"type": "boolean"},
        },
        "required": ["color", "count", "ok"],
        "additionalProperties": False,
    }
    constraint = Constraint("json_schema", schema)
    prompts = prompts_of(tokenizer, 3, seed=12)
    results = await run_all(
        engine,
        [
            (p, SamplingParams(max_tokens=60, temperature=1.0, seed=s, constraint=constraint, n=2))
            for s, p in enumerate(prompts)
        ],
    )
    for result in results:
        for deltas in by_index(result).values():
            value = json.loads("".join(d.text for d in deltas))
            assert set(value) == {"color", "count", "ok"} and value["color"] in ("red", "green")
            assert 0 <= value["count"] <= 99 and isinstance(value["ok"], bool)
            assert deltas[-1].finish_reason == "stop"


@pytest.mark.parametrize(
    ("constraint", "reason"),
    [
        (Constraint("json_schema", {"type": "strin"}), "Invalid type: strin"),
        (Constraint("json_schema", {"properties": {"a": {"$ref": "#/nowhere"}}}), "/nowhere"),
        (Constraint("json_schema", "not a schema"), "takes a JSON object"),
        (Constraint("regex", "([a-z"), "unclosed character class"),
        (Constraint("choice", ()), "non-empty strings"),
    ],
)
async def test_a_constraint_that_does_not_compile_is_refused_at_once(
    engine: EngineCore, constraint: Constraint, reason: str
) -> None:
    with pytest.raises(InvalidRequestError, match=re.escape(reason)):
        engine.generate([1, 2, 3], SamplingParams(max_tokens=4, constraint=constraint))
    # Nothing was queued, and the engine serves on.
    assert engine.stats.waiting == 0
    result = await collect(engine.generate([1, 2, 3], SamplingParams(max_tokens=2)))
    assert result.last.finish_reason in ("stop", "length")


# ---------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2(smollm2_dir: Path) -> Iterator[BatchingEngine]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    # One intra-op thread: with the machine's cores busy, torch's thread hand-overs made a decode
    # step of this model ~10x slower (1 s against 0.1 s with one thread).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    eng = BatchingEngine(model, tokenizer, max_batch_size=16)
    eng.start()
    try:
        yield eng
    finally:
        eng.close()
        torch.set_num_threads(threads)


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 20},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "hobbies"],
    "additionalProperties": False,
}


@pytest.mark.slow
async def test_smollm2_json_schema_output_validates(smollm2: BatchingEngine) -> None:
    import jsonschema

    tokenizer = smollm2.tokenizer
    asks = [
        "Describe a fictional person as JSON.",
        "Give me a JSON record of a retired teacher from Lyon.",
        "Invent a football player and answer in JSON.",
        "Who is a typical software engineer? Reply with JSON.",
    ]
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": a}], add_generation_prompt=True, tokenize=False
        )
        for a in asks
    ]
    schema = Constraint("json_schema", PERSON)
    any_object = Constraint("json_object")
    jobs = [
        (
            smollm2.encode(p, add_special_tokens=False),
            SamplingParams(max_tokens=160, temperature=0.8, seed=s, constraint=schema),
        )
        for s, p in enumerate(prompts)
    ]
    jobs += [
        (
            smollm2.encode(prompts[0], add_special_tokens=False),
            SamplingParams(max_tokens=200, temperature=0.7, seed=1, constraint=any_object),
        )
    ]
    results = await run_all(smollm2, jobs, timeout=6 * TIMEOUT)
    for result in results[:-1]:
        assert result.last.finish_reason == "stop", result.text
        jsonschema.validate(json.loads(result.text), PERSON)
    assert results[-1].last.finish_reason == "stop", results[-1].text
    assert isinstance(json.loads(results[-1].text), dict)
