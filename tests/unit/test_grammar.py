"""llguidance constraints over SmolLM2's real vocabulary: a random sampler kept inside the mask
writes only what the grammar allows (JSON valid against its schema, tool calls to the tools)."""

import json
from typing import Any

import jsonschema
import numpy as np
import pytest

from shoal.api.tool_formats import (
    DEEPSEEK_V31,
    GRANITE,
    HERMES,
    KIMI_K2,
    LLAMA3,
    QWEN3_CODER,
    ToolFormat,
    ToolSpec,
)
from shoal.api.tools import split_answer, tool_grammar
from shoal.errors import BadRequest
from shoal.inference import grammar
from shoal.models.gguf import GGUFSource
from shoal.models.tokenizer import Tokenizer
from tests.helpers.smollm2 import SMOLLM

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "pet": {"anyOf": [{"type": "null"}, {"type": "boolean"}]},
    },
    "required": ["name", "age", "tags", "pet"],
    "additionalProperties": False,
}
WEATHER = ToolSpec(
    "get_weather",
    "The weather in a city",
    {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 10}, "days": {"type": "integer"}},
        "required": ["city", "days"],
        "additionalProperties": False,
    },
)
TIME = ToolSpec(
    "get_time",
    None,
    {
        "type": "object",
        "properties": {"tz": {"enum": ["UTC", "CET"]}},
        "required": ["tz"],
        "additionalProperties": False,
    },
)
TOOLS = [WEATHER, TIME]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return GGUFSource(SMOLLM).tokenizer()


def sample(tok: Tokenizer, text: str, seed: int, limit: int = 400) -> str:
    """Random tokens (uniform over the mask, so nothing steers them but the grammar)."""
    constraint = grammar.constraint_factory(tok, text, vocab_size=tok.vocab_size, param="x")()
    rng = np.random.default_rng(seed)
    out: list[int] = []
    for _ in range(limit):
        mask = constraint.allowed()
        assert mask is not None and mask.dtype == np.uint32 and len(mask) == 1536
        bits = np.unpackbits(mask.view(np.uint8), bitorder="little")[: tok.vocab_size]
        allowed = np.flatnonzero(bits)
        # a long free text would run to the limit: prefer ending when the grammar lets us
        ends = [t for t in allowed if t in tok.eos_token_ids]
        token = int(ends[0] if ends and rng.random() < 0.3 else rng.choice(allowed))
        constraint.advance(token)
        if token in tok.eos_token_ids:
            break
        out.append(token)
        if constraint.finished:  # the grammar is complete: the last token counts
            break
    else:
        pytest.fail(f"no end in {limit} tokens: {tok.decode(out)!r}")
    return tok.decode(out)


@pytest.mark.parametrize("seed", range(8))
def test_every_random_answer_is_valid_against_the_schema(tok: Tokenizer, seed: int) -> None:
    answer = json.loads(sample(tok, grammar.json_schema(PERSON), seed))
    jsonschema.validate(answer, PERSON)


@pytest.mark.parametrize(("text", "ok"), [('{"a": [1, {"b": null}]}', True), ("[1]", False)])
def test_json_object_takes_an_object_and_nothing_else(tok: Tokenizer, text: str, ok: bool) -> None:
    constraint = grammar.constraint_factory(
        tok, grammar.json_object(), vocab_size=tok.vocab_size, param="response_format"
    )()
    ids = tok.encode(text.replace(" ", ""))
    for token in ids:
        mask = constraint.allowed()
        assert mask is not None
        if not (mask[token // 32] >> (token % 32)) & 1:
            assert not ok, f"{tok.decode([token])!r} refused in {text!r}"
            return
        constraint.advance(token)
    assert ok and constraint.finished


def _valid_calls(fmt: ToolFormat, text: str) -> list[tuple[str, dict[str, Any]]]:
    answer = split_answer(fmt, text)
    specs = {t.name: t for t in TOOLS}
    calls = [(c.name, json.loads(c.arguments)) for c in answer.calls]
    for name, args in calls:
        jsonschema.validate(args, specs[name].parameters)
    return calls


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3, GRANITE, DEEPSEEK_V31, KIMI_K2])
@pytest.mark.parametrize("seed", range(4))
def test_required_always_calls_a_tool_with_valid_arguments(
    tok: Tokenizer, fmt: ToolFormat, seed: int
) -> None:
    text = sample(tok, tool_grammar(fmt, TOOLS, "required"), seed)
    calls = _valid_calls(fmt, text)
    assert calls and split_answer(fmt, text).content is None, text


@pytest.mark.parametrize("seed", range(4))
def test_a_named_tool_is_the_one_called(tok: Tokenizer, seed: int) -> None:
    text = sample(tok, tool_grammar(HERMES, TOOLS, "get_time", parallel=False), seed)
    assert [name for name, _ in _valid_calls(HERMES, text)] == ["get_time"]


def test_auto_leaves_text_free_until_the_opener_then_forces_a_call(tok: Tokenizer) -> None:
    factory = grammar.constraint_factory(
        tok, tool_grammar(HERMES, TOOLS, "auto"), vocab_size=tok.vocab_size, param="tools"
    )
    constraint = factory()
    mask = constraint.allowed()
    assert mask is not None and int(np.unpackbits(mask.view(np.uint8)).sum()) > 40000
    for token in tok.encode("Let me check. <tool_call>\n"):
        constraint.advance(token)
    mask = constraint.allowed()
    assert mask is not None
    allowed = np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little"))
    assert all(tok.decode([int(t)]).startswith("{") for t in allowed), "a call must follow"
    rest = sample_after(tok, constraint, seed=1)
    text = "Let me check. <tool_call>\n" + rest
    assert _valid_calls(HERMES, text), text


def sample_after(tok: Tokenizer, constraint: grammar.GrammarConstraint, seed: int) -> str:
    rng = np.random.default_rng(seed)
    out: list[int] = []
    for _ in range(300):
        mask = constraint.allowed()
        assert mask is not None
        allowed = np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little"))
        token = int(rng.choice(allowed[allowed < tok.vocab_size]))
        constraint.advance(token)
        if token in tok.eos_token_ids:
            break
        out.append(token)
        if constraint.finished:  # the grammar is complete: the last token counts
            break
    return tok.decode(out)


def test_each_choice_gets_a_fresh_matcher(tok: Tokenizer) -> None:
    factory = grammar.constraint_factory(
        tok, grammar.json_object(), vocab_size=tok.vocab_size, param="response_format"
    )
    first, second = factory(), factory()
    first.advance(tok.encode("{")[0])
    assert first.allowed() is not None
    fresh, again = second.allowed(), factory().allowed()
    assert fresh is not None and again is not None
    assert np.array_equal(fresh, again)  # untouched by the first


def test_a_wider_head_than_the_vocabulary_masks_the_extra_ids(tok: Tokenizer) -> None:
    wide = tok.vocab_size + 100
    constraint = grammar.constraint_factory(
        tok, grammar.json_object(), vocab_size=wide, param="response_format"
    )()
    mask = constraint.allowed()
    assert mask is not None and len(mask) == (wide + 31) // 32
    bits = np.unpackbits(mask.view(np.uint8), bitorder="little")
    assert not bits[tok.vocab_size :].any()


def test_a_schema_that_does_not_compile_is_a_400_naming_the_field(tok: Tokenizer) -> None:
    with pytest.raises(BadRequest) as err:
        grammar.constraint_factory(
            tok,
            grammar.json_schema({"type": "object", "properties": {"x": {"$ref": "#/nowhere"}}}),
            vocab_size=tok.vocab_size,
            param="response_format",
        )
    assert err.value.param == "response_format"


def test_objects_that_list_their_properties_are_closed_to_others() -> None:
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"b": {"type": "integer"}}},
            "free": {"type": "object"},
            "open": {"type": "object", "properties": {}, "additionalProperties": True},
            "both": {"allOf": [{"properties": {"x": {}}}, {"properties": {"y": {}}}]},
        },
        "$defs": {"d": {"properties": {"c": {}}}},
    }
    out = grammar.closed(schema)
    assert out["additionalProperties"] is False
    assert out["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in out["properties"]["free"]
    assert out["properties"]["open"]["additionalProperties"] is True
    assert out["properties"]["both"] == schema["properties"]["both"]  # type: ignore[index]
    assert out["$defs"]["d"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the caller's schema is left as it was


@pytest.mark.parametrize(
    ("name", "ok"), [("get_time", True), ("get_weather", True), ("get_date", False)]
)
def test_qwen3_coder_calls_must_name_a_tool(tok: Tokenizer, name: str, ok: bool) -> None:
    # its parameters are XML, left free by the grammar; the function's name is forced
    text = f"<tool_call>\n<function={name}>\n<parameter=tz>\nUTC\n</parameter>\n</function>\n"
    text += "</tool_call>"
    constraint = grammar.constraint_factory(
        tok, tool_grammar(QWEN3_CODER, TOOLS, "required"), vocab_size=tok.vocab_size, param="t"
    )()
    taken = 0
    for token in tok.encode(text):
        mask = constraint.allowed()
        assert mask is not None
        if not (mask[token // 32] >> (token % 32)) & 1:
            break
        constraint.advance(token)
        taken += 1
    assert (taken == len(tok.encode(text))) == ok
