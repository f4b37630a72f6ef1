"""What /v1/chat/completions adds for tools and structured output: the prompt's messages and
tools, the grammar (`response_format`, `tool_choice`), and the answer split into content and
`tool_calls`, whole or as stream deltas (api/tools.py does the dialect-neutral work).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shoal.api.openai_types import (
    ChatCompletionRequest,
    ChatMessage,
    JsonObjectFormat,
    JsonSchemaResponseFormat,
    NamedToolChoice,
)
from shoal.api.tool_formats import HERMES, ParsedCall, ToolFormat, ToolSpec, format_for
from shoal.api.tools import (
    CallSplitter,
    hermes_messages,
    new_call_id,
    openai_tool,
    split_answer,
    template_call,
    tool_grammar,
)
from shoal.errors import BadRequest
from shoal.inference import grammar
from shoal.inference.constraint import ConstraintFactory
from shoal.types.model_card import ModelCard


@dataclass(frozen=True)
class ChatPlan:
    """How to prompt for, constrain and read one chat answer."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None  # for a template that lays tools out itself
    constraint: ConstraintFactory | None
    calls: ToolFormat | None  # the format to read calls in; None: the answer is all content
    parallel: bool = True
    keep: frozenset[int] = frozenset()  # special-token ids of the format's markers


def _message(m: ChatMessage) -> dict[str, Any]:
    """One OpenAI message as chat templates read it ("developer" is a system message)."""
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
    out["content"] = m.text()
    if m.tool_calls:
        out["tool_calls"] = [
            template_call(c.function.name, c.function.arguments, c.id) for c in m.tool_calls
        ]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        out["name"] = m.name
    return out


def _specs(body: ChatCompletionRequest) -> list[ToolSpec]:
    return [
        ToolSpec(
            t.function.name,
            t.function.description,
            t.function.parameters or {"type": "object", "properties": {}},
        )
        for t in body.tools or ()
    ]


def plan_chat(body: ChatCompletionRequest, tokenizer: Any, card: ModelCard) -> ChatPlan:
    """The plan for body on this model (tokenizer: the handle's; a BadRequest for what the
    model cannot do)."""
    specs = _specs(body)
    choice = body.tool_choice or ("auto" if specs else "none")
    use_tools = bool(specs) and choice != "none"
    messages = [_message(m) for m in body.messages]
    renders = bool(getattr(tokenizer, "renders_tools", False))
    template = getattr(tokenizer, "chat_template", None) if renders else None
    # a template that cannot lay tools out gets the Hermes block, so calls come back Hermes
    fmt = format_for(template, card.architecture) if renders else HERMES
    has_history = any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    template_tools: list[dict[str, Any]] | None = None
    if renders:
        template_tools = [openai_tool(t) for t in specs] if use_tools else None
    elif use_tools or has_history:
        messages = hermes_messages(messages, specs if use_tools else [])
    parallel = body.parallel_tool_calls is not False
    can_constrain = callable(getattr(tokenizer, "tokenizers_json", None))
    fmt_ = body.response_format
    if isinstance(fmt_, JsonObjectFormat | JsonSchemaResponseFormat):
        if use_tools:
            raise BadRequest(
                "response_format with tools is not supported: set tool_choice to none",
                param="response_format",
            )
        if not can_constrain:
            raise BadRequest("this model cannot constrain its output", param="response_format")
        text = (
            grammar.json_object()
            if isinstance(fmt_, JsonObjectFormat)
            else grammar.json_schema(fmt_.json_schema.schema_ or {"type": "object"})
        )
        json_factory = grammar.constraint_factory(
            tokenizer, text, vocab_size=card.vocab_size, param="response_format"
        )
        return ChatPlan(messages, None, json_factory, None)
    if not use_tools:
        return ChatPlan(messages, template_tools, None, None)
    mode = choice.function.name if isinstance(choice, NamedToolChoice) else choice
    special = getattr(tokenizer, "special_token_id", None)
    keep = (
        frozenset(i for i in (special(m) for m in fmt.markers) if i is not None)
        if callable(special)
        else frozenset()
    )
    factory: ConstraintFactory | None = None
    if can_constrain:
        text = tool_grammar(
            fmt,
            specs,
            mode,
            parallel=parallel,
            special=lambda marker: callable(special) and special(marker) is not None,
        )
        factory = grammar.constraint_factory(
            tokenizer, text, vocab_size=card.vocab_size, param="tools"
        )
    elif mode != "auto":
        raise BadRequest("this model cannot force a tool call", param="tool_choice")
    return ChatPlan(messages, template_tools, factory, fmt, parallel, keep)


def openai_calls(calls: Sequence[ParsedCall]) -> list[dict[str, Any]]:
    """Parsed calls as a message's `tool_calls`."""
    return [
        {
            "id": new_call_id(),
            "type": "function",
            "function": {"name": c.name, "arguments": c.arguments},
        }
        for c in calls
    ]


def answer_message(plan: ChatPlan, text: str, finish: str) -> tuple[dict[str, Any], str]:
    """The assistant message for a whole answer, and its finish reason."""
    if plan.calls is None:
        return {"role": "assistant", "content": text}, finish
    answer = split_answer(plan.calls, text, parallel=plan.parallel)
    if not answer.calls:
        return {"role": "assistant", "content": answer.content}, finish
    message = {
        "role": "assistant",
        "content": answer.content,
        "tool_calls": openai_calls(answer.calls),
    }
    return message, "tool_calls"


class DeltaStream:
    """Streamed text in, chunk deltas out: content, then each call as a `tool_calls` delta
    (its id, type and name, then its arguments), never the call's own text."""

    def __init__(self, plan: ChatPlan) -> None:
        self._splitter = CallSplitter(plan.calls, parallel=plan.parallel) if plan.calls else None
        self._index = 0

    @property
    def called(self) -> bool:
        return self._index > 0

    def push(self, text: str) -> list[dict[str, Any]]:
        if self._splitter is None:
            return [{"content": text}] if text else []
        return self._deltas(*self._splitter.push(text))

    def finish(self) -> list[dict[str, Any]]:
        return [] if self._splitter is None else self._deltas(*self._splitter.finish())

    def _deltas(self, content: str, calls: list[ParsedCall]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{"content": content}] if content else []
        for call in calls:
            head = {"index": self._index, "id": new_call_id(), "type": "function"}
            head["function"] = {"name": call.name, "arguments": ""}
            args = {"index": self._index, "function": {"arguments": call.arguments}}
            out += [{"tool_calls": [head]}, {"tool_calls": [args]}]
            self._index += 1
        return out


class MarkerText:
    """The answer's text with the format's marker tokens kept, though they are special tokens
    (which the scheduler's text leaves out): re-decoded from the token ids."""

    def __init__(self, tokenizer: Any, keep: frozenset[int]) -> None:
        self._tokenizer = tokenizer
        self._keep = keep
        self._decoder = tokenizer.stream()

    def push(self, ids: Sequence[int]) -> str:
        parts = []
        for i in ids:
            if i in self._keep:
                parts += [self._decoder.flush(), self._tokenizer.token_text(i)]
            else:
                parts.append(self._decoder.push(i))
        return "".join(parts)

    def flush(self) -> str:
        return self._decoder.flush()
