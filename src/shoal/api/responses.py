"""OpenAI's Responses API over the same GenerationRequest: POST /v1/responses with `input` as a
string or items (messages, function_call, function_call_output), `instructions`, function
`tools` (api/dialect_tools.py), text and function_call output; streamed as named events
(response.created, response.in_progress, response.output_item.added,
response.content_part.added, response.output_text.delta, …,
response.function_call_arguments.delta/done, … response.completed).

`text.format` json_object and json_schema constrain the answer as chat completions'
response_format does. Nothing is stored (`store` is accepted, the answer says `"store":
false`), so `previous_response_id` is refused; so are other tool types and other fields shoal
cannot honour yet: a 400 naming the field, in OpenAI's error shape.
"""

from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from shoal.api import dialect_tools
from shoal.api.chat_tools import ChatPlan
from shoal.api.dialect_tools import Call
from shoal.api.errors import status_of
from shoal.api.generation import (
    collect,
    events,
    new_request_id,
    now,
    sampling_params,
    start,
)
from shoal.api.openai_types import Text
from shoal.api.sse import named_sse_stream
from shoal.errors import BadRequest, ShoalError
from shoal.inference.request import Finished, GenerationRequest
from shoal.inference.scheduler import MAX_SEED, RequestStream
from shoal.inference.service import InferenceService, ModelHandle

router = APIRouter()

Role = Literal["user", "assistant", "system", "developer"]
TEXT_PARTS = frozenset({"input_text", "output_text", "text"})


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Part(BaseModel):
    """A content part; text parts are read (an earlier answer's annotations are ignored)."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    type: str
    text: Text | None = None


class Item(BaseModel):
    """An input item: a message (an earlier output message keeps its id and status), a
    function_call the model made, or the function_call_output that answers it."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    type: str = "message"
    role: Role | None = None
    content: Text | list[Part] | None = None
    call_id: Text | None = None  # function_call, function_call_output
    name: Text | None = None
    arguments: Text | None = None
    output: Text | list[Part] | None = None


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    type: str
    name: Text | None = None
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class TextFormat(_Body):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: Text | None = None  # json_schema's
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: Text | None = None
    strict: bool | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    format: TextFormat | None = None
    verbosity: str | None = None


class ResponsesBody(_Body):
    model: Text = Field(min_length=1)
    input: Text | list[Item]
    instructions: Text | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)  # not OpenAI's, as in chat completions
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stream: bool = False
    store: bool | None = None
    text: TextConfig | None = None
    truncation: Literal["disabled"] | None = None
    parallel_tool_calls: bool | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    service_tier: Literal["auto", "default"] | None = None
    tools: list[FunctionTool] | None = None
    # not yet: each refused by name when given
    previous_response_id: Text | None = None
    conversation: Any = None
    prompt: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    include: list[Text] | None = None
    top_logprobs: int | None = None
    background: bool | None = None
    stream_options: dict[str, Any] | None = None
    # accepted, no effect: a cap on tool calls with no tools, identifiers for OpenAI's own use
    max_tool_calls: int | None = None
    metadata: dict[str, Text] | None = None
    user: Text | None = None
    safety_identifier: Text | None = None
    prompt_cache_key: Text | None = None

    def refuse_unsupported(self) -> None:
        unsupported = ("previous_response_id", "conversation", "prompt", "include")
        for name in (*unsupported, "top_logprobs", "background"):
            if getattr(self, name):
                raise BadRequest(f"{name} is not supported yet", param=name)
        if self.reasoning and self.reasoning.get("effort") not in (None, "none", "minimal"):
            raise BadRequest("reasoning is not supported", param="reasoning")

    def response_format(self) -> dict[str, Any] | None:
        """`text.format` as chat completions' response_format (None: free text)."""
        fmt = self.text.format if self.text is not None else None
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_schema" and fmt.schema_ is None:
            raise BadRequest("text.format: json_schema needs a schema", param="text.format.schema")
        return dialect_tools.json_format(fmt.schema_, fmt.name or "answer")

    def chat(self) -> list[dict[str, Any]]:
        """OpenAI-shaped messages ("developer" is a system message; consecutive function_call
        items are one assistant turn's tool_calls)."""
        items = [Item(role="user", content=self.input)] if isinstance(self.input, str) else []
        messages: list[dict[str, Any]] = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        for i, item in enumerate(items or self.input):
            assert isinstance(item, Item)
            if item.type == "message" and item.role is not None:
                role = "system" if item.role == "developer" else item.role
                content = _text(item.content, f"input.{i}.content")
                messages.append({"role": role, "content": content})
            elif item.type == "function_call" and item.call_id and item.name:
                function = {"name": item.name, "arguments": item.arguments or "{}"}
                call = {"id": item.call_id, "type": "function", "function": function}
                last = messages[-1] if messages else {}
                if last.get("role") == "assistant" and "tool_calls" in last:
                    last["tool_calls"].append(call)
                else:
                    messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
            elif item.type == "function_call_output" and item.call_id:
                output = _text(item.output, f"input.{i}.output")
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
            else:
                why = f"input items of type {item.type!r} are not supported"
                raise BadRequest(f"input.{i}: {why}", param=f"input.{i}.type")
        return messages

    def openai_tools(self) -> tuple[list[dict[str, Any]], str | dict[str, Any]]:
        """`tools` and `tool_choice` in chat completions' shapes."""
        tools = []
        for i, tool in enumerate(self.tools or ()):
            if tool.type != "function" or not tool.name:
                why = f"tools.{i}: tools of type {tool.type!r} are not supported"
                raise BadRequest(why, param=f"tools.{i}.type")
            function = {"name": tool.name, "parameters": tool.parameters or {"type": "object"}}
            if tool.description:
                function["description"] = tool.description
            tools.append({"type": "function", "function": function})
        choice = self.tool_choice or "auto"
        if isinstance(choice, dict):
            if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
                raise BadRequest("tool_choice: name a function", param="tool_choice")
            choice = {"type": "function", "function": {"name": choice["name"]}}
        return tools, choice


def _text(content: str | list[Part] | None, param: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    for i, part in enumerate(content):
        if part.type not in TEXT_PARTS or part.text is None:
            why = f"content parts of type {part.type!r} are not supported"
            raise BadRequest(f"{param}.{i}: {why}", param=f"{param}.{i}.type")
    return "".join(part.text or "" for part in content)


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": cached_tokens},
        "output_tokens": completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _message(item_id: str, text: str | None) -> dict[str, Any]:
    """The output message; None: still in progress, with no content yet."""
    content = [] if text is None else [_part(text)]
    status = "in_progress" if text is None else "completed"
    return {"type": "message", "id": item_id, "status": status, "role": "assistant"} | {
        "content": content
    }


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _function_call(call: Call, arguments: str | None) -> dict[str, Any]:
    """A call as an output item; arguments None: still in progress."""
    status = "in_progress" if arguments is None else "completed"
    return {
        "type": "function_call",
        "id": f"fc_{call.id.removeprefix('call_')}",
        "call_id": call.id,
        "name": call.name,
        "arguments": arguments or "",
        "status": status,
    }


def _output(item_id: str, content: str | None, calls: list[Call]) -> list[dict[str, Any]]:
    message = [_message(item_id, content)] if content or not calls else []
    return message + [_function_call(c, c.arguments) for c in calls]


class _Answer:
    """The response object as it stands: in progress, then completed or incomplete."""

    def __init__(self, body: ResponsesBody, req: GenerationRequest, tools: list[Any]) -> None:
        self.body, self.req, self.tools = body, req, tools
        text = body.text.format if body.text is not None else None
        self.format = (
            {"type": "text"} if text is None else text.model_dump(exclude_none=True, by_alias=True)
        )
        self.item_id = str(new_request_id("msg"))
        self.created = now()

    def json(self, done: Finished | None = None, output: list[Any] | None = None) -> dict[str, Any]:
        body = self.body
        status = "in_progress"
        incomplete = None
        if done is not None:
            status = "incomplete" if done.reason == "length" else "completed"
            if done.reason == "length":
                incomplete = {"reason": "max_output_tokens"}
        return {
            "id": self.req.request_id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.req.model_id,
            "output": output or [],
            "error": None,
            "incomplete_details": incomplete,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "tool_choice": body.tool_choice or "auto",
            "tools": self.tools,
            "text": {"format": self.format},
            "truncation": "disabled",
            "store": False,
            "metadata": body.metadata or {},
            "usage": None
            if done is None
            else _usage(done.prompt_tokens, done.completion_tokens, done.cached_tokens),
        }


@router.post("/v1/responses", response_model=None)
async def create_response(
    body: ResponsesBody, request: Request
) -> dict[str, Any] | StreamingResponse:
    body.refuse_unsupported()
    messages = body.chat()
    tools, choice = body.openai_tools()
    service: InferenceService = request.app.state.service
    handle = await service.acquire(body.model)
    parallel = body.parallel_tool_calls
    fmt = body.response_format()
    chat, prompt = await dialect_tools.plan(handle, messages, tools, choice, parallel, fmt)
    sampling = sampling_params(
        1.0 if body.temperature is None else body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        max_tokens=body.max_output_tokens,
    )
    constraint = chat.constraint
    req, stream = start(handle, prompt, sampling, "resp", param="input", constraint=constraint)
    answer = _Answer(body, req, [t.model_dump(exclude_none=True) for t in body.tools or ()])
    if body.stream:
        frames = named_sse_stream(_numbered(_events(handle, chat, answer, stream)), _failed)
        return StreamingResponse(frames, media_type="text/event-stream")
    ids: list[int] = []
    text, done = await collect(stream, request, ids)
    content, calls = dialect_tools.split(handle, chat, text, ids, done.reason)
    return answer.json(done, _output(answer.item_id, content, calls))


def _failed(message: str) -> dict[str, Any]:
    return {"type": "error", "code": "internal_error", "message": message, "param": None}


async def _numbered(objects: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """Each event with its sequence_number."""
    number = 0
    async for obj in objects:
        yield obj | {"sequence_number": number}
        number += 1


class _Items:
    """Content and calls in, the output items' events out: one message item while text comes
    (its one output_text part), then a function_call item per call."""

    def __init__(self, item_id: str) -> None:
        self.item_id = item_id
        self.output: list[dict[str, Any]] = []  # the items done
        self.text: list[str] | None = None  # the open message's text

    def push(self, content: str, calls: list[Call]) -> list[dict[str, Any]]:
        out = []
        if content:
            if self.text is None:
                out += self._open_message()
            assert self.text is not None
            self.text.append(content)
            delta = {"delta": content, "logprobs": []}
            out.append({"type": "response.output_text.delta", **self._where(), **delta})
        for call in calls:
            out += self._close_message() + self._call(call)
        return out

    def _call(self, call: Call) -> list[dict[str, Any]]:
        """A function_call item, whole: added, its arguments in one delta, done."""
        index = len(self.output)
        item = _function_call(call, call.arguments)
        self.output.append(item)
        where = {"item_id": item["id"], "output_index": index}
        args, name = call.arguments, call.name
        added = {"output_index": index, "item": _function_call(call, None)}
        return [
            {"type": "response.output_item.added", **added},
            {"type": "response.function_call_arguments.delta", **where, "delta": args},
            {"type": "response.function_call_arguments.done", **where, "arguments": args}
            | {"name": name},
            {"type": "response.output_item.done", "output_index": index, "item": item},
        ]

    def close(self) -> list[dict[str, Any]]:
        """The open message's end (an answer with nothing in it still has its message)."""
        out = self._open_message() if not self.output and self.text is None else []
        return out + self._close_message()

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "output_index": len(self.output), "content_index": 0}

    def _open_message(self) -> list[dict[str, Any]]:
        self.text = []
        index = len(self.output)
        item = _message(self.item_id, None)
        added = {"type": "response.output_item.added", "output_index": index, "item": item}
        part = {"type": "response.content_part.added", **self._where(), "part": _part("")}
        return [added, part]

    def _close_message(self) -> list[dict[str, Any]]:
        if self.text is None:
            return []
        text, where = "".join(self.text), self._where()
        self.text = None
        item = _message(self.item_id, text)
        self.output.append(item)
        return [
            {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
            {"type": "response.content_part.done", **where, "part": _part(text)},
            {
                "type": "response.output_item.done",
                "output_index": where["output_index"],
                "item": item,
            },
        ]


async def _events(
    handle: ModelHandle, chat: ChatPlan, answer: _Answer, stream: RequestStream
) -> AsyncIterator[dict[str, Any]]:
    """The Responses API's event order: created, in progress, the output items, completed."""
    yield {"type": "response.created", "response": answer.json()}
    yield {"type": "response.in_progress", "response": answer.json()}
    items, calls = _Items(answer.item_id), dialect_tools.Calls(handle, chat)
    try:
        async for event in events(stream):
            if not isinstance(event, Finished):
                for out in items.push(*calls.push(event.text, event.token_ids)):
                    yield out
                continue
            for out in items.push(*calls.finish()) + items.close():
                yield out
            final = answer.json(event, items.output)
            yield {"type": f"response.{final['status']}", "response": final}
    except ShoalError as exc:  # mid-stream: the status is sent already, so say it in-band
        status, code = status_of(exc)
        param = getattr(exc, "param", None)
        yield {"type": "error", "code": code, "message": str(exc), "param": param, "status": status}
