"""OpenAI's request dialect as pydantic models, and their translation to SamplingParams.

Unknown fields are ignored (clients send many); known fields are type-checked strictly, so a
wrong type is a 400, not a silent coercion; OpenAI fields this server does not implement
(`_UNSUPPORTED`) are a 400 naming them when set.
"""

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from shoal.errors import BadRequest
from shoal.inference.request import SamplingParams
from shoal.inference.sampling import GREEDY_BELOW, MAX_TOP_LOGPROBS
from shoal.inference.scheduler import MAX_SEED
from shoal.net.frames import MAX_LOGIT_BIAS


def _whole_characters(text: str) -> str:
    """JSON may escape a lone UTF-16 surrogate ("\\ud800"); no tokenizer can encode one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"contains a lone surrogate (U+{ord(text[exc.start]):04X}) at character {exc.start}"
        ) from None
    return text


Text = Annotated[str, AfterValidator(_whole_characters)]  # every string a request carries


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


class TextPart(_Request):
    type: Literal["text"]
    text: Text


# --- tools and structured output -----------------------------------------------------------

FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]  # OpenAI's rule


class FunctionDefinition(_Request):
    name: FunctionName
    description: Text | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none means no arguments
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: FunctionName


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(_Request):
    name: Text
    arguments: Text  # a JSON object, as a string


class ToolCall(_Request):
    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class JsonSchemaFormat(_Request):
    name: FunctionName
    description: Text | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class TextFormat(_Request):
    type: Literal["text"]


class JsonObjectFormat(_Request):
    type: Literal["json_object"]


class JsonSchemaResponseFormat(_Request):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaResponseFormat, Field(discriminator="type")
]


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = None  # assistant turns that called tools
    tool_call_id: Text | None = None  # a tool turn: which call it answers

    @model_validator(mode="after")
    def _tool_fields_fit_the_role(self) -> "ChatMessage":
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs tool_call_id")
        return self

    def text(self) -> str:
        """The message content as one string (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    """Fields both endpoints share."""

    model: Text = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)  # not OpenAI's, but every local server has it
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: Text | list[Text] | None = None
    n: int = Field(default=1, ge=1, le=128)  # OpenAI's cap; the scheduler caps it at its batch
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)  # vLLM's and llama.cpp's
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)  # vLLM's and llama.cpp's
    logit_bias: dict[str, float] | None = None  # token id (a string) → -100..100

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        # a field this server does not implement is a 400 naming it, never silently ignored
        if isinstance(data, dict):
            for name, default in _UNSUPPORTED.items():
                if name in data and data[name] not in default:
                    raise BadRequest(f"{name} is not supported by this server", param=name)
        return data

    @field_validator("logit_bias")
    @classmethod
    def _bias_ids(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys are token ids, got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"token {key}: a bias must be between -100 and 100")
        if v is not None and len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries")
        return v

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, v: Text | list[Text] | None) -> Text | list[Text] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def sampling(self, max_tokens: int | None) -> SamplingParams:
        """The internal sampling parameters (OpenAI's default temperature is 1)."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        temperature = 1.0 if self.temperature is None else self.temperature
        return SamplingParams(
            temperature=0.0 if temperature < GREEDY_BELOW else temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            max_tokens=max_tokens,
            stop=tuple(s for s in stop if s),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            min_p=self.min_p or 0.0,
            logit_bias=tuple((int(k), float(b)) for k, b in (self.logit_bias or {}).items()),
            logprobs=self.top_logprob_count,
        )

    @property
    def top_logprob_count(self) -> int | None:
        """None: no logprobs; k: the chosen token's and the top k alternatives'."""
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @property
    def top_logprob_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("tools")
    @classmethod
    def _distinct_names(cls, v: list[Tool] | None) -> list[Tool] | None:
        names = [t.function.name for t in v or ()]
        if len(set(names)) != len(names):
            raise ValueError("tool names must be distinct")
        return v

    @model_validator(mode="after")
    def _choice_names_a_tool(self) -> "ChatCompletionRequest":
        # a BadRequest, not a ValueError: the error names tool_choice, not the whole body
        names = {t.function.name for t in self.tools or ()}
        choice = self.tool_choice
        if choice == "required" and not names:
            raise BadRequest('tool_choice "required" needs tools', param="tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise BadRequest(
                f"tool_choice names {choice.function.name!r}, which is not in tools",
                param="tool_choice",
            )
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: Text | list[Text] | list[int]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)  # OpenAI's legacy cap
    best_of: int | None = Field(default=None, ge=1)

    @property
    def top_logprob_count(self) -> int | None:
        if self.logprobs is not None and self.echo:
            raise BadRequest("logprobs of the echoed prompt are not supported", param="echo")
        if self.best_of is not None and self.best_of != self.n:
            raise BadRequest("best_of other than n is not supported", param="best_of")
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: Text | list[Text] | list[int]) -> Text | list[Text] | list[int]:
        if isinstance(v, list) and v and isinstance(v[0], str) and len(v) != 1:
            raise ValueError("only one prompt per request is supported")
        if not v or v == [""]:
            raise ValueError("prompt is empty")
        return v

    @field_validator("max_tokens")
    @classmethod
    def _null_is_default(cls, v: int | None) -> int:
        return 16 if v is None else v  # an explicit null is OpenAI's default too


# OpenAI fields this server does not implement, with the values that mean "not used"
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
    "functions": (None,),  # the deprecated form of tools
    "function_call": (None, "none"),
    "suffix": (None, ""),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "store": (None, False),
}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; cached_tokens: prompt tokens the prefix cache held (counted in
    prompt_tokens too, as OpenAI counts them)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
