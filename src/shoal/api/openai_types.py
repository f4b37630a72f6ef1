"""OpenAI's request dialect as pydantic models, and their translation to SamplingParams.

Unknown fields are ignored (clients send many); known fields are type-checked strictly, so a
wrong type is a 400, not a silent coercion.
"""

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from shoal.errors import BadRequest
from shoal.inference.request import SamplingParams
from shoal.inference.sampling import GREEDY_BELOW
from shoal.inference.scheduler import MAX_SEED


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


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

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
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, v: Text | list[Text] | None) -> Text | list[Text] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def sampling(self, max_tokens: int | None) -> SamplingParams:
        """The internal sampling parameters (OpenAI's default temperature is 1)."""
        if self.n != 1:
            raise BadRequest("only n=1 is supported", param="n")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        temperature = 1.0 if self.temperature is None else self.temperature
        return SamplingParams(
            temperature=0.0 if temperature < GREEDY_BELOW else temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            max_tokens=max_tokens,
            stop=tuple(s for s in stop if s),
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: Text | list[Text] | list[int]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    echo: bool = False

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


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
