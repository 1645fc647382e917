"""Chat prompts: Xinference's prompt styles byte for byte, chat templates, and chat end to end."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from broker_client import BadRequest, PromptStyle
from tests.support.worker import Harness, llm_definition, running_harness
from workers.chat import PROMPT_STYLES, build_chat_prompt, render_prompt_style

# The conversation every style renders: three turns, the last one the new prompt.
CONVERSATION = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "How are you?"},
]

# (style as an Xinference definition would write it, the prompt Xinference builds from it).
STYLES: dict[str, tuple[dict[str, Any], str]] = {
    "ADD_COLON_SINGLE": (
        {
            "style_name": "ADD_COLON_SINGLE",
            "system_prompt": "A chat.",
            "roles": ["User", "Assistant"],
            "intra_message_sep": "\n",
        },
        "A chat.\nUser: Hi\nAssistant: Hello!\nUser: How are you?\nAssistant:",
    ),
    "ADD_COLON_TWO": (
        {
            "style_name": "ADD_COLON_TWO",
            "system_prompt": "A chat between a user and an assistant.",
            "roles": ["USER", "ASSISTANT"],
            "intra_message_sep": " ",
            "inter_message_sep": "</s>",
        },
        "A chat between a user and an assistant. USER: Hi ASSISTANT: Hello!</s>USER: How are you? ASSISTANT:",
    ),
    "NO_COLON_TWO": (
        {
            "style_name": "NO_COLON_TWO",
            "system_prompt": "Be brief.",
            "roles": [" <reserved_102> ", " <reserved_103> "],
            "intra_message_sep": "",
            "inter_message_sep": "</s>",
        },
        "Be brief. <reserved_102> Hi <reserved_103> Hello!</s> <reserved_102> How are you? <reserved_103> ",
    ),
    "ADD_COLON_SINGLE_COT": (
        {
            "style_name": "ADD_COLON_SINGLE_COT",
            "system_prompt": "Think.",
            "roles": ["Q", "A"],
            "intra_message_sep": "\n",
        },
        "Think.\nQ: Hi\nA: Hello!\nQ: How are you?\nA: Let's think step by step.",
    ),
    "LLAMA2": (
        {
            "style_name": "LLAMA2",
            "system_prompt": "<s>[INST] <<SYS>>\nYou are helpful.\n<</SYS>>\n\n",
            "roles": ["[INST]", "[/INST]"],
            "intra_message_sep": " ",
            "inter_message_sep": " </s><s>",
            "stop_token_ids": [2],
        },
        "<s>[INST] <<SYS>>\nYou are helpful.\n<</SYS>>\n\nHi[/INST] Hello! </s><s>"
        "[INST] How are you? [/INST]",
    ),
    "LLAMA3": (
        {
            "style_name": "LLAMA3",
            "system_prompt": "You are helpful.",
            "roles": ["user", "assistant"],
            "intra_message_sep": "\n\n",
            "inter_message_sep": "<|eot_id|>",
            "stop_token_ids": [128001, 128009],
            "stop": ["<|end_of_text|>", "<|eot_id|>"],
        },
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHow are you?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "CHATML": (
        {
            "style_name": "CHATML",
            "system_prompt": "<|im_start|>system\nYou are helpful.",
            "roles": ["<|im_start|>user", "<|im_start|>assistant"],
            "intra_message_sep": "<|im_end|>",
            "inter_message_sep": "",
            "stop": ["<|im_end|>"],
        },
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nHow are you?<|im_end|>\n"
        "<|im_start|>assistant\n",
    ),
    "QWEN": (
        {
            "style_name": "QWEN",
            "system_prompt": "You are helpful.",
            "roles": ["user", "assistant"],
            "intra_message_sep": "\n",
            "stop": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        },
        "<|im_start|>system\nYou are helpful.<|im_end|>"
        "\n<|im_start|>user\nHi<|im_end|>"
        "\n<|im_start|>assistant\nHello!<|im_end|>"
        "\n<|im_start|>user\nHow are you?<|im_end|>"
        "\n<|im_start|>assistant\n",
    ),
}


def test_every_style_is_covered() -> None:
    assert set(STYLES) == set(PROMPT_STYLES)


@pytest.mark.parametrize("name", list(STYLES))
def test_prompt_style_matches_xinference(name: str) -> None:
    style, expected = STYLES[name]
    assert render_prompt_style(PromptStyle.model_validate(style), CONVERSATION, model="m") == expected


def test_system_messages_replace_the_style_prompt() -> None:
    # As Xinference's REST API: every system message, joined with ". ", replaces system_prompt.
    style = PromptStyle.model_validate(STYLES["ADD_COLON_SINGLE"][0])
    messages = [
        {"role": "system", "content": "Be short"},
        *CONVERSATION[:2],
        {"role": "system", "content": "Answer in French"},
        CONVERSATION[2],
    ]
    assert render_prompt_style(style, messages, model="m") == (
        "Be short. Answer in French\nUser: Hi\nAssistant: Hello!\nUser: How are you?\nAssistant:"
    )
    qwen = PromptStyle.model_validate(STYLES["QWEN"][0])
    assert render_prompt_style(
        qwen, [{"role": "system", "content": "Terse."}, CONVERSATION[0]], model="m"
    ) == ("<|im_start|>system\nTerse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_prompt_style_stops_and_bos() -> None:
    prompt = build_chat_prompt(CONVERSATION, model="m", prompt_style=STYLES["LLAMA3"][0])
    assert prompt.source == "prompt_style"
    assert prompt.stop == ("<|end_of_text|>", "<|eot_id|>")
    assert prompt.stop_token_ids == (128001, 128009)
    assert prompt.add_special_tokens

    class Tok:
        bos_token = "<s>"

    llama2 = build_chat_prompt(CONVERSATION, model="m", prompt_style=STYLES["LLAMA2"][0], tokenizer=Tok())
    # The style writes <s> itself, so the tokenizer must not add a second one.
    assert not llama2.add_special_tokens


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        ([{"role": "function", "content": "42"}, {"role": "user", "content": "hi"}], "'function'"),
        ([{"role": "robot", "content": "hi"}], "'robot'"),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
            "must come from the user",
        ),
    ],
)
def test_prompt_style_rejects_bad_conversations(messages: list[dict[str, str]], needle: str) -> None:
    with pytest.raises(BadRequest) as info:
        build_chat_prompt(messages, model="m", prompt_style=STYLES["CHATML"][0])
    assert needle in info.value.message


def test_unknown_style_is_a_clear_400() -> None:
    with pytest.raises(BadRequest) as info:
        build_chat_prompt(
            CONVERSATION, model="m7", prompt_style={"style_name": "FALCON_MAGIC", "roles": ["a", "b"]}
        )
    message = info.value.message
    assert "'FALCON_MAGIC'" in message and "'m7'" in message and "CHATML" in message


TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)
TEMPLATE_PROMPT = "[user] Hi\n[assistant] Hello!\n[user] How are you?\n[assistant] "


def test_chat_template_string_wins(tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompt = build_chat_prompt(
        CONVERSATION, model="m", chat_template=TEMPLATE, prompt_style=STYLES["QWEN"][0], tokenizer=tokenizer
    )
    assert prompt.source == "chat_template" and prompt.text == TEMPLATE_PROMPT
    assert not prompt.add_special_tokens and prompt.stop == ()
    # Without a tokenizer (the echo engine) the same sandbox renders it.
    bare = build_chat_prompt(CONVERSATION, model="m", chat_template=TEMPLATE)
    assert bare.text == TEMPLATE_PROMPT

    # The tokenizer's own template comes last.
    own = build_chat_prompt(CONVERSATION, model="m", tokenizer=tokenizer)
    assert own.source == "tokenizer"
    assert own.text == (
        "<s><|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n<|user|>\nHow are you?</s>\n<|assistant|>\n"
    )

    with pytest.raises(BadRequest) as info:
        build_chat_prompt([{"role": "function", "content": "x"}], model="m", tokenizer=tokenizer)
    assert "'function'" in info.value.message

    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    with pytest.raises(BadRequest) as info:
        build_chat_prompt(
            [{"role": "system", "content": "x"}], model="m", chat_template=strict, tokenizer=tokenizer
        )
    assert "user first" in info.value.message


def test_no_template_at_all_is_a_400() -> None:
    with pytest.raises(BadRequest) as info:
        build_chat_prompt(CONVERSATION, model="plain")
    assert "'plain' cannot chat" in info.value.message


# ----------------------------------------------------------------------------- end to end


@pytest.fixture
async def harness(nats_url: str, unique: str) -> AsyncIterator[Harness]:
    async with running_harness(nats_url, f"c{unique}") as h:
        yield h


async def test_chat_completion_end_to_end(harness: Harness, tiny_llama_dir: Path, unique: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    uid = f"chat-{unique}"
    await harness.launch(uid, llm_definition("chatty", str(tiny_llama_dir)))
    config = {"max_tokens": 8, "seed": 3}
    reply = await harness.call(uid, "chat", {"messages": CONVERSATION, "generate_config": config})
    assert reply["object"] == "chat.completion" and reply["model"] == uid
    assert reply["id"].startswith("chatcmpl-")
    (choice,) = reply["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    # The tokenizer's template writes its own <s>: the prompt is counted without a second one.
    expected = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    usage = reply["usage"]
    assert usage["prompt_tokens"] == len(tokenizer.encode(expected, add_special_tokens=False))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    chunks = [
        c
        async for c in harness.transport.stream(
            harness.subjects.model(uid, "chat"),
            {"messages": CONVERSATION, "generate_config": {**config, "stream": True}},
            timeout=60,
        )
    ]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert chunks[-1]["usage"] == usage
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == choice["message"]["content"]

    # Unknown role: a 400 naming it, in the error headers of a raw JSON request too.
    msg = await harness.raw(
        harness.subjects.model(uid, "chat"), {"messages": [{"role": "wizard", "content": "hi"}]}
    )
    assert msg.headers and msg.headers["Nats-Service-Error-Code"] == "400"
    assert "'wizard'" in json.loads(msg.data)["error"]["message"]


async def test_chat_with_prompt_style_and_abilities(
    harness: Harness, tiny_llama_dir: Path, unique: str
) -> None:
    style, expected = STYLES["ADD_COLON_SINGLE"]
    uid = f"styled-{unique}"
    await harness.launch(uid, llm_definition("styled", str(tiny_llama_dir), prompt_style=style))
    reply = await harness.call(uid, "chat", {"messages": CONVERSATION, "generate_config": {"max_tokens": 4}})
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    # Xinference tokenises prompt-style prompts with the tokenizer's defaults (BOS added).
    assert reply["usage"]["prompt_tokens"] == len(tokenizer.encode(expected))

    generate_only = f"gen-{unique}"
    await harness.launch(
        generate_only, llm_definition("genonly", str(tiny_llama_dir), model_ability=["generate"])
    )
    with pytest.raises(BadRequest) as info:
        await harness.call(generate_only, "chat", {"messages": CONVERSATION})
    assert "cannot chat" in info.value.message and "abilities are generate" in info.value.message

    echo = f"echo-{unique}"
    await harness.launch(echo, llm_definition("echo", "echo:", chat_template=TEMPLATE))
    out = await harness.call(echo, "chat", {"messages": CONVERSATION})
    assert out["choices"][0]["message"]["content"] == " ".join(TEMPLATE_PROMPT.split())
