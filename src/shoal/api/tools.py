"""Tool calling, dialect-neutral: tools into the prompt, the grammar that forces calls, calls
out of the output (streamed or whole).

- Prompt: a chat template that lays out `tools` itself gets them (`tools=` in OpenAI's shape)
  and the history as it expects (assistant `tool_calls` with arguments as objects, `tool`
  turns with `tool_call_id`). One that does not (SmolLM2's, the ChatML fallback) gets
  `HERMES_SYSTEM` in the system turn, calls written as `<tool_call>` blocks and tool results
  as user turns in `<tool_response>`: the Hermes convention most small models were tuned on.
- Grammar (`tool_grammar`): `auto` leaves text free until the family's opener, then forces a
  call to one of the tools with arguments valid against its schema (a lazy lexeme, so the
  mask lets everything through until then); `required` and a named tool force a call from the
  first token; `parallel=False` allows one.
- Output (`CallSplitter`): text before the opener is content, streamed as it comes (a possible
  opener's first characters are held back); each closed call is yielded once complete.
"""

import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from shoal.api.tool_formats import (
    CODER_RULES,
    HERMES,
    QWEN3_CODER,
    ParsedCall,
    ToolFormat,
    ToolSpec,
)
from shoal.inference import grammar

ToolMode = Literal["auto", "required"] | str  # a str other than those two: that tool's name

HERMES_SYSTEM = (
    "You are a function calling AI model. You are provided with function signatures within "
    "<tools></tools> XML tags. You may call one or more functions to assist with the user "
    "query. Don't make assumptions about what values to plug into functions. Here are the "
    "available tools: <tools>\n{tools}\n</tools>\n"
    "For each function call return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags as follows:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def openai_tool(tool: ToolSpec) -> dict[str, Any]:
    """A tool in OpenAI's shape, as chat templates expect `tools` entries."""
    function: dict[str, Any] = {"name": tool.name, "parameters": tool.parameters}
    if tool.description:
        function["description"] = tool.description
    return {"type": "function", "function": function}


def template_call(name: str, arguments: str, call_id: str | None) -> dict[str, Any]:
    """A past call as templates read `tool_calls`: arguments an object when they are JSON."""
    try:
        args: Any = json.loads(arguments)
    except json.JSONDecodeError:
        args = arguments
    call: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": args}}
    return call | ({"id": call_id} if call_id else {})


def hermes_messages(
    messages: list[dict[str, Any]], tools: Sequence[ToolSpec]
) -> list[dict[str, Any]]:
    """Messages (template-shaped, from `template_call` etc.) rewritten for a template that knows
    only role and content: tools in the system turn, calls and results written out as text."""
    out: list[dict[str, Any]] = []
    for m in messages:
        content = m.get("content") or ""
        if m["role"] == "assistant" and m.get("tool_calls"):
            blocks = [
                "<tool_call>\n"
                + json.dumps(
                    {"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                    ensure_ascii=False,
                )
                + "\n</tool_call>"
                for c in m["tool_calls"]
            ]
            content = "\n".join([content, *blocks] if content else blocks)
            out.append({"role": "assistant", "content": content})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        else:
            out.append({"role": m["role"], "content": content})
    if tools:
        listed = "\n".join(json.dumps(openai_tool(t), ensure_ascii=False) for t in tools)
        block = HERMES_SYSTEM.format(tools=listed)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{block}"}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


# --- grammar ------------------------------------------------------------------------------------


def tool_grammar(
    fmt: ToolFormat,
    tools: Sequence[ToolSpec],
    mode: ToolMode,
    *,
    parallel: bool = True,
    special: Callable[[str], bool] = lambda _: False,
) -> str:
    """llguidance grammar for the answer: free text then calls (auto), or calls only."""
    if mode not in ("auto", "required"):
        tools = [t for t in tools if t.name == mode]
    assert tools, "a tool grammar needs a tool"

    def lit(marker: str) -> str:
        return marker if special(marker) else json.dumps(marker)

    calls = fmt.call_grammar(tools, parallel, lit)
    rules = "%llguidance {}\n"
    rules += CODER_RULES if fmt is QWEN3_CODER else ""
    if mode != "auto":
        return grammar.lark(rules + f"start: {calls}\n")
    if fmt.at_start_only:  # Llama 3: a call is the whole answer, else the answer is text
        return grammar.lark(rules + f"start: PLAIN | {calls}\nPLAIN: /([^{{]|\\n)(.|\\n)*/\n")
    opener = lit(fmt.opener)
    # the calls' rule starts with the opener; the lazy lead ends at the first one, so the
    # mask is all-ones until then. A special-token opener cannot be written by the text regex.
    lead = "lead: TEXT\n" if special(fmt.opener) else f"lead[lazy]: TEXT {opener}\n"
    body = calls.removeprefix(opener).lstrip() if not special(fmt.opener) else calls
    return grammar.lark(
        rules + "start: TEXT | lead calls\n" + "TEXT: /(.|\\n)*/\n" + lead + f"calls: {body}\n"
    )


# --- output -------------------------------------------------------------------------------------


class CallSplitter:
    """Output text in, (content to emit now, calls completed now) out; see the module doc."""

    def __init__(self, fmt: ToolFormat, *, parallel: bool = True) -> None:
        self._fmt = fmt
        self._max_calls = None if parallel else 1
        self._held = ""  # text that may yet turn out to start the call region
        self._region: str | None = None  # from the opener on, once found
        self._gap = ""  # whitespace between the content and the opener
        self._said = False  # some content went out already
        self._calls = 0

    def push(self, text: str) -> tuple[str, list[ParsedCall]]:
        if self._region is not None:
            self._region += text
            return "", self._new(final=False)
        held = self._held + text
        start = self._opener_at(held)
        if start is None:
            keep = self._holdback(held)
            out, self._held = held[: len(held) - keep], held[len(held) - keep :]
            self._said = self._said or bool(out.strip())
            return out, []
        before, self._region, self._held = held[:start], held[start:], ""
        content = before.rstrip()
        self._gap = before[len(content) :]
        return content, self._new(final=False)

    def finish(self) -> tuple[str, list[ParsedCall]]:
        if self._region is None:
            out, self._held = self._held, ""
            return out, []
        calls = self._new(final=True)
        if self._calls == 0:  # no call parsed: the "region" was content after all
            return self._gap + self._region, []
        return "", calls

    def _new(self, *, final: bool) -> list[ParsedCall]:
        assert self._region is not None
        calls = self._fmt.parse(self._region, final)
        if self._max_calls is not None:
            calls = calls[: self._max_calls]
        new = calls[self._calls :]
        self._calls = len(calls)
        return new

    def _opener_at(self, text: str) -> int | None:
        opener = self._fmt.opener
        if self._fmt.at_start_only:
            stripped = text.lstrip()
            if self._said or not stripped:
                return None
            for start in (opener, *self._fmt.markers):
                if stripped.startswith(start):
                    return len(text) - len(stripped)
            return None
        i = text.find(opener)
        return None if i < 0 else i

    def _holdback(self, text: str) -> int:
        """How many trailing characters might begin the opener (or precede it as blanks)."""
        openers = (
            (self._fmt.opener, *self._fmt.markers)
            if self._fmt.at_start_only
            else (self._fmt.opener,)
        )
        if self._fmt.at_start_only and self._said:
            return 0
        keep = 0
        for opener in openers:
            for k in range(min(len(opener) - 1, len(text)), 0, -1):
                if text.endswith(opener[:k]):
                    keep = max(keep, k)
                    break
        rest = text[: len(text) - keep]
        return keep + len(rest) - len(rest.rstrip())


@dataclass(frozen=True)
class Answer:
    """A whole answer split: content (None when the answer is only calls) and the calls."""

    content: str | None
    calls: list[ParsedCall]


def split_answer(fmt: ToolFormat, text: str, *, parallel: bool = True) -> Answer:
    """What `CallSplitter` streams, all at once (so both ways agree)."""
    splitter = CallSplitter(fmt, parallel=parallel)
    content, calls = splitter.push(text)
    tail, more = splitter.finish()
    content += tail
    calls += more
    return Answer(content if content or not calls else None, calls)


__all__ = [
    "HERMES",
    "Answer",
    "CallSplitter",
    "ParsedCall",
    "ToolFormat",
    "ToolSpec",
    "hermes_messages",
    "new_call_id",
    "openai_tool",
    "split_answer",
    "template_call",
    "tool_grammar",
]
