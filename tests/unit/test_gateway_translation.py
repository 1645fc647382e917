"""The gateway's pure layers, without a server: OpenAI and Xinference bodies to natserve calls,
replies and streams back, errors as OpenAI error objects, API keys, request ids, the pool page's
rows and the metrics."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from broker_client import (
    AsyncStream,
    BadRequest,
    Conflict,
    InternalError,
    NoResponders,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    ServerTimeout,
    TransportError,
    Unavailable,
)
from natserve.gateway import ApiKeys, GatewayMetrics, InvalidField, Unauthorized, error_reply, load_api_keys
from natserve.gateway.openai import (
    SAMPLING_FIELDS,
    chat_call,
    completion_call,
    embedding_call,
    encode_embeddings,
    model_entry,
    name_the_field,
    openai_chunks,
)
from natserve.gateway.pool_page import pool_view, refresh_seconds, render_pool_page
from natserve.gateway.request_ids import request_id
from natserve.gateway.xinference import launch_arguments, register_arguments

# ---------------------------------------------------------------------------- completions


def test_a_completion_body_becomes_a_generate_call() -> None:
    uid, prompt, config, usage = completion_call(
        {"model": "m1", "prompt": "SELECT", "max_tokens": 8, "temperature": 0, "top_p": 0.9, "seed": 3}
    )
    assert (uid, prompt, usage) == ("m1", "SELECT", False)
    assert config == {"max_tokens": 8, "temperature": 0, "top_p": 0.9, "seed": 3}


def test_stop_may_be_a_string_or_a_list_and_natserve_extras_pass() -> None:
    # One stop string is the list of one, as natserve checks it.
    assert completion_call({"model": "m", "prompt": "p", "stop": "\n"})[2] == {"stop": ["\n"]}
    _, _, config, _ = completion_call(
        {"model": "m", "prompt": "p", "stop": ["a", "b"], "top_k": 5, "stop_token_ids": [2]}
    )
    assert config == {"stop": ["a", "b"], "top_k": 5, "stop_token_ids": [2]}


def test_streaming_with_usage_asked_for() -> None:
    _, _, config, usage = completion_call(
        {"model": "m", "prompt": "p", "stream": True, "stream_options": {"include_usage": True}}
    )
    assert config == {"stream": True} and usage is True
    assert completion_call({"model": "m", "prompt": "p", "stream": False})[2] == {}


def test_stream_options_need_a_stream() -> None:
    with pytest.raises(InvalidField) as caught:
        completion_call({"model": "m", "prompt": "p", "stream_options": {"include_usage": True}})
    assert caught.value.param == "stream_options"
    with pytest.raises(InvalidField) as caught:
        completion_call({"model": "m", "prompt": "p", "stream": True, "stream_options": {"x": 1}})
    assert caught.value.param == "stream_options.x"


def test_nulls_and_neutral_values_ask_for_nothing() -> None:
    body: dict[str, Any] = {
        "model": "m",
        "prompt": ["one prompt"],
        "max_tokens": None,
        "n": 1,
        "best_of": 1,
        "echo": False,
        "logprobs": None,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "suffix": None,
        "user": "someone",
    }
    assert completion_call(body)[1:3] == ("one prompt", {})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 2),
        ("best_of", 1),
        ("echo", True),
        ("logprobs", 0),
        ("presence_penalty", 0.5),
        ("frequency_penalty", -1.0),
        ("repetition_penalty", 1.2),
        ("min_p", 0.1),
        ("logit_bias", {"1": 2.0}),
        ("regex", "[0-9]+"),
        ("choice", ["yes", "no"]),
        ("response_format", {"type": "json_object"}),
    ],
)
def test_the_fields_natserve_takes_go_into_generate_config(field: str, value: Any) -> None:
    _, _, config, _ = completion_call({"model": "m", "prompt": "p", field: value})
    assert config == ({} if field == "best_of" else {field: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 17),
        ("n", True),
        ("best_of", 2),
        ("echo", "yes"),
        ("logprobs", 21),
        ("logprobs", True),
        ("presence_penalty", 2.5),
        ("frequency_penalty", "high"),
        ("repetition_penalty", 0),
        ("min_p", 1.5),
        ("logit_bias", {"a": 2}),
        ("logit_bias", {"5": 101}),
        ("regex", ""),
        ("choice", []),
        ("response_format", {"type": "xml"}),
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ],
)
def test_a_wrong_value_of_a_taken_field_is_a_400_naming_it(field: str, value: Any) -> None:
    with pytest.raises(InvalidField) as caught:
        completion_call({"model": "m", "prompt": "p", field: value})
    assert caught.value.param == field and caught.value.code == 400
    assert field in caught.value.message


def test_a_field_natserve_does_not_act_on_is_a_400_naming_it() -> None:
    with pytest.raises(InvalidField) as caught:
        completion_call({"model": "m", "prompt": "p", "suffix": "!"})
    assert caught.value.param == "suffix" and caught.value.error_code == "unsupported_value"
    with pytest.raises(InvalidField) as caught:
        chat_call(
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}]}
        )
    assert caught.value.param == "functions" and caught.value.error_code == "unsupported_value"


def test_an_unknown_field_is_a_400_naming_it() -> None:
    with pytest.raises(InvalidField) as caught:
        completion_call({"model": "m", "prompt": "p", "max_token": 3})
    assert caught.value.param == "max_token" and caught.value.error_code == "unsupported_parameter"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "p"}, "model"),
        ({"model": "a.b", "prompt": "p"}, "model"),
        ({"model": "m"}, "prompt"),
        ({"model": "m", "prompt": 5}, "prompt"),
        ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "m", "prompt": [1, 2, 3]}, "prompt"),
        ({"model": "m", "prompt": "p", "stream": "yes"}, "stream"),
        ({"model": "m", "prompt": "p", "user": 5}, "user"),
        (["not", "an", "object"], None),
    ],
)
def test_bad_completion_bodies(body: Any, param: str | None) -> None:
    with pytest.raises(InvalidField) as caught:
        completion_call(body)
    assert caught.value.param == param


# ---------------------------------------------------------------------------- chat


def test_a_chat_body_becomes_a_chat_call() -> None:
    uid, messages, config, usage = chat_call(
        {
            "model": "m",
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            "max_completion_tokens": 16,
            "tools": [],
            "tool_choice": "auto",
            "parallel_tool_calls": True,
            "response_format": {"type": "text"},
            "logprobs": False,
        }
    )
    assert uid == "m" and config == {"max_tokens": 16} and usage is False
    assert [m["content"] for m in messages] == ["be brief", "hi"]


def test_max_tokens_and_max_completion_tokens_must_agree() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    assert chat_call({**body, "max_tokens": 4, "max_completion_tokens": 4})[2] == {"max_tokens": 4}
    with pytest.raises(InvalidField, match="differ"):
        chat_call({**body, "max_tokens": 4, "max_completion_tokens": 5})


def test_text_parts_are_joined_and_other_parts_refused() -> None:
    parts = [{"type": "text", "text": "a "}, {"type": "text", "text": "b"}]
    _, messages, _, _ = chat_call({"model": "m", "messages": [{"role": "user", "content": parts}]})
    assert messages[0]["content"] == "a b"
    image = [{"type": "image_url", "image_url": {"url": "http://x"}}]
    with pytest.raises(InvalidField) as caught:
        chat_call({"model": "m", "messages": [{"role": "user", "content": image}]})
    assert caught.value.param == "messages[0].content[0]"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m"}, "messages"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": ["hi"]}, "messages[0]"),
        ({"model": "m", "messages": [{"content": "hi"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
            "tools",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": "required"},
            "tool_choice",
        ),
        (
            {
                "model": "m",
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_schema", "json_schema": {"schema": {}}},
            },
            "response_format",
        ),
    ],
)
def test_bad_chat_bodies(body: Any, param: str) -> None:
    with pytest.raises(InvalidField) as caught:
        chat_call(body)
    assert caught.value.param == param


def test_the_sampling_fields_are_natserves_generate_config_keys() -> None:
    from broker_client import GenerateConfig

    assert set(SAMPLING_FIELDS.values()) <= set(GenerateConfig.model_fields)


@pytest.mark.parametrize(
    "fields",
    [
        {"max_tokens": 16},
        {"max_tokens": 8, "temperature": 0.5, "top_p": 0.9, "top_k": 4, "seed": 3, "stream": True},
        {"stop": "\n"},
        {"stop": ["a", "b"], "stop_token_ids": [2], "n": 2, "min_p": 0.1, "logit_bias": {"1": 2.0}},
        {"presence_penalty": 0.5, "frequency_penalty": -1.0, "repetition_penalty": 1.2},
        {"regex": "[0-9]+"},
        {"choice": ["yes", "no"]},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
    ],
)
def test_the_config_the_gateway_sends_is_the_one_the_handle_would_send(fields: dict[str, Any]) -> None:
    # The gateway hands its checked config to the handle's _send_checked, which does not check
    # it again: checking it again must change nothing, for either kind of request.
    from broker_client import check_generate_config

    _, _, config, _ = completion_call({"model": "m", "prompt": "p", **fields})
    assert config and check_generate_config(config, "completion") == config
    _, _, config, _ = chat_call({"model": "m", "messages": [{"role": "user", "content": "q"}], **fields})
    assert config and check_generate_config(config, "chat") == config


def test_a_natserve_400_about_a_config_value_names_the_body_field() -> None:
    exc = BadRequest("invalid generate_config: generate_config.max_tokens: must be >= 1 (got 0)")
    named = name_the_field(exc, {"max_completion_tokens": 0})
    assert named is not None and named.param == "max_completion_tokens" and named.message == exc.message
    assert name_the_field(BadRequest("prompt is too long"), {}) is None


# ---------------------------------------------------------------------------- embeddings


def test_embedding_bodies() -> None:
    assert embedding_call({"model": "e", "input": "a"}) == ("e", "a", False)
    assert embedding_call({"model": "e", "input": ["a", "b"], "encoding_format": "base64", "user": "u"}) == (
        "e",
        ["a", "b"],
        True,
    )
    for body, param in (
        ({"model": "e"}, "input"),
        ({"model": "e", "input": []}, "input"),
        ({"model": "e", "input": [[1, 2]]}, "input[0]"),
        ({"model": "e", "input": "a", "encoding_format": "int8"}, "encoding_format"),
        ({"model": "e", "input": "a", "dimensions": 8}, "dimensions"),
        ({"model": "e", "input": "a", "extra": 1}, "extra"),
    ):
        with pytest.raises(InvalidField) as caught:
            embedding_call(body)
        assert caught.value.param == param


def test_base64_embeddings_are_little_endian_float32() -> None:
    reply = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -1.0, 2.25]}]}
    encoded = encode_embeddings(reply)["data"][0]["embedding"]
    assert struct.unpack("<3f", base64.b64decode(encoded)) == (0.5, -1.0, 2.25)


# ---------------------------------------------------------------------------- streams and models


def _stream(chunks: list[dict[str, Any]]) -> AsyncStream:
    async def rest() -> Any:
        for chunk in chunks[1:]:
            yield chunk

    return AsyncStream(rest(), chunks[0], "r1")


def _chunks() -> list[dict[str, Any]]:
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    return [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]},
        {
            **base,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        },
    ]


async def test_a_stream_without_usage_asked_carries_none() -> None:
    out = [c async for c in openai_chunks(_stream(_chunks()), include_usage=False)]
    assert len(out) == 3 and all("usage" not in c for c in out)


async def test_a_stream_with_usage_ends_with_a_usage_chunk() -> None:
    out = [c async for c in openai_chunks(_stream(_chunks()), include_usage=True)]
    assert len(out) == 4
    assert all(c["usage"] is None for c in out[:3])
    assert out[-1]["choices"] == [] and out[-1]["usage"]["total_tokens"] == 4 and out[-1]["id"] == "c1"


def test_a_model_entry_is_openai_on_natserve() -> None:
    entry = model_entry("m1", {"model_type": "LLM", "model_ability": ["chat"], "created_at": 12.5})
    assert entry["id"] == "m1" and entry["object"] == "model" and entry["created"] == 12
    assert entry["owned_by"] == "natserve" and entry["model_ability"] == ["chat"]


# ---------------------------------------------------------------------------- Xinference


def test_the_xinference_clients_launch_body() -> None:
    # What RESTfulClient.launch_model(model_name="nsql-2B", quantization="4-bit") sends.
    body = {
        "model_uid": None,
        "model_name": "nsql-2B",
        "model_engine": None,
        "peft_model_config": None,
        "model_type": "LLM",
        "model_size_in_billions": None,
        "model_format": None,
        "quantization": "4-bit",
        "replica": 1,
        "n_worker": 1,
        "n_gpu": "auto",
        "request_limits": None,
        "worker_ip": None,
        "gpu_idx": None,
        "replica_config": None,
        "model_path": None,
        "enable_thinking": None,
        "enable_virtual_env": None,
        "virtual_env_packages": None,
        "virtual_env_find_links": None,
        "envs": None,
    }
    assert launch_arguments(body, wait=True) == {
        "model_name": "nsql-2B",
        "model_type": "LLM",
        "quantization": "4-bit",
        "replica": 1,
        "n_gpu": "auto",
        "wait": True,
        "progress": False,
    }


def test_launch_fields_natserve_cannot_honour() -> None:
    assert launch_arguments({"model_name": "m", "n_gpu": None}, wait=False)["n_gpu"] == 0  # CPU only
    assert (
        launch_arguments({"model_name": "m", "model_engine": "Transformers"}, wait=True)["model_name"] == "m"
    )
    for field, value in (("model_engine", "vllm"), ("n_worker", 2), ("gpu_idx", [0]), ("bogus", 1)):
        with pytest.raises(InvalidField) as caught:
            launch_arguments({"model_name": "m", field: value}, wait=True)
        assert caught.value.param == field
    with pytest.raises(InvalidField) as caught:
        launch_arguments({"quantization": "none"}, wait=True)
    assert caught.value.param == "model_name"


def test_register_bodies() -> None:
    args = register_arguments("LLM", {"model": "{}", "worker_ip": None, "persist": True})
    assert args == {"model_type": "LLM", "model": "{}", "persist": True}
    for body, param in (
        ({"persist": False}, "model"),
        ({"model": "{}", "worker_ip": "10.0.0.1"}, "worker_ip"),
    ):
        with pytest.raises(InvalidField) as caught:
            register_arguments("LLM", body)
        assert caught.value.param == param


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("exc", "status", "kind"),
    [
        (BadRequest("x"), 400, "invalid_request_error"),
        (PayloadTooLarge("x"), 400, "invalid_request_error"),
        (Unauthorized("x"), 401, "invalid_request_error"),
        (NotFound("model 'm' is not running: ..."), 404, "invalid_request_error"),
        (Conflict("x"), 409, "invalid_request_error"),
        (Overloaded("x"), 429, "rate_limit_error"),
        (InternalError("x"), 500, "server_error"),
        (Unavailable("x"), 503, "server_error"),
        (NoResponders("x"), 503, "server_error"),
        (TransportError("x"), 503, "server_error"),
        (ServerTimeout("x"), 504, "server_error"),
        (RequestTimeout("x"), 504, "server_error"),
    ],
)
def test_natserve_errors_are_openai_error_objects_with_natserves_status(
    exc: Exception, status: int, kind: str
) -> None:
    got, body = error_reply(exc)
    assert got == status
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == kind and body["detail"] == body["error"]["message"]


def test_error_codes_say_what_went_wrong() -> None:
    assert error_reply(NotFound("model 'm' is not running"))[1]["error"]["code"] == "model_not_found"
    assert error_reply(PayloadTooLarge("big"))[1]["error"]["code"] == "payload_too_large"
    _, body = error_reply(InvalidField("bad", param="temperature"))
    assert body["error"]["param"] == "temperature"


def test_a_bug_is_a_500_without_its_traceback() -> None:
    status, body = error_reply(KeyError("secret internals"))
    assert status == 500 and "secret" not in json.dumps(body) and "KeyError" in body["error"]["message"]


# ---------------------------------------------------------------------------- keys and ids


def test_api_keys() -> None:
    ApiKeys().check(None)  # off: everything passes
    keys = ApiKeys(["k1", "k2"])
    keys.check(b"Bearer k2")
    basic = base64.b64encode(b"anyone:k1")
    keys.check(b"Basic " + basic)
    for header in (None, b"", b"Bearer nope", b"Token k1", b"Basic !!!", b"Bearer"):
        with pytest.raises(Unauthorized):
            keys.check(header)


def test_api_keys_from_the_environment_and_a_file(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# the team's keys\nk3\n\n  k4  \n")
    keys = load_api_keys("k1, k2", path)
    assert len(keys) == 4
    keys.check(b"Bearer k4")
    assert not load_api_keys(None, None).enabled
    empty = tmp_path / "empty"
    empty.write_text("# none yet\n")
    with pytest.raises(ValueError, match="holds no key"):
        load_api_keys(None, empty)
    with pytest.raises(ValueError, match="cannot read"):
        load_api_keys(None, tmp_path / "missing")


def test_request_ids() -> None:
    assert request_id(b"abc-123") == "abc-123"
    made = {request_id(None) for _ in range(100)}
    assert len(made) == 100 and all(len(r) <= 128 for r in made)
    for bad in (b"x" * 129, b"has space", "ü".encode()):
        with pytest.raises(InvalidField) as caught:
            request_id(bad)
        assert caught.value.param == "X-Request-Id"


# ---------------------------------------------------------------------------- pool page and metrics


def _status() -> dict[str, Any]:
    return {
        "ts": 1000.0,
        "workers": [
            {
                "worker_id": "w1",
                "host": "h1",
                "state": "alive",
                "last_seen": 999.0,
                "devices": [{"name": "cpu", "total_memory": 8 << 30, "free_memory": 6 << 30}],
                "replicas": [
                    {
                        "model_uid": "m1",
                        "replica_index": 0,
                        "device": "cpu",
                        "status": "ready",
                        "active": 2,
                        "waiting": 1,
                    }
                ],
            }
        ],
        "models": {"m1": {"model_name": "m", "model_type": "LLM", "replicas": [{"status": "ready"}]}},
        "recent_errors": [{"ts": 990.0, "source": "w1", "code": 500, "message": "<script>boom</script>"}],
    }


def test_the_pool_view() -> None:
    view = pool_view(_status())
    assert view["workers"][0]["in_flight"] == "3" and view["workers"][0]["last_seen"] == "1.0 s ago"
    assert view["devices"][0]["free"] == "6.0 GiB" and view["devices"][0]["used_pct"] == "25"
    assert view["replicas"][0]["running"] == "2" and view["models"][0]["ready"] == "1/1"
    assert "1 of 1 worker(s) alive" in view["summary"]


def test_the_page_escapes_what_it_shows_and_refreshes() -> None:
    html = render_pool_page(_status(), refresh=7)
    assert "&lt;script&gt;boom" in html and "<script>" not in html
    assert '<meta http-equiv="refresh" content="7">' in html
    assert "http-equiv" not in render_pool_page(_status(), refresh=0)
    assert "did not answer" in render_pool_page(None, problem="no registry")
    assert (refresh_seconds(None), refresh_seconds("x"), refresh_seconds("-3"), refresh_seconds("99999")) == (
        5,
        5,
        0,
        3600,
    )


def test_gateway_metrics_on_a_registry() -> None:
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    route = metrics.route("chat_completions")
    route.done(200, 0.003)
    route.done(400, 0.001)
    route.first_event.observe(0.02)
    text = generate_latest(registry).decode()
    assert 'natserve_gateway_requests_total{code="200",route="chat_completions"} 1.0' in text
    assert 'natserve_gateway_request_duration_seconds_count{route="chat_completions"} 2.0' in text
    assert 'natserve_gateway_time_to_first_event_seconds_count{route="chat_completions"} 1.0' in text
