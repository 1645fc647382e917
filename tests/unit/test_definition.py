"""The custom-model definition: Xinference's JSON accepted, every rule enforced by name."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from broker_client import (
    BadRequest,
    EmbeddingDefinition,
    LLMDefinition,
    ModelSpec,
    parse_definition,
)

# Xinference's custom LLM template (docs, "Custom Models"), the PyTorch spec natserve serves.
XINFERENCE_LLM = {
    "version": 1,
    "context_length": 2048,
    "model_name": "custom-llama-2",
    "model_lang": ["en"],
    "model_ability": ["generate"],
    "model_family": "llama-2",
    "model_specs": [
        {
            "model_format": "pytorch",
            "model_size_in_billions": 7,
            "quantizations": ["4-bit", "8-bit", "none"],
            "model_id": "meta-llama/Llama-2-7b-hf",
            "model_uri": "file:///path/to/llama-2-7b-hf",
        }
    ],
}

# Xinference's chat template: a prompt_style instead of a chat_template.
XINFERENCE_CHAT = {
    "version": 1,
    "context_length": 2048,
    "model_name": "custom-llama-2-chat",
    "model_lang": ["en"],
    "model_ability": ["chat"],
    "model_family": "my-llama-2-chat",
    "model_specs": [
        {
            "model_format": "pytorch",
            "model_size_in_billions": 7,
            "quantizations": ["none"],
            "model_uri": "file:///path/to/llama-2-chat",
        }
    ],
    "prompt_style": {
        "style_name": "LLAMA2",
        "system_prompt": "<s>[INST] <<SYS>>\nYou are a helpful AI assistant.\n<</SYS>>\n\n",
        "roles": ["[INST]", "[/INST]"],
        "intra_message_sep": " ",
        "inter_message_sep": " </s><s>",
        "stop_token_ids": [2],
    },
}

# The seed's example (Xinference's client docs): nsql-2B, generate only, prompt_style null.
NSQL = {
    "version": 1,
    "context_length": 2048,
    "model_name": "nsql-2B",
    "model_lang": ["en"],
    "model_ability": ["generate"],
    "model_description": "This is a model description.",
    "model_specs": [
        {
            "model_format": "pytorch",
            "model_size_in_billions": 2,
            "quantizations": ["4-bit", "8-bit", "none"],
            "model_id": "NumbersStation/nsql-2B",
        }
    ],
    "prompt_style": None,
}

# Xinference's custom embedding template: the flat form, no model_specs.
XINFERENCE_EMBEDDING = {
    "model_name": "custom-bge-base-en",
    "dimensions": 768,
    "max_tokens": 512,
    "language": ["en"],
    "model_id": "BAAI/bge-base-en",
    "model_uri": "file:///path/to/bge-base-en",
}


def _llm(**changes: Any) -> dict[str, Any]:
    model = copy.deepcopy(NSQL)
    model.update(changes)
    return model


def _spec(**changes: Any) -> dict[str, Any]:
    spec = copy.deepcopy(NSQL["model_specs"][0])  # type: ignore[index]
    spec.update(changes)
    return spec


def _reject(model: Any, model_type: str = "LLM") -> str:
    with pytest.raises(BadRequest) as info:
        parse_definition(model_type, model)
    assert info.value.code == 400
    return info.value.message


class TestXinferenceExamples:
    @pytest.mark.parametrize("example", [XINFERENCE_LLM, XINFERENCE_CHAT, NSQL], ids=["llm", "chat", "nsql"])
    def test_llm_examples_are_accepted_as_objects_and_as_json(self, example: dict[str, Any]) -> None:
        as_object = parse_definition("LLM", example)
        as_string = parse_definition("LLM", json.dumps(example))
        assert isinstance(as_object, LLMDefinition)
        assert as_object == as_string
        assert as_object.model_name == example["model_name"]
        assert as_object.model_ability == example["model_ability"]

    def test_prompt_style_is_kept(self) -> None:
        definition = parse_definition("LLM", XINFERENCE_CHAT)
        assert isinstance(definition, LLMDefinition)
        assert definition.prompt_style is not None
        assert definition.prompt_style.roles == ["[INST]", "[/INST]"]
        assert definition.prompt_style.stop_token_ids == [2]

    def test_embedding_flat_form_gets_one_spec(self) -> None:
        definition = parse_definition("embedding", XINFERENCE_EMBEDDING)
        assert isinstance(definition, EmbeddingDefinition)
        assert definition.model_ability == ["embed"]
        assert definition.dimensions == 768
        assert definition.model_specs is not None and len(definition.model_specs) == 1
        assert definition.model_specs[0].model_id == "BAAI/bge-base-en"
        spec, quantization = definition.spec_for()
        assert spec.model_uri == "file:///path/to/bge-base-en"
        assert quantization == "none"

    def test_a_normalised_dump_parses_again(self) -> None:
        # The registry stores model_dump(exclude_none=True) and parses it again at launch.
        for model_type, example in (("LLM", XINFERENCE_CHAT), ("embedding", XINFERENCE_EMBEDDING)):
            first = parse_definition(model_type, example)
            again = parse_definition(model_type, first.model_dump(mode="json", exclude_none=True))
            assert again == first

    def test_xinference_size_with_underscore(self) -> None:
        definition = parse_definition("LLM", _llm(model_specs=[_spec(model_size_in_billions="1_8")]))
        assert isinstance(definition, LLMDefinition)
        assert definition.model_specs[0].model_size_in_billions == 1.8

    def test_defaults(self) -> None:
        model = _llm()
        del model["context_length"], model["model_lang"], model["version"]
        model["model_specs"] = [{"model_size_in_billions": 2, "model_id": "Org/Name"}]
        definition = parse_definition("LLM", model)
        assert isinstance(definition, LLMDefinition)
        assert definition.context_length == 2048
        assert definition.model_specs[0].model_format == "pytorch"
        assert definition.model_specs[0].quantizations == ["none"]


class TestNames:
    @pytest.mark.parametrize("name", ["my model", "my.model", "-lead", "_lead", "", "a/b", "x*", "x>"])
    def test_bad_model_name_is_refused_naming_the_field(self, name: str) -> None:
        message = _reject(_llm(model_name=name))
        assert message.startswith("invalid model definition: model_name:")
        assert repr(name) in message
        assert "letters, digits, '_' and '-'" in message

    def test_too_long_name(self) -> None:
        assert "model_name" in _reject(_llm(model_name="a" * 129))

    @pytest.mark.parametrize("name", ["a", "7b", "Qwen2_5-chat", "A" * 128])
    def test_good_names(self, name: str) -> None:
        assert parse_definition("LLM", _llm(model_name=name)).model_name == name

    def test_missing_name(self) -> None:
        model = _llm()
        del model["model_name"]
        assert "model_name: Field required" in _reject(model)


class TestAbilities:
    def test_unknown_ability_names_it_and_the_allowed_ones(self) -> None:
        message = _reject(_llm(model_ability=["generate", "fly"]))
        assert message.startswith("model.model_ability:")
        assert "'fly'" in message
        assert "generate, chat" in message

    def test_embed_is_not_an_llm_ability(self) -> None:
        assert "'embed'" in _reject(_llm(model_ability=["embed"]))

    def test_chat_is_not_an_embedding_ability(self) -> None:
        message = _reject({**XINFERENCE_EMBEDDING, "model_ability": ["chat"]}, "embedding")
        assert "'chat'" in message and "'embedding'" in message

    def test_llm_needs_an_ability(self) -> None:
        assert "model_ability" in _reject(_llm(model_ability=[]))


class TestSpecs:
    def test_unknown_quantization_names_its_place(self) -> None:
        message = _reject(_llm(model_specs=[_spec(quantizations=["none", "3-bit"])]))
        assert "model_specs[0].quantizations[1]" in message
        assert "'3-bit'" in message

    def test_spec_without_model_id_or_model_uri(self) -> None:
        spec = _spec()
        del spec["model_id"]
        message = _reject(_llm(model_specs=[XINFERENCE_LLM["model_specs"][0], spec]))  # type: ignore[index]
        assert "model_specs[1]" in message
        assert "model_id" in message and "model_uri" in message

    def test_unknown_format(self) -> None:
        message = _reject(_llm(model_specs=[_spec(model_format="ggmlv3")]))
        assert "model_specs[0].model_format" in message and "'ggmlv3'" in message

    def test_bad_repo_id(self) -> None:
        message = _reject(_llm(model_specs=[_spec(model_id="not a repo")]))
        assert "model_specs[0].model_id" in message and "'not a repo'" in message

    @pytest.mark.parametrize("size", [0, -1, "big"])
    def test_bad_size(self, size: Any) -> None:
        assert "model_specs[0].model_size_in_billions" in _reject(
            _llm(model_specs=[_spec(model_size_in_billions=size)])
        )

    def test_no_specs(self) -> None:
        assert "model_specs" in _reject(_llm(model_specs=[]))

    def test_embedding_without_a_source(self) -> None:
        model = {k: v for k, v in XINFERENCE_EMBEDDING.items() if k not in ("model_id", "model_uri")}
        message = _reject(model, "embedding")
        assert "model_id" in message and "model_uri" in message


class TestUnknownKeys:
    def test_unknown_top_level_key_is_named(self) -> None:
        message = _reject(_llm(context_lenght=4096))
        assert "context_lenght: unknown field" in message

    def test_unknown_spec_key_is_named_with_its_path(self) -> None:
        message = _reject(_llm(model_specs=[_spec(model_file_name_split_template="x.bin")]))
        assert "model_specs[0].model_file_name_split_template: unknown field" in message

    def test_unknown_prompt_style_key(self) -> None:
        model = copy.deepcopy(XINFERENCE_CHAT)
        model["prompt_style"]["stile_name"] = "x"  # type: ignore[index]
        assert "prompt_style.stile_name: unknown field" in _reject(model)

    def test_every_problem_is_reported(self) -> None:
        message = _reject(_llm(model_name="a b", extra_one=1))
        assert "model_name:" in message and "extra_one: unknown field" in message


class TestInputShape:
    def test_malformed_json_string(self) -> None:
        message = _reject('{"model_name": ')
        assert message.startswith("model: malformed JSON")

    @pytest.mark.parametrize("model", ["[1, 2]", "3", '"text"'])
    def test_json_that_is_not_an_object(self, model: str) -> None:
        assert "model: expected a JSON object" in _reject(model)

    def test_unknown_model_type(self) -> None:
        message = _reject(NSQL, "rerank")
        assert "model_type 'rerank'" in message and "LLM, embedding" in message


class TestSpecFor:
    def _definition(self) -> LLMDefinition:
        model = _llm(
            model_specs=[
                _spec(model_size_in_billions=2, quantizations=["none"], model_id="Org/Two"),
                _spec(model_size_in_billions=7, quantizations=["8-bit", "4-bit"], model_id="Org/Seven"),
            ]
        )
        definition = parse_definition("LLM", model)
        assert isinstance(definition, LLMDefinition)
        return definition

    def test_first_spec_and_its_first_quantization_by_default(self) -> None:
        spec, quantization = self._definition().spec_for()
        assert (spec.model_id, quantization) == ("Org/Two", "none")

    def test_by_size_and_by_quantization(self) -> None:
        definition = self._definition()
        assert definition.spec_for(model_size_in_billions=7)[0].model_id == "Org/Seven"
        assert definition.spec_for(model_size_in_billions=7)[1] == "8-bit"
        spec, quantization = definition.spec_for(quantization="4-bit")
        assert (spec.model_id, quantization) == ("Org/Seven", "4-bit")

    def test_no_match_names_the_options_and_the_specs(self) -> None:
        with pytest.raises(BadRequest) as info:
            self._definition().spec_for(model_size_in_billions=2, quantization="4-bit")
        message = info.value.message
        assert "model_size_in_billions=2" in message and "quantization='4-bit'" in message
        assert "pytorch/2B/none" in message and "pytorch/7B/8-bit|4-bit" in message


def test_spec_model_is_strict() -> None:
    with pytest.raises(ValueError, match="model_id"):
        ModelSpec(model_size_in_billions=1)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"prompt": 5}, "prompt: must be a valid string (got 5)"),
        ({"prompt": ["a"]}, "prompt: must be a valid string (got a list)"),
        ({"prompt": "x", "generate_config": {"max_tokens": "lots"}}, "generate_config.max_tokens: "),
        ({"prompt": "x", "generate_config": {"top_p": 2}}, "generate_config.top_p: must be less than"),
        ({"prompt": "x", "generate_config": {"seed": {}}}, "generate_config.seed: must be a valid integer"),
    ],
)
def test_validation_errors_name_the_field_and_the_value(body: dict[str, Any], expected: str) -> None:
    from pydantic import ValidationError

    from broker_client import GenerateRequest, format_validation_error

    with pytest.raises(ValidationError) as info:
        GenerateRequest.model_validate(body)
    message = format_validation_error(info.value)
    assert message.startswith(expected), message
    assert "(got " in message, message


# Xinference's custom GGUF spec (its llama.cpp engine's schema).
GGUF_SPEC = {
    "model_format": "ggufv2",
    "model_size_in_billions": "0_135",
    "quantizations": ["Q4_K_M", "Q8_0", "F16", "q4_1"],
    "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF",
    "model_file_name_template": "smollm2-135m-instruct.{quantization}.gguf",
}


class TestGGUF:
    def test_xinferences_ggufv2_spec_is_accepted(self) -> None:
        definition = parse_definition("LLM", _llm(model_specs=[GGUF_SPEC]))
        assert isinstance(definition, LLMDefinition)
        spec, quantization = definition.spec_for(quantization="Q8_0")
        assert spec.model_format == "ggufv2" and quantization == "Q8_0"
        assert spec.model_file_name_template == "smollm2-135m-instruct.{quantization}.gguf"
        assert definition.spec_for()[1] == "Q4_K_M"

    def test_a_uri_naming_one_gguf_file_needs_no_template(self) -> None:
        spec = {**GGUF_SPEC, "model_uri": "/models/smollm2.Q4_K_M.gguf", "model_file_name_template": None}
        parse_definition("LLM", _llm(model_specs=[spec]))
        message = _reject(_llm(model_specs=[{**spec, "model_uri": "/models/smollm2"}]))
        assert "model_specs[0]" in message and "needs model_file_name_template" in message

    @pytest.mark.parametrize(
        ("change", "expected"),
        [
            (
                {"quantizations": ["Q4_K_M", "8-bit"]},
                "quantizations[1] '8-bit' is a bitsandbytes quantization",
            ),
            (
                {"quantizations": ["Q4 K M"]},
                "model_specs[0].quantizations[0]: 'Q4 K M' is not a quantization",
            ),
            ({"quantizations": ["Q" * 17]}, "model_specs[0].quantizations[0]"),
            ({"model_file_name_template": "../m.{quantization}.gguf"}, "must be a file name"),
            ({"model_file_name_template": "dir/m.{quantization}.gguf"}, "must be a file name"),
            ({"model_file_name_template": "m.{quant}.gguf"}, "may hold only the placeholder {quantization}"),
            ({"model_file_name_template": "m.{quantization.gguf"}, "is not a valid template"),
            ({"model_format": "gguf"}, "model_specs[0].model_format: 'gguf' is not allowed"),
        ],
    )
    def test_bad_gguf_values_name_the_field(self, change: dict[str, Any], expected: str) -> None:
        message = _reject(_llm(model_specs=[{**GGUF_SPEC, **change}]))
        assert expected in message, message

    def test_a_pytorch_spec_takes_no_gguf_quantization_or_template(self) -> None:
        message = _reject(_llm(model_specs=[_spec(quantizations=["none", "Q4_K_M"])]))
        assert "quantizations[1] 'Q4_K_M' is a GGUF quantization" in message
        message = _reject(_llm(model_specs=[_spec(model_file_name_template="m.{quantization}.gguf")]))
        assert "model_file_name_template is for model_format 'ggufv2' only" in message
