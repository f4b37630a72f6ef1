"""Tool use and structured output for the other dialects (Anthropic, Responses, Ollama),
through what chat completions does: a dialect turns its history, tools, choice and format into
OpenAI's shapes, and gets back the same plan (api/chat_tools.py: prompt, grammar, the family's
call format) and the same split of the answer into content and calls (api/tools.py), whole or
streamed."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from shoal.api.chat_tools import ChatPlan, DeltaStream, MarkerText, answer_message, plan_chat
from shoal.api.generation import off_loop
from shoal.api.openai_types import ChatCompletionRequest
from shoal.errors import BadRequest
from shoal.inference.service import ModelHandle


def json_format(schema: dict[str, Any] | None, name: str = "answer") -> dict[str, Any]:
    """OpenAI's `response_format` for answers valid against schema (None: any JSON object)."""
    if schema is None:
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


@dataclass(frozen=True)
class Call:
    """One call the answer made, in no dialect's shape."""

    id: str
    name: str
    arguments: str  # a JSON object, as text


async def plan(
    handle: ModelHandle,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]],
    choice: str | dict[str, Any] | None,
    parallel: bool | None,
    response_format: dict[str, Any] | None = None,
) -> tuple[ChatPlan, list[int]]:
    """The plan and prompt for OpenAI-shaped messages, `tools`, `tool_choice` and
    `response_format` (a BadRequest for what the model cannot do)."""
    body: dict[str, Any] = {"model": handle.card.id, "messages": messages}
    if tools:
        body |= {"tools": tools, "tool_choice": choice, "parallel_tool_calls": parallel}
    if response_format is not None:
        body["response_format"] = response_format
    try:
        request = ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:  # what chat completions refuses, said in the caller's words
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BadRequest(f"{where}: {first['msg']}", param=where) from None
    chat = await off_loop(plan_chat, request, handle.tokenizer, handle.card)
    extra = {} if chat.tools is None else {"tools": chat.tools}
    prompt = await off_loop(handle.tokenizer.encode_chat, chat.messages, **extra)
    return chat, prompt


def split(
    handle: ModelHandle, chat: ChatPlan, text: str, ids: Sequence[int], reason: str
) -> tuple[str | None, list[Call]]:
    """A whole answer's content and calls."""
    if chat.keep:  # the format's markers are special tokens: read them back from the ids
        marked = MarkerText(handle.tokenizer, chat.keep)
        text = marked.push(ids) + marked.flush()
    message, _ = answer_message(chat, text, reason)
    calls = [
        Call(c["id"], c["function"]["name"], c["function"]["arguments"])
        for c in message.get("tool_calls") or ()
    ]
    return message["content"], calls


class Calls:
    """A streamed answer: each event's text and ids in, (content, calls completed now) out."""

    def __init__(self, handle: ModelHandle, chat: ChatPlan) -> None:
        self._deltas = DeltaStream(chat)
        self._marked = MarkerText(handle.tokenizer, chat.keep) if chat.keep else None
        self.made = 0  # calls so far

    def push(self, text: str, ids: Sequence[int]) -> tuple[str, list[Call]]:
        text = self._marked.push(ids) if self._marked else text
        return self._read(self._deltas.push(text))

    def finish(self) -> tuple[str, list[Call]]:
        tail = self._deltas.push(self._marked.flush()) if self._marked else []
        return self._read(tail + self._deltas.finish())

    def _read(self, deltas: list[dict[str, Any]]) -> tuple[str, list[Call]]:
        """OpenAI's chunk deltas (content; a call's head, then its arguments) as calls."""
        content, calls, head = "", [], None
        for delta in deltas:
            content += delta.get("content") or ""
            for part in delta.get("tool_calls") or ():
                if "id" in part:
                    head = part
                elif head is not None:
                    name, arguments = head["function"]["name"], part["function"]["arguments"]
                    calls.append(Call(head["id"], name, arguments))
        self.made += len(calls)
        return content, calls
