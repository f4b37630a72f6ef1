"""How each model family writes tool calls: its markers, a parser, and a grammar that forces it.

A `ToolFormat` names the text that opens the call region (`<tool_call>`, `<|tool_call|>`, ...);
everything before it is the answer's content. `parse(region, final)` returns the calls in the
region, in order: before the end only those already closed, so what it returns while the text
grows is always a prefix of what it returns at the end (streaming and non-streaming agree). A
call whose JSON does not parse is left out. `call_grammar` writes the Lark rule for the whole
call region (llguidance's dialect, api/tools.py wraps it), with one `%json` schema per tool.
Dialect-neutral: the OpenAI, Anthropic and Responses endpoints all use these.
"""

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from shoal.inference.grammar import lark_json


@dataclass(frozen=True)
class ToolSpec:
    """One function the model may call: its name, what it does, its arguments' JSON schema."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object"})


@dataclass(frozen=True)
class ParsedCall:
    """One call the model wrote: the function's name and its arguments as JSON object text."""

    name: str
    arguments: str


Literal_ = Callable[[str], str]  # a marker as a Lark atom: "<|x|>" a special token, or '"text"'


def _arguments(value: Any) -> str | None:
    """Arguments as JSON object text (a model may write them as an object or as a string)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if value is None:
        value = {}
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None


def _named(obj: Any, *argument_keys: str) -> ParsedCall | None:
    """{"name": ..., "arguments" | "parameters": {...}} as a call, or None if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    key = next((k for k in argument_keys if k in obj), None)
    args = _arguments(obj[key] if key else {})
    return None if args is None else ParsedCall(obj["name"], args)


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _tool_object(tool: ToolSpec, argument_key: str) -> dict[str, Any]:
    """The schema of {"name": tool.name, argument_key: <its arguments>}, name first."""
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, argument_key: tool.parameters},
        "required": ["name", argument_key],
        "additionalProperties": False,
    }


def _any_tool(tools: Sequence[ToolSpec], argument_key: str) -> dict[str, Any]:
    objects = [_tool_object(t, argument_key) for t in tools]
    return objects[0] if len(objects) == 1 else {"anyOf": objects}


def _blocks(region: str, start: str, end: str, final: bool) -> list[str]:
    """The bodies between start and end markers; at the end an unclosed last one too."""
    bodies: list[str] = []
    pos = 0
    while (i := region.find(start, pos)) >= 0:
        j = region.find(end, i + len(start))
        if j < 0:
            if final:
                bodies.append(region[i + len(start) :])
            break
        bodies.append(region[i + len(start) : j])
        pos = j + len(end)
    return bodies


@dataclass(frozen=True)
class ToolFormat:
    """One family's way of writing calls (see the module docstring)."""

    name: str
    opener: str  # the text that starts the call region
    markers: tuple[str, ...]  # every marker it writes (to keep when they are special tokens)
    parse: Callable[[str, bool], list[ParsedCall]]
    call_grammar: Callable[[Sequence[ToolSpec], bool, Literal_], str]
    at_start_only: bool = False  # the opener counts only as the output's first text


# --- Hermes (Qwen 2.5/3, SmolLM, Hermes, most fine-tunes): <tool_call>{json}</tool_call> ---------


def _hermes_parse(region: str, final: bool) -> list[ParsedCall]:
    calls = (
        _named(_json(b.strip()), "arguments", "parameters")
        for b in _blocks(region, "<tool_call>", "</tool_call>", final)
    )
    return [c for c in calls if c is not None]


def _hermes_grammar(tools: Sequence[ToolSpec], parallel: bool, lit: Literal_) -> str:
    body = lark_json(_any_tool(tools, "arguments"))
    call = f'{lit("<tool_call>")} "\\n" {body} "\\n" {lit("</tool_call>")}'
    return f'{call} ("\\n" {call})*' if parallel else call


HERMES = ToolFormat(
    "hermes", "<tool_call>", ("<tool_call>", "</tool_call>"), _hermes_parse, _hermes_grammar
)


# --- Qwen3-Coder: <tool_call><function=name><parameter=x>value</parameter></function> ---------

_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|$)", re.S)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?(?:</parameter>|$)", re.S)


def _coder_parse(region: str, final: bool) -> list[ParsedCall]:
    calls: list[ParsedCall] = []
    for body in _blocks(region, "<tool_call>", "</tool_call>", final):
        m = _FUNCTION.search(body)
        if m is None:
            continue
        args: dict[str, Any] = {}
        for key, raw in _PARAMETER.findall(m.group(2)):
            value = _json(raw)  # numbers, booleans, objects as JSON; anything else is a string
            args[key.strip()] = raw if value is None and raw != "null" else value
        calls.append(ParsedCall(m.group(1).strip(), json.dumps(args, ensure_ascii=False)))
    return calls


def _coder_grammar(tools: Sequence[ToolSpec], parallel: bool, lit: Literal_) -> str:
    # the names are forced; the parameters' XML is left free (it has no JSON to check)
    names = " | ".join(json.dumps(t.name) for t in tools)
    head = f'{lit("<tool_call>")} "\\n<function=" ({names}) ">\\n"'
    call = f'{head} coder_body "\\n" {lit("</tool_call>")}'
    return f'{call} ("\\n" {call})*' if parallel else call


QWEN3_CODER = ToolFormat(
    "qwen3_coder",
    "<tool_call>",
    ("<tool_call>", "</tool_call>"),
    _coder_parse,
    _coder_grammar,
)
CODER_RULES = 'coder_body[lazy]: /(.|\\n)*/ "</function>"\n'


# --- Llama 3.x: {"name": ..., "parameters": {...}} as the whole answer, or after <|python_tag|> --


def _llama3_parse(region: str, final: bool) -> list[ParsedCall]:
    text = region.removeprefix("<|python_tag|>")
    decoder = json.JSONDecoder()
    calls: list[ParsedCall] = []
    pos = 0
    while True:
        while pos < len(text) and text[pos] in " \t\n;":
            pos += 1
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return calls
        call = _named(obj, "parameters", "arguments")
        if call is not None:
            calls.append(call)


def _llama3_grammar(tools: Sequence[ToolSpec], parallel: bool, lit: Literal_) -> str:
    call = lark_json(_any_tool(tools, "parameters"))
    return f'{call} ("; " {call})*' if parallel else call


LLAMA3 = ToolFormat(
    "llama3", "{", ("<|python_tag|>",), _llama3_parse, _llama3_grammar, at_start_only=True
)


# --- Granite 3.x: <|tool_call|>[{"name": ..., "arguments": {...}}, ...] ----------------------


def _granite_parse(region: str, final: bool) -> list[ParsedCall]:
    text = region.removeprefix("<|tool_call|>").lstrip()
    try:
        items, _ = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError:
        return []
    items = items if isinstance(items, list) else [items]
    return [c for c in (_named(i, "arguments", "parameters") for i in items) if c is not None]


def _granite_grammar(tools: Sequence[ToolSpec], parallel: bool, lit: Literal_) -> str:
    calls = {"type": "array", "items": _any_tool(tools, "arguments"), "minItems": 1}
    return f"{lit('<|tool_call|>')} {lark_json(calls if parallel else calls | {'maxItems': 1})}"


GRANITE = ToolFormat(
    "granite", "<|tool_call|>", ("<|tool_call|>",), _granite_parse, _granite_grammar
)


# --- DeepSeek V3.1: <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>name<｜tool▁sep｜>{args}... -------

_DS = ("<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>")
_DS_END = "<｜tool▁calls▁end｜>"


def _deepseek_parse(region: str, final: bool) -> list[ParsedCall]:
    calls: list[ParsedCall] = []
    for body in _blocks(region, _DS[1], _DS[3], final):
        name, sep, args = body.partition(_DS[2])
        parsed = _arguments(args.strip()) if sep else None
        if parsed is not None and name.strip():
            calls.append(ParsedCall(name.strip(), parsed))
    return calls


def _deepseek_grammar(tools: Sequence[ToolSpec], parallel: bool, lit: Literal_) -> str:
    begin, sep, end = (lit(m) for m in _DS[1:])
    one = " | ".join(
        f"({begin} {json.dumps(t.name)} {sep} {lark_json(t.parameters)} {end})" for t in tools
    )
    return f"{lit(_DS[0])} ({one}){'+' if parallel else ''} {lit(_DS_END)}"


DEEPSEEK_V31 = ToolFormat(
    "deepseek_v31", _DS[0], (*_DS, _DS_END), _deepseek_parse, _deepseek_grammar
)


# --- Kimi K2: <|tool_calls_section_begin|><|tool_call_begin|>functions.name:0 ... ------------

_KIMI = (
    "<|tool_calls_section_begin|>",
    "<|tool_call_begin|>",
    "<|tool_call_argument_begin|>",
    "<|tool_call_end|>",
    "<|tool_calls_section_end|>",
)
_KIMI_ID = re.compile(r"^\s*(?:functions\.)?(.+?)(?::\d+)?\s*$", re.S)


def _kimi_parse(region: str, final: bool) -> list[ParsedCall]:
    calls: list[ParsedCall] = []
    for body in _blocks(region, _KIMI[1], _KIMI[3], final):
        head, sep, args = body.partition(_KIMI[2])
        m = _KIMI_ID.match(head)
        parsed = _arguments(args.strip()) if sep else None
        if parsed is not None and m is not None:
            calls.append(ParsedCall(m.group(1), parsed))
    return calls


def _kimi_grammar(tools: Sequence[ToolSpec], parallel: bool, lit: Literal_) -> str:
    begin, args, end = (lit(m) for m in _KIMI[1:4])
    one = " | ".join(
        f'({begin} "functions.{t.name}:" /[0-9]{{1,2}}/ {args} {lark_json(t.parameters)} {end})'
        for t in tools
    )
    return f"{lit(_KIMI[0])} ({one}){'+' if parallel else ''} {lit(_KIMI[4])}"


KIMI_K2 = ToolFormat("kimi_k2", _KIMI[0], _KIMI, _kimi_parse, _kimi_grammar)

FORMATS = {f.name: f for f in (HERMES, QWEN3_CODER, LLAMA3, GRANITE, DEEPSEEK_V31, KIMI_K2)}


def format_for(chat_template: str | None, architecture: str | None = None) -> ToolFormat:
    """The family's format, told by the markers its chat template writes (else by architecture);
    Hermes when nothing says otherwise (api/tools.py then lays the tools out itself)."""
    t = chat_template or ""
    if _KIMI[0] in t:
        return KIMI_K2
    if _DS[0] in t:
        return DEEPSEEK_V31
    if "<|tool_call|>" in t:
        return GRANITE
    if "<function=" in t and "<parameter=" in t:
        return QWEN3_CODER
    if "<tool_call>" in t:
        return HERMES
    if "<|python_tag|>" in t or ('"parameters"' in t and "<|eot_id|>" in t):
        return LLAMA3
    if architecture in ("deepseek_v3", "deepseek_v32"):
        return DEEPSEEK_V31
    if architecture == "kimi_k2":
        return KIMI_K2
    if architecture == "granite":
        return GRANITE
    return HERMES
