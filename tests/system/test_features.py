"""What clients ask of the model beyond a prompt, end to end on the real SmolLM2-135M-Instruct:
one ``natserve up`` (its own home, free ports) for the module, driven over NATS by the natserve
client and over HTTP by openai-python unchanged.

- JSON-schema output parses and validates for every prompt of a varied set, with sampling on;
- a forced tool call (a named function, ``required``) has arguments that parse and validate;
- chat logprobs, completion logprobs with the echo, ``n`` choices with a seed (reproducible,
  the usage counting every choice), ``stream_options.include_usage`` on NATS streams;
- a schema the grammar engine cannot compile is a 400 that says why.

SmolLM2's chat template knows no tools: they reach it as a system message in the Hermes format
(workers/chat.py), and a forced call is decoded under the tool's parameter schema.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import jsonschema
import pytest

from broker_client import BadRequest, Client
from tests.support.cli import Running, assert_one_error_line, natserve
from tests.support.handles import chatting, completed, streamed
from tests.support.ports import free_port

T = TypeVar("T")

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux")]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"enum": ["happy", "sad", "calm"]},
        "likes_tea": {"type": "boolean"},
    },
    "required": ["name", "age", "mood", "likes_tea"],
    "additionalProperties": False,
}
PROMPTS = [
    "Describe a pirate captain as JSON.",
    "Invent a character for a children's book.",
    "Who is the oldest person in your village?",
    "Tell me about a tired nurse after a night shift.",
    "Make up a robot that loves gardening.",
    "Write a JSON profile of your best friend.",
]
WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 32},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two small integers",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": -100, "maximum": 100},
                "b": {"type": "integer", "minimum": -100, "maximum": 100},
            },
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
PARAMETERS = {"get_weather": WEATHER["function"]["parameters"], "add": ADD["function"]["parameters"]}
WEATHER_CHAT = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@dataclass
class Pool:
    up: Running
    nats_url: str
    v1: str
    uid: str
    home: str


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[Pool]:
    tmp = tmp_path_factory.mktemp("features")
    nats_port, http_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATSERVE_")}
    env.update(
        NATSERVE_HOME=str(tmp / "home"),
        NATSERVE_MODEL_ROOTS=str(smollm2_dir.resolve()),
        NATSERVE_LOG_LEVEL="INFO",
        HF_HUB_OFFLINE="1",
    )
    up = Running(
        ["up", "--port", str(nats_port), "--http-port", str(http_port), "--device", "cpu"],
        env,
    )
    same_user = pytest.MonkeyPatch()
    same_user.setenv("NATSERVE_HOME", env["NATSERVE_HOME"])
    try:
        up.wait_ready(timeout=90)
        nats_url = f"nats://127.0.0.1:{nats_port}"
        definition = {
            "model_name": "smollm2",
            "model_ability": ["generate", "chat"],
            "context_length": 2048,
            "model_specs": [
                {
                    "model_format": "pytorch",
                    "model_size_in_billions": 0.135,
                    "quantizations": ["none"],
                    "model_uri": str(smollm2_dir.resolve()),
                }
            ],
        }
        with Client(nats_url, timeout=300) as client:
            client.register_model("LLM", json.dumps(definition))
            uid = client.launch_model(model_name="smollm2", progress=False)
        yield Pool(up, nats_url, f"http://127.0.0.1:{http_port}/v1", uid, env["NATSERVE_HOME"])
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(timeout=60) == 0, "".join(up.stderr[-30:])
        assert "Traceback" not in "".join(up.stderr), "".join(up.stderr[-60:])
    finally:
        up.kill()
        same_user.undo()


@pytest.fixture(scope="module")
def client(pool: Pool) -> Iterator[Client]:
    with Client(pool.nats_url, timeout=300) as client:
        yield client


def _openai(pool: Pool) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=pool.v1, api_key="unused", max_retries=0, timeout=300)


def _schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


# ---------------------------------------------------------------------------- structured output


def _at_once(calls: list[Callable[[], T]]) -> list[T]:
    """The calls side by side (the engine batches them), results in order."""
    with ThreadPoolExecutor(len(calls)) as threads:
        return list(threads.map(lambda call: call(), calls))


def test_json_schema_output_parses_and_validates_for_every_prompt(pool: Pool, client: Client) -> None:
    model = chatting(client.get_model(model_uid=pool.uid))
    started = time.monotonic()

    def ask(i: int, prompt: str) -> Callable[[], Any]:
        config = {"response_format": _schema_format(PERSON), "temperature": 0.9, "seed": i, "max_tokens": 96}
        return lambda: model.chat([{"role": "user", "content": prompt}], config)

    replies = _at_once([ask(i, prompt) for i, prompt in enumerate(PROMPTS)])
    for reply in replies:
        [choice] = reply["choices"]
        assert choice["finish_reason"] == "stop", choice
        person = json.loads(choice["message"]["content"])
        jsonschema.validate(person, PERSON)
    print(f"{len(PROMPTS)} schema-constrained chats side by side in {time.monotonic() - started:.1f} s")
    print(*(r["choices"][0]["message"]["content"] for r in replies), sep="\n")


def test_json_schema_and_json_object_over_http(pool: Pool) -> None:
    openai = _openai(pool)

    def ask(i: int, prompt: str) -> Callable[[], Any]:
        return lambda: openai.chat.completions.create(
            model=pool.uid,
            messages=[{"role": "user", "content": prompt}],
            response_format=_schema_format(PERSON),
            temperature=0.8,
            seed=100 + i,
            max_tokens=96,
        )

    def anything() -> Any:
        return openai.chat.completions.create(
            model=pool.uid,
            messages=[{"role": "user", "content": "Give me a JSON object about cats."}],
            response_format={"type": "json_object"},
            temperature=0.7,
            seed=3,
            max_tokens=96,
        )

    *replies, free = _at_once([*(ask(i, prompt) for i, prompt in enumerate(PROMPTS[:3])), anything])
    for reply in replies:
        jsonschema.validate(json.loads(reply.choices[0].message.content or ""), PERSON)
    # Any object: one cut by max_tokens cannot parse, one that stopped must.
    if free.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(free.choices[0].message.content or ""), dict)


def test_regex_and_choice(pool: Pool, client: Client) -> None:
    model = chatting(client.get_model(model_uid=pool.uid))
    date = completed(
        model.generate("The date today is", {"regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", "max_tokens": 16})
    )
    text = date["choices"][0]["text"]
    assert len(text) == 10 and text[:2] == "20" and text[4] == "-", text
    chat = [{"role": "user", "content": "Is the sky blue? Answer yes or no."}]
    picked = completed(model.chat(chat, {"choice": ["yes", "no"], "temperature": 1.0, "seed": 5}))
    assert picked["choices"][0]["message"]["content"] in ("yes", "no")


def test_an_uncompilable_schema_is_a_400_that_says_why(pool: Pool, client: Client) -> None:
    model = chatting(client.get_model(model_uid=pool.uid))
    bad = {"type": "object", "properties": {"x": {"type": "integr"}}}
    with pytest.raises(BadRequest) as caught:
        model.chat(WEATHER_CHAT, {"response_format": _schema_format(bad)})
    assert "integr" in caught.value.message, caught.value.message
    import openai

    with pytest.raises(openai.BadRequestError) as http:
        _openai(pool).chat.completions.create(
            model=pool.uid,
            messages=WEATHER_CHAT,
            response_format=_schema_format(bad),  # type: ignore[arg-type]
        )
    assert "integr" in str(http.value)
    # The model keeps answering.
    assert completed(model.chat(WEATHER_CHAT, {"max_tokens": 2}))["choices"][0]["finish_reason"] in (
        "stop",
        "length",
    )


# ---------------------------------------------------------------------------- tools


def _check_call(call: dict[str, Any], name: str | None = None) -> None:
    assert call["type"] == "function" and call["id"].startswith("call_")
    function = call["function"]
    assert name is None or function["name"] == name
    arguments = json.loads(function["arguments"])
    jsonschema.validate(arguments, PARAMETERS[function["name"]])


def test_a_forced_tool_call_has_arguments_that_parse(pool: Pool, client: Client) -> None:
    model = chatting(client.get_model(model_uid=pool.uid))
    named = {"type": "function", "function": {"name": "get_weather"}}
    started = time.monotonic()

    def ask(seed: int) -> Callable[[], Any]:
        config = {
            "tools": [WEATHER, ADD],
            "tool_choice": named,
            "temperature": 0.8,
            "seed": seed,
            "max_tokens": 64,
        }
        return lambda: model.chat(WEATHER_CHAT, config)

    def required() -> Any:
        return model.chat(
            [{"role": "user", "content": "What is 2 plus 3?"}],
            {"tools": [WEATHER, ADD], "tool_choice": "required", "temperature": 0, "max_tokens": 64},
        )

    *replies, any_tool = _at_once([ask(0), ask(1), required])
    for reply in replies:
        [choice] = reply["choices"]
        assert choice["finish_reason"] == "tool_calls", choice
        [call] = choice["message"]["tool_calls"]
        _check_call(call, "get_weather")
    [call] = any_tool["choices"][0]["message"]["tool_calls"]
    _check_call(call)
    print(f"3 forced calls side by side in {time.monotonic() - started:.1f} s")

    # Streamed: the call comes as a tool_calls delta, then the finish reason.
    chunks = list(
        streamed(
            model.chat(
                WEATHER_CHAT,
                {"tools": [WEATHER], "tool_choice": named, "stream": True, "max_tokens": 64},
            )
        )
    )
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    [calls] = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert calls[0]["index"] == 0
    _check_call(calls[0], "get_weather")
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_tools_through_openai_and_a_history_with_tool_results(pool: Pool) -> None:
    openai = _openai(pool)
    reply = openai.chat.completions.create(
        model=pool.uid,
        messages=WEATHER_CHAT,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=64,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS["get_weather"])
    # Streamed, openai-python puts the call together from its tool_calls delta.
    stream = openai.chat.completions.create(
        model=pool.uid,
        messages=WEATHER_CHAT,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        max_tokens=64,
        stream=True,
    )
    parts = [d for chunk in stream for c in chunk.choices for d in (c.delta.tool_calls or ())]
    assert parts and parts[0].function and parts[0].function.name == "get_weather"
    jsonschema.validate(
        json.loads("".join(p.function.arguments or "" for p in parts if p.function)),
        PARAMETERS["get_weather"],
    )
    # The answer goes back as a tool message; the model answers in words (tool_choice auto).
    follow = openai.chat.completions.create(
        model=pool.uid,
        messages=[
            *WEATHER_CHAT,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'},
        ],  # type: ignore[list-item]
        tools=[WEATHER],  # type: ignore[list-item]
        max_tokens=24,
        temperature=0,
    )
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


# ---------------------------------------------------------------------------- logprobs, n, usage


def test_chat_logprobs_over_nats_and_http(pool: Pool, client: Client) -> None:
    model = chatting(client.get_model(model_uid=pool.uid))
    reply = completed(
        model.chat(WEATHER_CHAT, {"logprobs": True, "top_logprobs": 3, "max_tokens": 8, "temperature": 0})
    )
    content = reply["choices"][0]["logprobs"]["content"]
    assert len(content) == reply["usage"]["completion_tokens"]
    for entry in content:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 3 and isinstance(entry["bytes"], list)
        # Greedy: the chosen token is the most likely one.
        assert entry["top_logprobs"][0]["token"] == entry["token"]
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"], abs=1e-4)

    http = _openai(pool).chat.completions.create(
        model=pool.uid,
        messages=WEATHER_CHAT,
        logprobs=True,
        top_logprobs=3,
        max_tokens=8,
        temperature=0,  # type: ignore[arg-type]
    )
    entries = http.choices[0].logprobs.content  # type: ignore[union-attr]
    assert [e.token for e in entries] == [e["token"] for e in content]
    assert [e.logprob for e in entries] == pytest.approx([e["logprob"] for e in content], abs=1e-4)

    streamed = _openai(pool).chat.completions.create(
        model=pool.uid,
        messages=WEATHER_CHAT,  # type: ignore[arg-type]
        logprobs=True,
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    tokens = [
        e.token for chunk in streamed for c in chunk.choices if c.logprobs for e in c.logprobs.content or ()
    ]
    assert tokens == [e["token"] for e in content]


def test_completion_logprobs_with_the_echo_over_http(pool: Pool) -> None:
    reply = _openai(pool).completions.create(
        model=pool.uid, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=2, echo=True
    )
    choice = reply.choices[0]
    assert choice.text.startswith("The capital of France is")
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs and logprobs.text_offset
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset)
    assert logprobs.token_logprobs[0] is None  # the first prompt token has nothing before it
    assert all(v is not None and v <= 0 for v in logprobs.token_logprobs[1:])
    assert logprobs.text_offset == sorted(logprobs.text_offset)


def test_n_choices_reproducible_with_a_seed_and_usage_counting_all(pool: Pool, client: Client) -> None:
    model = chatting(client.get_model(model_uid=pool.uid))
    config = {"n": 3, "seed": 11, "temperature": 1.0, "max_tokens": 12}
    first = completed(model.chat(WEATHER_CHAT, config))
    again = completed(model.chat(WEATHER_CHAT, config))
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in first["choices"]] == [
        c["message"]["content"] for c in again["choices"]
    ]
    counted = first["usage"]["completion_tokens"]
    assert 3 <= counted <= 36 and first["usage"]["total_tokens"] == counted + first["usage"]["prompt_tokens"]
    http = _openai(pool).chat.completions.create(
        model=pool.uid,
        messages=WEATHER_CHAT,
        n=2,
        max_tokens=6,
        seed=4,  # type: ignore[arg-type]
    )
    assert sorted(c.index for c in http.choices) == [0, 1]


def test_include_usage_on_a_nats_stream(pool: Pool, client: Client) -> None:
    model = chatting(client.get_model(model_uid=pool.uid))
    chunks = list(
        streamed(
            model.chat(
                WEATHER_CHAT,
                {"stream": True, "stream_options": {"include_usage": True}, "max_tokens": 6, "n": 2},
            )
        )
    )
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 2
    assert all("usage" not in chunk for chunk in chunks[:-1])
    assert sorted(c["choices"][0]["index"] for c in chunks[:-1] if c["choices"][0]["finish_reason"]) == [0, 1]


# ---------------------------------------------------------------------------- the CLI


def test_the_cli_takes_a_json_schema_file_logprobs_and_n(pool: Pool, tmp_path: Path) -> None:
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))
    where = {"NATSERVE_HOME": pool.home, "NATSERVE_NATS_URL": pool.nats_url}
    chat = natserve(
        "chat",
        pool.uid,
        "Describe a sailor.",
        "--json-schema",
        str(schema),
        "--seed",
        "1",
        "--json",
        tmp_path=tmp_path,
        **where,
    )
    assert chat.returncode == 0, chat.stderr
    jsonschema.validate(json.loads(json.loads(chat.stdout)["choices"][0]["message"]["content"]), PERSON)

    scored = natserve(
        "generate",
        pool.uid,
        "The capital of France is",
        "--logprobs",
        "2",
        "--n",
        "2",
        "--max-tokens",
        "3",
        tmp_path=tmp_path,
        **where,
    )
    assert scored.returncode == 0, scored.stderr
    # Each choice's text, then its tokens with their logprobs.
    assert "[0]" in scored.stdout and "[1]" in scored.stdout
    assert len(re.findall(r"^ +'.*' +-?\d+\.\d{4}$", scored.stdout, re.MULTILINE)) >= 2, scored.stdout

    missing = natserve(
        "chat", pool.uid, "hi", "--json-schema", str(tmp_path / "nope.json"), tmp_path=tmp_path, **where
    )
    assert "nope.json" in assert_one_error_line(missing)


# ---------------------------------------------------------------------------- LangChain


def test_langchain_structured_output_and_bound_tools(pool: Pool) -> None:
    from langchain_core.tools import tool as tool_def
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field, SecretStr

    class City(BaseModel):
        name: str = Field(max_length=24)
        country: str = Field(max_length=24)

    llm = ChatOpenAI(
        base_url=pool.v1, api_key=SecretStr("unused"), model=pool.uid, max_completion_tokens=64, temperature=0
    )
    # with_structured_output sends response_format json_schema (strict), as LangChain does by default.
    city = llm.with_structured_output(City, method="json_schema").invoke("Name a big city in Europe.")
    assert isinstance(city, City) and city.name

    @tool_def
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return "sunny"

    bound = llm.bind_tools([get_weather], tool_choice="get_weather")
    message = bound.invoke("What is the weather like in Rome?")
    [call] = message.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"].get("city"), str)
