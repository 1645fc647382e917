"""The custom model definition (Xinference's custom-model JSON) and its validation.

Shared by the client (to fail early) and the registry (the authority). Errors name the
field and the rule: ``model_specs[0]: give model_id (a Hugging Face repo id) or model_uri``.
Types are strict (``context_length: "2048"`` is refused, not read as a number), and the size of
a definition, its lists and its numbers are bounded (``_bounds.py``): the registry stores it and
serves it on every list and launch.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ._bounds import (
    INT64_MAX,
    MAX_CONTEXT_LENGTH,
    MAX_DEFINITION_BYTES,
    MAX_IDLE_TIMEOUT,
    MAX_LIST,
    MAX_REPLICAS,
    MAX_SPECS,
    MAX_STOP,
    MAX_STOP_CHARS,
    MAX_STOP_TOKEN_IDS,
    MAX_TEXT,
    MAX_TOKENS,
)
from ._errors import BadRequest, PayloadTooLarge
from ._subjects import NAME_PATTERN

__all__ = [
    "ABILITIES",
    "MODEL_TYPES",
    "QUANTIZATIONS",
    "EmbeddingDefinition",
    "LLMDefinition",
    "LaunchDefaults",
    "ModelDefinition",
    "ModelSpec",
    "PromptStyle",
    "definition_size",
    "format_validation_error",
    "parse_definition",
]

MODEL_TYPES = ("LLM", "embedding")
QUANTIZATIONS = ("none", "8-bit", "4-bit")
ABILITIES = {"LLM": ("generate", "chat"), "embedding": ("embed",)}

Quantization = Literal["none", "8-bit", "4-bit"]
ModelName = Annotated[str, Field(pattern=NAME_PATTERN)]
Text = Annotated[str, Field(max_length=MAX_TEXT)]
Texts = Annotated[list[Text], Field(max_length=MAX_LIST)]
StopStrings = Annotated[list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOP)]
TokenId = Annotated[int, Field(ge=0, le=INT64_MAX)]
StopTokenIds = Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)]


# Rule violations where the offending value helps the reader; type errors already say enough.
_SHOW_INPUT = frozenset(
    {
        "finite_number",
        "greater_than",
        "greater_than_equal",
        "less_than",
        "less_than_equal",
        "multiple_of",
        "string_too_long",
    }
)


def _shown(value: Any) -> str:
    """A value for an error message: scalars as they are (long strings cut), containers by kind."""
    if value is None or isinstance(value, int | float | bool):
        return repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:40] + "...")
    kind = type(value).__name__
    return f"a {kind}" if kind[0] not in "aeiou" else f"an {kind}"


# A message that starts with the field it is about: "tool_choice: ...", "generate_config.n: ...".
_FIELD_FIRST = re.compile(r"^[A-Za-z_][\w.\[\]]*: ")


def format_validation_error(exc: ValidationError, root: str = "") -> str:
    """One line per problem, each naming the field path: ``model_specs[0].quantizations[1]: ...``."""
    parts = []
    for err in exc.errors(include_url=False):
        path = root
        for loc in err["loc"]:
            if isinstance(loc, int):
                path += f"[{loc}]"
            else:
                path += f".{loc}" if path else str(loc)
        msg = err["msg"]
        if err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
            if _FIELD_FIRST.match(msg):
                # A check across fields names the one it is about itself ("tools: ...").
                parts.append(f"{path}.{msg}" if path else msg)
                continue
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "string_pattern_mismatch":
            msg = (
                f"{err.get('input')!r} is invalid: it must start with a letter or digit and "
                "hold only letters, digits, '_' and '-'"
            )
        elif err["type"] == "literal_error":
            msg = f"{err.get('input')!r} is not allowed: {msg.removeprefix('Input should be ')}"
        elif err["type"] in _SHOW_INPUT and isinstance(err.get("input"), int | float | str | bool):
            msg = f"{msg.replace('Input should be', 'must be')} (got {_shown(err['input'])})"
        elif err["type"].endswith(("_type", "_parsing")) and "input" in err:
            # A value of the wrong kind: say what came, e.g. "must be a valid string (got 5)".
            msg = f"{msg.replace('Input should be', 'must be')} (got {_shown(err['input'])})"
        parts.append(f"{path or '(body)'}: {msg}")
    return "; ".join(parts)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)


class ModelSpec(_Strict):
    model_format: Literal["pytorch"] = "pytorch"
    model_size_in_billions: float = Field(gt=0, le=1e5)
    quantizations: list[Quantization] = Field(default_factory=lambda: ["none"], min_length=1, max_length=3)  # type: ignore[arg-type]
    model_id: Annotated[str, Field(max_length=256)] | None = None
    model_uri: Text | None = None
    model_revision: Annotated[str, Field(max_length=256)] | None = None
    model_hub: Literal["huggingface"] = "huggingface"

    @field_validator("model_size_in_billions", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        # Xinference writes sizes such as "1_8" for 1.8.
        if isinstance(value, str):
            try:
                return float(value.replace("_", "."))
            except ValueError:
                raise ValueError(f"{value!r} is not a number of billions") from None
        return value

    @field_validator("model_id")
    @classmethod
    def _model_id(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or " " in value or value.count("/") > 1):
            raise ValueError(f"{value!r} is not a Hugging Face repo id (like 'Org/Name')")
        return value

    @model_validator(mode="after")
    def _source(self) -> ModelSpec:
        if not self.model_id and not self.model_uri:
            raise ValueError("give model_id (a Hugging Face repo id) or model_uri (a local path)")
        return self


class PromptStyle(_Strict):
    style_name: Text
    system_prompt: str = ""
    roles: Texts = Field(default_factory=lambda: ["user", "assistant"], min_length=2)
    intra_message_sep: str = ""
    inter_message_sep: str = ""
    stop: StopStrings | None = None
    stop_token_ids: StopTokenIds | None = None


class LaunchDefaults(_Strict):
    """The ``launch`` key of a definition: launch options a launch (and a start on demand) of
    the model takes when its request does not give them.

    ``min_replicas``: the replicas kept while the model is idle (0: it scales to zero and starts
    again on its next request); ``idle_timeout``: seconds a replica may go without a request
    before it is stopped, down to ``min_replicas``."""

    min_replicas: int | None = Field(default=None, ge=0, lt=MAX_REPLICAS)
    idle_timeout: float | None = Field(default=None, gt=0, le=MAX_IDLE_TIMEOUT, allow_inf_nan=False)


class _Definition(_Strict):
    version: Literal[1, 2] = 1
    model_name: ModelName
    model_description: Text | None = None
    # Fields Xinference writes that natserve keeps but does not interpret.
    model_family: Text | None = None
    model_hub: Text | None = None
    architectures: Texts | None = None
    trust_remote_code: bool = False
    # Launch options the model's launches take by default (on demand: min_replicas, idle_timeout).
    launch: LaunchDefaults | None = None

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> Any:
        # A literal compares by equality, even strict: true and 1.0 would pass for 1.
        if type(value) is not int:
            raise ValueError(f"must be the integer 1 or 2 (got {_shown(value)})")
        return value


class LLMDefinition(_Definition):
    context_length: int = Field(default=2048, gt=0, le=MAX_CONTEXT_LENGTH)
    model_lang: Texts = Field(default_factory=lambda: ["en"])
    model_ability: list[Literal["generate", "chat"]] = Field(min_length=1, max_length=2)
    model_specs: list[ModelSpec] = Field(min_length=1, max_length=MAX_SPECS)
    prompt_style: PromptStyle | None = None
    chat_template: str | None = None
    # How the model writes a tool call (workers/tools.py): "hermes" (<tool_call>{json}</tool_call>,
    # Hermes, Qwen), "llama3" (a bare {"name", "parameters"} object), "mistral"
    # ([TOOL_CALLS][...]); None: chosen by the model's family and chat template.
    tool_parser: Literal["hermes", "llama3", "mistral"] | None = None
    stop: StopStrings | None = None
    stop_token_ids: StopTokenIds | None = None

    def spec_for(
        self,
        model_format: str | None = None,
        model_size_in_billions: float | None = None,
        quantization: str | None = None,
    ) -> tuple[ModelSpec, str]:
        """The first spec matching the launch options, with the quantization to use."""
        for spec in self.model_specs:
            if model_format and spec.model_format != model_format:
                continue
            if model_size_in_billions is not None and spec.model_size_in_billions != float(
                model_size_in_billions
            ):
                continue
            if quantization and quantization not in spec.quantizations:
                continue
            return spec, quantization or spec.quantizations[0]
        raise BadRequest(
            f"model {self.model_name!r} has no spec with model_format={model_format!r}, "
            f"model_size_in_billions={model_size_in_billions!r}, quantization={quantization!r}; "
            "specs: "
            + ", ".join(
                f"{s.model_format}/{s.model_size_in_billions:g}B/{'|'.join(s.quantizations)}"
                for s in self.model_specs
            )
        )


class EmbeddingDefinition(_Definition):
    """An embedding model: Xinference's flat form (``model_id``/``model_uri`` at the top) or specs."""

    model_ability: list[Literal["embed"]] = Field(
        default_factory=lambda: ["embed"],  # type: ignore[arg-type]
        min_length=1,
        max_length=1,
    )
    dimensions: int | None = Field(default=None, gt=0, le=1 << 20)
    max_tokens: int | None = Field(default=None, gt=0, le=MAX_TOKENS)
    language: Texts = Field(default_factory=lambda: ["en"])
    model_lang: Texts | None = None
    model_id: Annotated[str, Field(max_length=256)] | None = None
    model_uri: Text | None = None
    model_revision: Annotated[str, Field(max_length=256)] | None = None
    model_specs: list[ModelSpec] | None = Field(default=None, max_length=MAX_SPECS)

    @model_validator(mode="after")
    def _flat_or_specs(self) -> EmbeddingDefinition:
        if not self.model_specs:
            if not self.model_id and not self.model_uri:
                raise ValueError(
                    "give model_id (a Hugging Face repo id) or model_uri (a local path), or model_specs"
                )
            self.model_specs = [
                ModelSpec(
                    model_size_in_billions=0.1,
                    model_id=self.model_id,
                    model_uri=self.model_uri,
                    model_revision=self.model_revision,
                )
            ]
        return self

    def spec_for(
        self,
        model_format: str | None = None,
        model_size_in_billions: float | None = None,
        quantization: str | None = None,
    ) -> tuple[ModelSpec, str]:
        assert self.model_specs
        return self.model_specs[0], quantization or "none"


ModelDefinition = LLMDefinition | EmbeddingDefinition


def definition_size(model: object) -> int:
    """The bytes a definition takes as JSON (a string: its UTF-8 length), to bound it before
    parsing; one that cannot be encoded counts as too large."""
    if isinstance(model, str):
        # At most 4 bytes a character: only a long string needs encoding to be measured.
        return len(model) if len(model) * 4 <= MAX_DEFINITION_BYTES else len(model.encode(errors="replace"))
    try:
        text = json.dumps(model, ensure_ascii=False, separators=(",", ":"), default=str)
        return len(text.encode(errors="replace"))
    except (ValueError, TypeError, RecursionError):
        return MAX_DEFINITION_BYTES + 1


def parse_definition(model_type: str, model: str | dict[str, Any]) -> ModelDefinition:
    """Validate a definition given as a JSON string or an object; BadRequest names the field."""
    if model_type not in MODEL_TYPES:
        raise BadRequest(f"model_type {model_type!r} is not one of {', '.join(MODEL_TYPES)}")
    size = definition_size(model)
    if size > MAX_DEFINITION_BYTES:
        raise PayloadTooLarge(
            f"model: the definition takes {size} bytes as JSON; at most {MAX_DEFINITION_BYTES}"
        )
    if isinstance(model, str):
        try:
            model = json.loads(model)
        except ValueError as exc:
            raise BadRequest(f"model: malformed JSON: {exc}") from exc
        except RecursionError:
            raise BadRequest("model: malformed JSON: nested too deeply") from None
    if not isinstance(model, dict):
        raise BadRequest(f"model: expected a JSON object, got {type(model).__name__}")
    ability = model.get("model_ability")
    if isinstance(ability, list):
        allowed = ABILITIES[model_type]
        unknown = [a for a in ability if a not in allowed]
        if unknown:
            raise BadRequest(
                f"model.model_ability: {', '.join(map(repr, unknown))} is not an ability of "
                f"model_type {model_type!r} (allowed: {', '.join(allowed)})"
            )
    cls: type[LLMDefinition] | type[EmbeddingDefinition] = (
        LLMDefinition if model_type == "LLM" else EmbeddingDefinition
    )
    try:
        return cls.model_validate(model)
    except ValidationError as exc:
        raise BadRequest(f"invalid model definition: {format_validation_error(exc)}") from exc
