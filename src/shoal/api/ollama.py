"""Ollama's API over the same GenerationRequest: /api/chat (with `tools`, through
api/dialect_tools.py) and /api/generate, NDJSON-streamed unless `"stream": false`. The model
list, details and pulls are api/ollama_models.py's.

Errors are Ollama's `{"error": "message"}` (api/errors.py, by path). A field or option shoal
cannot honour is a 400 naming it; options that only tune Ollama's own runtime (num_ctx,
num_thread, …) are accepted and have no effect.
"""

import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shoal.api import dialect_tools
from shoal.api.chat_tools import ChatPlan
from shoal.api.dialect_tools import Call
from shoal.api.generation import (
    SAMPLING_FIELDS,
    collect,
    events,
    off_loop,
    sampling_params,
    start,
)
from shoal.api.openai_types import Text
from shoal.errors import BadRequest, ShoalError
from shoal.inference.request import Finished, SamplingParams
from shoal.inference.scheduler import MAX_SEED, RequestStream
from shoal.inference.service import InferenceService, ModelHandle

log = logging.getLogger(__name__)

router = APIRouter()

# Options that tune Ollama's runtime, not the output: accepted, without effect here.
RUNTIME_OPTIONS = frozenset(
    {
        "numa", "num_ctx", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv",
        "logits_all", "vocab_only", "use_mmap", "use_mlock", "embedding_only", "num_thread",
        "num_keep",
    }
)  # fmt: skip
# Options that change sampling: Ollama's name → SamplingParams' field, honoured once it exists.
SAMPLING_OPTIONS = {
    "repeat_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "min_p": "min_p",
}
# The value at which an option does nothing: accepted even where shoal lacks the feature.
NEUTRAL = {
    "repeat_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "min_p": 0.0,
    "mirostat": 0,
    "tfs_z": 1.0,
    "typical_p": 1.0,
}


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


_B = TypeVar("_B", bound=Body)


class Options(BaseModel):
    """Ollama's `options`; unknown keys are checked by name in `sampling`."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    seed: int | None = Field(default=None, ge=-1, le=MAX_SEED)  # -1: a random seed
    num_predict: int | None = Field(default=None, ge=-2)  # -1: no limit, -2: fill the context
    stop: list[Text] | None = None
    # the penalties count the prompt and every token so far: Ollama's repeat_last_n -1 (its
    # default window is the last 64 tokens)
    repeat_penalty: float | None = Field(default=None, gt=0.0)
    repeat_last_n: int | None = Field(default=None, ge=-1)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _predicts_something(self) -> "Options":
        if self.num_predict == 0:
            raise ValueError("num_predict must be positive, -1 (no limit) or -2 (fill context)")
        return self


class Message(Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: Text = ""
    images: list[str] | None = None
    tool_calls: list[Any] | None = None
    tool_name: Text | None = None
    thinking: Text | None = None  # an earlier turn's reasoning: templates leave it out anyway


class _Generate(Body):
    """The fields /api/chat and /api/generate share."""

    model: Text = Field(min_length=1)
    options: Options | None = None
    stream: bool = True  # Ollama streams unless told not to
    format: str | dict[str, Any] | None = None
    keep_alive: float | int | str | None = None  # shoal keeps instances until deleted
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def refuse_unsupported(self) -> None:
        """A 400 naming the first field asked for that shoal cannot honour yet."""
        self.response_format()
        if self.think not in (None, False):
            raise BadRequest("think is not supported", param="think")
        if self.logprobs or self.top_logprobs:
            raise BadRequest("logprobs are not supported yet", param="logprobs")

    def response_format(self) -> dict[str, Any] | None:
        """`format` ("json", or a JSON schema) as OpenAI's response_format."""
        if self.format in (None, ""):
            return None
        if isinstance(self.format, dict):
            return dialect_tools.json_format(self.format)
        if self.format != "json":
            raise BadRequest('format: give "json" or a JSON schema', param="format")
        return dialect_tools.json_format(None)

    def sampling(self) -> SamplingParams:
        """Ollama's options as SamplingParams (Ollama's default temperature is 0.8)."""
        o = self.options or Options()
        for name, value in (o.model_extra or {}).items():
            if name not in RUNTIME_OPTIONS and value is not None and NEUTRAL.get(name) != value:
                raise BadRequest(f"options.{name} is not supported", param=f"options.{name}")
        extra: dict[str, float] = {}
        for name, field in SAMPLING_OPTIONS.items():
            value = getattr(o, name)
            if value is None or value == NEUTRAL[name]:
                continue
            if field not in SAMPLING_FIELDS:
                raise BadRequest(f"options.{name} is not supported", param=f"options.{name}")
            extra[field] = value
        if "repetition_penalty" in extra and o.repeat_last_n not in (None, -1):
            why = "options.repeat_last_n: only -1 (every token) is supported"
            raise BadRequest(why, param="options.repeat_last_n")
        limit = o.num_predict if o.num_predict is not None and o.num_predict > 0 else None
        if o.num_predict == -2:
            limit = None  # until the context is full
        return sampling_params(
            0.8 if o.temperature is None else o.temperature,
            top_p=o.top_p,
            top_k=o.top_k,
            seed=None if o.seed == -1 else o.seed,
            max_tokens=limit,
            stop=tuple(s for s in o.stop or () if s) or None,
            **extra,
        )


class ChatBody(_Generate):
    messages: list[Message] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None

    def chat_messages(self) -> list[dict[str, Any]]:
        """OpenAI-shaped messages: an assistant's calls get ids, and each tool turn answers
        the earliest call not answered yet (Ollama's tool turns name the tool, not the call)."""
        out: list[dict[str, Any]] = []
        unanswered: list[str] = []
        for i, m in enumerate(self.messages):
            if m.images:
                raise BadRequest("images are not supported", param=f"messages.{i}.images")
            message: dict[str, Any] = {"role": m.role, "content": m.content}
            if m.tool_calls:
                calls = [_openai_call(c, f"call_{i}_{j}") for j, c in enumerate(m.tool_calls)]
                message["tool_calls"] = calls
                unanswered += [c["id"] for c in calls]
            if m.role == "tool":
                message["tool_call_id"] = unanswered.pop(0) if unanswered else f"call_{i}"
            out.append(message)
        return out


def _openai_call(call: Any, call_id: str) -> dict[str, Any]:
    """One of Ollama's `tool_calls` ({"function": {"name", "arguments": {...}}})."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise BadRequest("a tool call needs function.name", param="messages.tool_calls")
    arguments = json.dumps(function.get("arguments") or {}, ensure_ascii=False)
    name = function["name"]
    return {
        "id": call.get("id") or call_id,
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def _ollama_calls(calls: list[Call]) -> list[dict[str, Any]]:
    out = []
    for i, c in enumerate(calls):
        try:
            arguments = json.loads(c.arguments)
        except json.JSONDecodeError:  # the grammar keeps this from happening where it runs
            arguments = {}
        out.append({"id": c.id, "function": {"index": i, "name": c.name, "arguments": arguments}})
    return out


class GenerateBody(_Generate):
    prompt: Text = ""
    system: Text | None = None
    suffix: Text | None = None
    template: Text | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[str] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for name in ("suffix", "template", "context", "images"):
            if getattr(self, name):
                raise BadRequest(f"{name} is not supported", param=name)


# --- the answers -----------------------------------------------------------------------------


def _created_at() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _done(handle: ModelHandle, done: Finished, started_ns: int) -> dict[str, Any]:
    """The fields of the last line: why it ended, token counts and durations (ns)."""
    eval_ns = int(done.completion_tokens / done.decode_tok_s * 1e9) if done.decode_tok_s else 0
    return {
        "model": handle.card.id,
        "created_at": _created_at(),
        "done": True,
        "done_reason": done.reason,
        "total_duration": time.perf_counter_ns() - started_ns,
        "load_duration": 0,
        "prompt_eval_count": done.prompt_tokens,  # the whole prompt, cached part included
        "prompt_eval_cached_count": done.cached_tokens,  # of those, read from the prefix cache
        "prompt_eval_duration": int(done.ttft_s * 1e9),
        "eval_count": done.completion_tokens,
        "eval_duration": eval_ns,
    }


def _text(kind: str, text: str) -> dict[str, Any]:
    """Where a line carries its text: /api/chat's message, /api/generate's response."""
    return (
        {"message": {"role": "assistant", "content": text}}
        if kind == "chat"
        else {"response": text}
    )


async def _lines(
    handle: ModelHandle,
    stream: RequestStream,
    kind: str,
    started_ns: int,
    chat: ChatPlan | None,
) -> AsyncIterator[str]:
    """NDJSON: one object a line, `done: true` on the last; a failure is an `error` line."""
    calls = dialect_tools.Calls(handle, chat) if chat is not None else None

    def line(text: str, made: list[Call]) -> str:
        out: dict[str, Any] = {"model": handle.card.id, "created_at": _created_at()}
        out |= {"done": False} | _text(kind, text)
        if made:
            out["message"]["tool_calls"] = _ollama_calls(made)
        return json.dumps(out, ensure_ascii=False) + "\n"

    try:
        async for event in events(stream):
            if isinstance(event, Finished):
                content, made = calls.finish() if calls is not None else ("", [])
                if content or made:
                    yield line(content, made)
                last = _text(kind, "") | _done(handle, event, started_ns)
                yield json.dumps(last, ensure_ascii=False) + "\n"
                continue
            content, made = (
                calls.push(event.text, event.token_ids) if calls is not None else (event.text, [])
            )
            if content or made:
                yield line(content, made)
    except ShoalError as exc:  # the status is sent already: say it in-band, as Ollama does
        yield json.dumps({"error": str(exc)}) + "\n"
    except Exception as exc:
        log.exception("an Ollama stream failed")
        yield json.dumps({"error": f"internal error: {type(exc).__name__}: {exc}"}) + "\n"


async def read_body(request: Request, kind: type[_B]) -> _B:
    """The JSON body, whatever the content-type says: Ollama reads it so, and so some clients
    (litellm) send it with none; an invalid one is the usual 400."""
    try:
        return kind.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


def model_id(name: str) -> str:
    """Ollama's clients name a model `NAME:latest` when they give no tag."""
    return name.removesuffix(":latest")


async def _answer(
    body: _Generate,
    request: Request,
    kind: str,
    prompt: list[int],
    handle: ModelHandle,
    chat: ChatPlan | None = None,
) -> Any:
    started_ns = time.perf_counter_ns()
    sampling = body.sampling()
    param = "messages" if kind == "chat" else "prompt"
    constraint = chat.constraint if chat is not None else None
    _, stream = start(
        handle, prompt, sampling, f"ollama-{kind}", param=param, constraint=constraint
    )
    if body.stream:
        lines = _lines(handle, stream, kind, started_ns, chat)
        return StreamingResponse(lines, media_type="application/x-ndjson")
    ids: list[int] = []
    text, done = await collect(stream, request, ids)
    if chat is None:
        return _text(kind, text) | _done(handle, done, started_ns)
    content, calls = dialect_tools.split(handle, chat, text, ids, done.reason)
    answer = _text(kind, content or "")
    if calls:
        answer["message"]["tool_calls"] = _ollama_calls(calls)
    return answer | _done(handle, done, started_ns)


def _loaded(handle: ModelHandle, kind: str) -> dict[str, Any]:
    """Ollama's answer to an empty prompt: the model is loaded, nothing generated."""
    line = {"model": handle.card.id, "created_at": _created_at(), "done": True}
    return _text(kind, "") | line | {"done_reason": "load"}


@router.post("/api/chat", response_model=None)
async def chat(request: Request) -> Any:
    body = await read_body(request, ChatBody)
    body.refuse_unsupported()
    messages = body.chat_messages()
    service: InferenceService = request.app.state.service
    handle = await service.acquire(model_id(body.model))
    if not messages:
        return _loaded(handle, "chat")
    fmt = body.response_format()
    plan, prompt = await dialect_tools.plan(handle, messages, body.tools or [], "auto", None, fmt)
    return await _answer(body, request, "chat", prompt, handle, plan)


@router.post("/api/generate", response_model=None)
async def generate(request: Request) -> Any:
    body = await read_body(request, GenerateBody)
    body.refuse_unsupported()
    service: InferenceService = request.app.state.service
    handle = await service.acquire(model_id(body.model))
    if not body.prompt:
        return _loaded(handle, "generate")
    # Ollama renders the prompt (and system) with the model's chat template, unless raw
    system = [{"role": "system", "content": body.system}] if body.system else []
    user = [{"role": "user", "content": body.prompt}]
    fmt = body.response_format()
    plan, prompt = await dialect_tools.plan(handle, system + user, [], None, None, fmt)
    if body.raw:
        tokenizer = handle.tokenizer
        prompt = await off_loop(tokenizer.encode, body.prompt, add_special_tokens=True)
    return await _answer(body, request, "generate", prompt, handle, plan)
