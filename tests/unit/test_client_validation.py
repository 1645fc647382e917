"""What the client checks before it sends anything: a definition, a launch's options, a
generate config (and the fast path of that check agreeing with the wire model). The client is
pointed at a port nothing listens on, so a BadRequest proves that nothing was sent."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from broker_client import AsyncChatModelHandle, AsyncClient, AsyncEmbeddingModelHandle, BadRequest, Client
from tests.support.fake_services import NSQL_2B
from tests.support.ports import free_port


def _dead_url() -> str:
    # Nothing listens here, so a BadRequest (and not a TransportError) proves nothing was sent.
    return f"nats://127.0.0.1:{free_port()}"


@pytest.mark.parametrize(
    ("model_type", "model", "needle"),
    [
        ("LLM", {**NSQL_2B, "model_specs": []}, "model_specs"),
        ("LLM", {**NSQL_2B, "model_name": "bad name"}, "model_name"),
        ("LLM", {**NSQL_2B, "model_ability": ["embed"]}, "model_ability"),
        ("LLM", "{not json", "malformed JSON"),
        ("vision", NSQL_2B, "model_type"),
        ("LLM", {**NSQL_2B, "model_specs": [{"model_size_in_billions": 2}]}, "model_id"),
    ],
)
def test_register_validates_locally(model_type: str, model: Any, needle: str) -> None:
    with Client(_dead_url(), connect_timeout=0.5) as client, pytest.raises(BadRequest, match=needle):
        client.register_model(model_type=model_type, model=model)


def test_launch_validates_locally() -> None:
    with Client(_dead_url(), connect_timeout=0.5) as client:
        with pytest.raises(BadRequest, match="quantization"):
            client.launch_model("nsql-2B", quantization="3-bit")
        with pytest.raises(BadRequest, match="no_such_option: unknown field"):
            client.launch_model("nsql-2B", no_such_option=1)
        with pytest.raises(BadRequest, match="model_name"):
            client.launch_model("nsql 2B")


async def test_generate_config_validated_locally() -> None:
    client = AsyncClient(_dead_url(), connect_timeout=0.5)  # never connected: no `async with`
    try:
        model = AsyncChatModelHandle(client, "m1")
        with pytest.raises(BadRequest, match=r"generate_config\.max_token: unknown field"):
            await model.generate("hi", {"max_token": 3})
        with pytest.raises(BadRequest, match=r"generate_config\.temperature"):
            await model.chat([{"role": "user", "content": "hi"}], {"temperature": -1})
        with pytest.raises(BadRequest, match="messages"):
            await model.chat([])
        with pytest.raises(BadRequest, match="prompt must be a string"):
            await model.generate(["not", "a", "string"])  # type: ignore[arg-type]
        with pytest.raises(BadRequest, match="at least one"):
            await AsyncEmbeddingModelHandle(client, "e1").create_embedding([])
    finally:
        await client.close()


_CONFIG_VALUES = st.one_of(
    st.integers(-5, 5),
    st.floats(-2, 2),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=2),
    st.lists(st.integers(0, 3), max_size=2),
)
_CONFIG_KEYS = st.sampled_from(
    ["max_tokens", "temperature", "top_p", "top_k", "seed", "stream", "stop", "stop_token_ids", "bogus"]
)


@settings(max_examples=1500, deadline=None)
@given(st.dictionaries(_CONFIG_KEYS, _CONFIG_VALUES, max_size=4))
def test_generate_config_fast_check_agrees_with_the_model(config: dict[str, Any]) -> None:
    """The client's fast check of plain configs takes only what the wire model takes unchanged;
    everything else gets the model's verdict (and its error naming the key): a config the
    model refuses raises, so the fast check did not pass it as it was."""
    from broker_client import GenerateConfig, check_generate_config

    try:
        expected = GenerateConfig.model_validate(config).model_dump(exclude_unset=True)
    except ValidationError:
        with pytest.raises(BadRequest, match="generate_config"):
            check_generate_config(config)
        return
    assert check_generate_config(config) == expected
