"""Anthropic's Messages API over the same GenerationRequest: POST /v1/messages (a system prompt,
messages of text, tool_use and tool_result blocks, a final assistant message continued as a
prefill, `tools` and `tool_choice` through api/dialect_tools.py; streamed as message_start,
content_block_start/delta/stop, message_delta, message_stop) and POST
/v1/messages/count_tokens.

Keys come as `x-api-key` (api/auth.py takes it as it takes a bearer token); `anthropic-version`
is checked when sent. Errors are Anthropic's `{"type": "error", "error": {"type", "message"}}`
(api/errors.py, by path). A field or block shoal cannot honour is a 400 naming it.
"""

import json
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from shoal.api import dialect_tools
from shoal.api.chat_tools import ChatPlan
from shoal.api.dialect_tools import Call
from shoal.api.errors import error_body, status_of
from shoal.api.generation import collect, events, off_loop, sampling_params, start
from shoal.api.openai_types import Text
from shoal.api.sse import named_sse_stream
from shoal.errors import BadRequest, ShoalError
from shoal.inference.request import Finished, GenerationRequest, TextDelta
from shoal.inference.scheduler import RequestStream
from shoal.inference.service import ChatTokenizer, InferenceService, ModelHandle

router = APIRouter()

# anthropic-version is a date; the Messages API's first is 2023-01-01, and every one since reads
# the same shape of request (each SDK release sends its own)
FIRST_VERSION = "2023-01-01"
VERSION = re.compile(r"\d{4}-\d{2}-\d{2}")
UNSUPPORTED = ("mcp_servers", "container")  # a 400 each when given


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Block(BaseModel):
    """A content block: text, tool_use (an assistant's call) or tool_result (its answer, in a
    user turn); cache_control and citations are hints, left out."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    type: str
    text: Text | None = None
    id: Text | None = None  # tool_use
    name: Text | None = None
    input: dict[str, Any] | None = None
    tool_use_id: Text | None = None  # tool_result
    content: "Text | list[Block] | None" = None
    is_error: bool | None = None


class Message(_Body):
    role: Literal["user", "assistant"]
    content: Text | list[Block]


class ToolDef(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, frozen=True)  # cache_control, …

    name: Text
    description: Text | None = None
    input_schema: dict[str, Any] | None = None
    type: Text | None = None  # "custom"; a server tool (web_search_…) names its own


class ToolChoice(_Body):
    type: Literal["auto", "any", "tool", "none"]
    name: Text | None = None
    disable_parallel_tool_use: bool | None = None


def _text(content: str | list[Block] | None, param: str) -> str:
    """The text of blocks that must all be text; another kind is a 400 naming it."""
    if content is None or isinstance(content, str):
        return content or ""
    for i, block in enumerate(content):
        if block.type != "text" or block.text is None:
            why = f"content blocks of type {block.type!r} are not supported here"
            raise BadRequest(f"{param}.{i}: {why}", param=f"{param}.{i}.type")
    return "".join(block.text or "" for block in content)


def _turns(m: "Message", param: str) -> list[dict[str, Any]]:
    """One Anthropic message as OpenAI-shaped ones: an assistant turn's tool_use blocks become
    its tool_calls, a user turn's tool_result blocks tool turns before its text."""
    if isinstance(m.content, str):
        return [{"role": m.role, "content": m.content}]
    texts, calls, results = [], [], []
    for i, block in enumerate(m.content):
        where = f"{param}.{i}"
        if block.type == "text" and block.text is not None:
            texts.append(block.text)
        elif block.type == "tool_use" and m.role == "assistant" and block.id and block.name:
            arguments = json.dumps(block.input or {}, ensure_ascii=False)
            function = {"name": block.name, "arguments": arguments}
            calls.append({"id": block.id, "type": "function", "function": function})
        elif block.type == "tool_result" and m.role == "user" and block.tool_use_id:
            result = _text(block.content, f"{where}.content")
            result = f"Error: {result}" if block.is_error else result
            results.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": result})
        else:
            why = f"content blocks of type {block.type!r} are not supported in {m.role} turns"
            raise BadRequest(f"{where}: {why}", param=f"{where}.type")
    text = "".join(texts)
    if m.role == "assistant":
        return [{"role": "assistant", "content": text} | ({"tool_calls": calls} if calls else {})]
    return results + ([{"role": "user", "content": text}] if text or not results else [])


class CountBody(_Body):
    """What /v1/messages/count_tokens reads: the prompt."""

    model: Text = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    system: Text | list[Block] | None = None
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoice | None = None
    thinking: dict[str, Any] | None = None
    mcp_servers: list[Any] | None = None
    container: Any = None

    def chat(self) -> tuple[list[dict[str, Any]], str]:
        """OpenAI-shaped messages for the chat template, and the text of a final assistant
        message with no calls, which the answer continues (Anthropic's prefill)."""
        for name in UNSUPPORTED:
            if getattr(self, name):
                raise BadRequest(f"{name} is not supported", param=name)
        if self.thinking and self.thinking.get("type") != "disabled":
            raise BadRequest("thinking is not supported", param="thinking")
        messages = [t for i, m in enumerate(self.messages) for t in _turns(m, f"messages.{i}")]
        if self.system:
            messages.insert(0, {"role": "system", "content": _text(self.system, "system")})
        prefill = ""
        if messages[-1]["role"] == "assistant" and "tool_calls" not in messages[-1]:
            prefill = messages.pop()["content"]
        return messages, prefill

    def openai_tools(self) -> tuple[list[dict[str, Any]], str | dict[str, Any], bool]:
        """`tools`, `tool_choice` and `parallel_tool_calls` in OpenAI's shapes."""
        tools = []
        for i, tool in enumerate(self.tools or ()):
            if tool.type not in (None, "custom"):
                why = f"tools.{i}: server tools ({tool.type}) are not supported"
                raise BadRequest(why, param=f"tools.{i}.type")
            function = {"name": tool.name, "parameters": tool.input_schema or {"type": "object"}}
            if tool.description:
                function["description"] = tool.description
            tools.append({"type": "function", "function": function})
        c = self.tool_choice or ToolChoice(type="auto")
        if c.type == "tool" and not c.name:
            raise BadRequest("tool_choice of type tool needs a name", param="tool_choice.name")
        choice: str | dict[str, Any] = {"auto": "auto", "any": "required", "none": "none"}.get(
            c.type, {"type": "function", "function": {"name": c.name}}
        )
        return tools, choice, not c.disable_parallel_tool_use


class MessagesBody(CountBody):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[Text] | None = None
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    output_config: dict[str, Any] | None = None  # effort: accepted, no effect; format: JSON
    # accepted, no effect: caching, routing and accounting hints for Anthropic's service
    cache_control: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    service_tier: Literal["auto", "standard_only"] | None = None
    speed: Literal["standard", "fast"] | None = None
    inference_geo: Text | None = None
    diagnostics: dict[str, Any] | None = None
    user_profile_id: Text | None = None
    workspace_id: Text | None = None

    def response_format(self) -> dict[str, Any] | None:
        """`output_config.format` ({"type": "json_schema", "schema"}) as chat completions'
        response_format."""
        fmt = (self.output_config or {}).get("format")
        if not fmt:
            return None
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
            why = 'output_config.format: only {"type": "json_schema", "schema": ...}'
            raise BadRequest(why, param="output_config.format")
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            why = "output_config.format: the schema must be an object"
            raise BadRequest(why, param="output_config.format.schema")
        return dialect_tools.json_format(schema, "output")

    @property
    def stops(self) -> tuple[str, ...]:
        return tuple(s for s in self.stop_sequences or () if s)


def _check_version(version: str | None) -> None:
    if version is not None and (not VERSION.fullmatch(version) or version < FIRST_VERSION):
        why = f"anthropic-version: {version!r} is not a version (a date from {FIRST_VERSION})"
        raise BadRequest(why, param="anthropic-version")


async def _prompt(handle: ModelHandle, body: CountBody) -> tuple[ChatPlan, list[int]]:
    """How to read the answer (api/chat_tools.py's plan: tools, their grammar, the family's
    call format), and the prompt, a prefill's tokens last."""
    messages, prefill = body.chat()
    tools, choice, parallel = body.openai_tools()
    fmt = body.response_format() if isinstance(body, MessagesBody) else None
    chat, prompt = await dialect_tools.plan(handle, messages, tools, choice, parallel, fmt)
    if prefill:
        prompt += await off_loop(handle.tokenizer.encode, prefill)
    return chat, prompt


def _blocks(content: str | None, calls: list[Call]) -> list[dict[str, Any]]:
    blocks = [{"type": "text", "text": content}] if content or not calls else []
    return blocks + [_tool_use(c) | {"input": _input(c)} for c in calls]


def _tool_use(call: Call) -> dict[str, Any]:
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}


def _input(call: Call) -> Any:
    try:
        return json.loads(call.arguments)
    except json.JSONDecodeError:  # the grammar keeps this from happening where it runs
        return {}


def _stop(
    done: Finished, text: str, ids: Sequence[int], stops: tuple[str, ...], tok: ChatTokenizer
) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence for how the generation ended.

    Finished says "stop" for both an end-of-turn token and a stop string: the string is found
    in the decoded ids after the text emitted, or a stop held back tokens whose text never came.
    """
    if done.reason == "length":
        return "max_tokens", None
    if stops:
        full = tok.decode(ids)
        hit = next((s for s in stops if full.startswith(s, len(text))), None)
        if hit is None and len(ids) < done.completion_tokens and len(stops) == 1:
            hit = stops[0]  # the tokens held back were the one stop string's
        if hit is not None or len(ids) < done.completion_tokens:
            return "stop_sequence", hit
    return "end_turn", None


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, int]:
    """Anthropic counts tokens read from a cache apart from input_tokens (shoal's prefix cache
    is automatic: nothing is ever written on request, so cache_creation_input_tokens is 0)."""
    return {
        "input_tokens": prompt_tokens - cached_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached_tokens,
        "output_tokens": completion_tokens,
    }


def _message(req: GenerationRequest, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": req.request_id,
        "type": "message",
        "role": "assistant",
        "model": req.model_id,
        "content": content,
        "stop_reason": None,
        "stop_sequence": None,
    }


@router.post("/v1/messages", response_model=None)
async def messages(
    body: MessagesBody,
    request: Request,
    anthropic_version: str | None = Header(default=None),
) -> dict[str, Any] | StreamingResponse:
    _check_version(anthropic_version)
    service: InferenceService = request.app.state.service
    handle = await service.acquire(body.model)
    chat, prompt = await _prompt(handle, body)
    sampling = sampling_params(
        1.0 if body.temperature is None else body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        max_tokens=body.max_tokens,
        stop=body.stops or None,
    )
    req, stream = start(
        handle, prompt, sampling, "msg", param="messages", constraint=chat.constraint
    )
    if body.stream:
        frames = named_sse_stream(_events(handle, chat, req, stream, body.stops), _failed)
        return StreamingResponse(frames, media_type="text/event-stream")
    ids: list[int] = []
    text, done = await collect(stream, request, ids)
    content, calls = dialect_tools.split(handle, chat, text, ids, done.reason)
    reason, hit = (
        ("tool_use", None) if calls else _stop(done, text, ids, body.stops, handle.tokenizer)
    )
    return _message(req, _blocks(content, calls)) | {
        "stop_reason": reason,
        "stop_sequence": hit,
        "usage": _usage(done.prompt_tokens, done.completion_tokens, done.cached_tokens),
    }


def _failed(message: str) -> dict[str, Any]:
    return error_body(500, message, dialect="anthropic")


class _Blocks:
    """Content and calls in, Anthropic's block events out: a text block while text comes, a
    tool_use block per call (its input as one input_json_delta), each stopped before the next."""

    def __init__(self) -> None:
        self.index = -1  # the open block's, if any
        self.open: str | None = None  # its type

    def push(self, content: str, calls: list[Call]) -> list[dict[str, Any]]:
        out = []
        if content:
            if self.open != "text":
                out += self._start({"type": "text", "text": ""})
            delta = {"type": "text_delta", "text": content}
            out.append({"type": "content_block_delta", "index": self.index, "delta": delta})
        for call in calls:
            out += self._start(_tool_use(call))
            delta = {"type": "input_json_delta", "partial_json": call.arguments}
            out.append({"type": "content_block_delta", "index": self.index, "delta": delta})
        return out

    def close(self) -> list[dict[str, Any]]:
        """The last block's stop (an empty answer still has its one text block)."""
        out = self._start({"type": "text", "text": ""}) if self.index < 0 else []
        out += [{"type": "content_block_stop", "index": self.index}] if self.open else []
        self.open = None
        return out

    def _start(self, block: dict[str, Any]) -> list[dict[str, Any]]:
        out = self.close() if self.open else []
        self.index += 1
        self.open = block["type"]
        return out + [{"type": "content_block_start", "index": self.index, "content_block": block}]


async def _events(
    handle: ModelHandle,
    chat: ChatPlan,
    req: GenerationRequest,
    stream: RequestStream,
    stops: tuple[str, ...],
) -> AsyncIterator[dict[str, Any]]:
    """Anthropic's event order: message_start, the blocks, then the stop reason and usage."""
    start_usage = _usage(len(req.prompt_tokens), 0)
    yield {"type": "message_start", "message": _message(req, []) | {"usage": start_usage}}
    blocks, calls = _Blocks(), dialect_tools.Calls(handle, chat)
    parts: list[str] = []
    ids: list[int] = []
    try:
        async for event in events(stream):
            if isinstance(event, TextDelta):
                ids.extend(event.token_ids)
                parts.append(event.text)
                for out in blocks.push(*calls.push(event.text, event.token_ids)):
                    yield out
                continue
            for out in blocks.push(*calls.finish()) + blocks.close():
                yield out
            reason, hit = _stop(event, "".join(parts), ids, stops, handle.tokenizer)
            if calls.made:
                reason, hit = "tool_use", None
            yield {
                "type": "message_delta",
                "delta": {"stop_reason": reason, "stop_sequence": hit},
                "usage": _usage(event.prompt_tokens, event.completion_tokens, event.cached_tokens),
            }
            yield {"type": "message_stop"}
    except ShoalError as exc:  # mid-stream: the status is sent already, so say it in-band
        yield error_body(status_of(exc)[0], str(exc), dialect="anthropic")


@router.post("/v1/messages/count_tokens")
async def count_tokens(
    body: CountBody,
    request: Request,
    anthropic_version: str | None = Header(default=None),
) -> dict[str, int]:
    _check_version(anthropic_version)
    service: InferenceService = request.app.state.service
    handle = await service.acquire(body.model)
    _, prompt = await _prompt(handle, body)
    return {"input_tokens": len(prompt)}
