"""Each family's tool-call text parsed on fixed strings; streamed, the split is the whole one."""

import json

import pytest

from shoal.api.tool_formats import (
    DEEPSEEK_V31,
    GRANITE,
    HERMES,
    KIMI_K2,
    LLAMA3,
    QWEN3_CODER,
    ParsedCall,
    ToolFormat,
    format_for,
)
from shoal.api.tools import CallSplitter, split_answer

WEATHER = ParsedCall("get_weather", json.dumps({"city": "Paris", "days": 2}))
TIME = ParsedCall("get_time", json.dumps({"tz": "UTC"}))

CASES: list[tuple[ToolFormat, str, str | None, list[ParsedCall]]] = [
    (
        HERMES,
        'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
        '"days": 2}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}'
        "\n</tool_call>",
        "Let me look.",
        [WEATHER, TIME],
    ),
    (  # arguments given as a JSON string, and no closing tag at the end
        HERMES,
        '<tool_call>{"name": "get_time", "arguments": "{\\"tz\\": \\"UTC\\"}"}',
        None,
        [TIME],
    ),
    (HERMES, "no calls here, just <b>text</b>", "no calls here, just <b>text</b>", []),
    (  # a broken call is content after all
        HERMES,
        "<tool_call>\n{not json}\n</tool_call>",
        "<tool_call>\n{not json}\n</tool_call>",
        [],
    ),
    (
        QWEN3_CODER,
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>",
        None,
        [WEATHER],
    ),
    (
        LLAMA3,
        '{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}',
        None,
        [WEATHER],
    ),
    (
        LLAMA3,
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}; '
        '{"name": "get_time", "parameters": {"tz": "UTC"}}',
        None,
        [WEATHER, TIME],
    ),
    (LLAMA3, 'The JSON is {"name": "x"}', 'The JSON is {"name": "x"}', []),
    (
        GRANITE,
        '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}, '
        '{"name": "get_time", "arguments": {"tz": "UTC"}}]',
        None,
        [WEATHER, TIME],
    ),
    (
        DEEPSEEK_V31,
        "Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>"
        '{"city": "Paris", "days": 2}<｜tool▁call▁end｜><｜tool▁call▁begin｜>get_time'
        '<｜tool▁sep｜>{"tz": "UTC"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
        "Sure.",
        [WEATHER, TIME],
    ),
    (
        KIMI_K2,
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        '<|tool_call_argument_begin|>{"city": "Paris", "days": 2}<|tool_call_end|>'
        "<|tool_call_begin|>functions.get_time:1<|tool_call_argument_begin|>"
        '{"tz": "UTC"}<|tool_call_end|><|tool_calls_section_end|>',
        None,
        [WEATHER, TIME],
    ),
]


def _norm(calls: list[ParsedCall]) -> list[tuple[str, object]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), CASES)
def test_each_family_parses_its_calls(
    fmt: ToolFormat, text: str, content: str | None, calls: list[ParsedCall]
) -> None:
    answer = split_answer(fmt, text)
    assert answer.content == content
    assert _norm(answer.calls) == _norm(calls)


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), CASES)
@pytest.mark.parametrize("piece", [1, 2, 3, 7])
def test_streamed_in_pieces_the_split_is_the_whole_ones(
    fmt: ToolFormat, text: str, content: str | None, calls: list[ParsedCall], piece: int
) -> None:
    splitter = CallSplitter(fmt)
    said, got = "", []
    for i in range(0, len(text), piece):
        out, new = splitter.push(text[i : i + piece])
        said += out
        got += new
    out, new = splitter.finish()
    said += out
    got += new
    whole = split_answer(fmt, text)
    assert said == (content or "") == (whole.content or "")
    assert _norm(got) == _norm(calls) == _norm(whole.calls)


def test_a_call_streams_once_closed_and_its_text_never_as_content() -> None:
    splitter = CallSplitter(HERMES)
    assert splitter.push("Hi <tool") == ("Hi", [])  # the blank and "<tool" held back
    assert splitter.push('_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}') == ("", [])
    content, calls = splitter.push("\n</tool_call>")
    assert content == "" and _norm(calls) == _norm([TIME])
    assert splitter.finish() == ("", [])


def test_held_back_text_that_is_no_opener_comes_out() -> None:
    splitter = CallSplitter(HERMES)
    assert splitter.push("a <to") == ("a", [])
    assert splitter.push("p>") == (" <top>", [])


def test_one_call_only_without_parallel_calls() -> None:
    text = CASES[0][1]
    assert _norm(split_answer(HERMES, text, parallel=False).calls) == _norm([WEATHER])


@pytest.mark.parametrize(
    ("template", "architecture", "fmt"),
    [
        ("{{ '<tool_call>' }}{{ tools }}", "qwen2", HERMES),
        ("<tool_call>\n<function=x>\n<parameter=y>", "qwen3_moe", QWEN3_CODER),
        ("<|python_tag|>{{ tools }}<|eot_id|>", "llama", LLAMA3),
        ("<|tool_call|>{{ tools }}", "granite", GRANITE),
        ("<｜tool▁calls▁begin｜>", "deepseek_v3", DEEPSEEK_V31),
        ("<|tool_calls_section_begin|>", "kimi_k2", KIMI_K2),
        (None, "llama", HERMES),  # no template that lays out tools: the Hermes fallback
        (None, "kimi_k2", KIMI_K2),
    ],
)
def test_the_format_follows_the_template(
    template: str | None, architecture: str, fmt: ToolFormat
) -> None:
    assert format_for(template, architecture) is fmt
