"""Tool and response_format fields at the HTTP edge (400s naming the field), and the prompt a
template without tools gets (the Hermes block)."""

from typing import Any

import httpx
import pytest

from shoal.api.chat_tools import answer_message, plan_chat
from shoal.api.openai_types import ChatCompletionRequest
from shoal.models.catalog import Catalog
from shoal.models.gguf import GGUFSource
from shoal.models.tokenizer import Tokenizer
from tests.helpers.fakes import fake_scheduler
from tests.helpers.smollm2 import SMOLLM
from tests.unit.test_api import GOOD, served

pytestmark = pytest.mark.timeout(30)

CHAT = "/v1/chat/completions"
TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time in a zone",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}},
    },
}
ZONED: dict[str, Any] = {  # bounded arguments: a random sampler ends them
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}},
    },
}
CALLED: dict[str, Any] = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    ],
}

BAD: list[tuple[str, dict[str, Any], str | None]] = [
    ("tools not a list", {"tools": {"x": 1}}, "tools"),
    ("tool without function", {"tools": [{"type": "function"}]}, "tools.0.function"),
    ("tool of another type", {"tools": [{**TOOL, "type": "web"}]}, "tools.0.type"),
    (
        "bad function name",
        {"tools": [{"type": "function", "function": {"name": "a b"}}]},
        "tools.0.function.name",
    ),
    ("same name twice", {"tools": [TOOL, TOOL]}, "tools"),
    ("unknown tool_choice", {"tools": [TOOL], "tool_choice": "always"}, "tool_choice"),
    ("required without tools", {"tool_choice": "required"}, "tool_choice"),
    (
        "named tool not in tools",
        {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
    ),
    ("parallel not a bool", {"tools": [TOOL], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ("unknown format", {"response_format": {"type": "yaml"}}, "response_format"),
    (
        "json_schema without schema block",
        {"response_format": {"type": "json_schema"}},
        "response_format.json_schema.json_schema",
    ),
    (
        "schema not an object",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}},
        "response_format.json_schema.json_schema.schema",
    ),
    (
        "tool message without tool_call_id",
        {"messages": [{"role": "tool", "content": "12:00"}]},
        "messages.0",
    ),
    (
        "tool_calls on a user message",
        {"messages": [{**CALLED, "role": "user"}]},
        "messages.0",
    ),
    (
        "call arguments not a string",
        {
            "messages": [
                {**CALLED, "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": {}}}]}
            ]
        },
        "messages.0.tool_calls.0.function.arguments",
    ),
]


@pytest.mark.parametrize(("body", "param"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
async def test_a_bad_tool_or_format_field_is_a_400_naming_it(
    body: dict[str, Any], param: str | None
) -> None:
    async with served(fake_scheduler(context_length=8192)) as client:
        r = await client.post(CHAT, json={**GOOD, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error


async def test_a_model_without_a_grammar_vocabulary_refuses_response_format() -> None:
    async with served(fake_scheduler(context_length=8192)) as client:
        r = await client.post(CHAT, json={**GOOD, "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"


async def test_null_assistant_content_and_tool_turns_are_accepted() -> None:
    history = [{"role": "user", "content": "time?"}, CALLED]
    history.append({"role": "tool", "tool_call_id": "c1", "content": "12:00"})
    async with served(fake_scheduler(context_length=8192)) as client:
        r: httpx.Response = await client.post(
            CHAT, json={**GOOD, "messages": history, "tools": [TOOL]}
        )
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    return GGUFSource(SMOLLM).tokenizer()


def test_a_template_without_tools_gets_the_hermes_block_and_calls_as_text(
    smollm2: Tokenizer,
) -> None:
    assert not smollm2.renders_tools
    body = ChatCompletionRequest.model_validate(
        {
            "model": "smollm2-135m",
            "messages": [
                {"role": "user", "content": "time?"},
                CALLED,
                {"role": "tool", "tool_call_id": "c1", "content": "12:00"},
            ],
            "tools": [TOOL],
        }
    )
    plan = plan_chat(body, smollm2, Catalog().get("smollm2-135m"))
    assert plan.tools is None and plan.constraint is not None
    prompt = smollm2.render_chat(plan.messages)
    assert "<tools>" in prompt and '"name": "get_time"' in prompt
    assert '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>' in prompt
    assert "<tool_response>\n12:00\n</tool_response>" in prompt
    message, finish = answer_message(
        plan,
        'ok <tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>',
        "stop",
    )
    assert finish == "tool_calls" and message["content"] == "ok"
    assert message["tool_calls"][0]["function"] == {
        "name": "get_time",
        "arguments": '{"tz": "UTC"}',
    }


def test_tool_choice_none_leaves_the_prompt_and_answer_plain(smollm2: Tokenizer) -> None:
    body = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [TOOL],
            "tool_choice": "none",
        }
    )
    plan = plan_chat(body, smollm2, Catalog().get("smollm2-135m"))
    assert plan.constraint is None and plan.calls is None
    assert plan.messages == [{"role": "user", "content": "hi"}]
    plain = smollm2.encode_chat([{"role": "user", "content": "hi"}])
    assert smollm2.encode_chat(plan.messages) == plain


def test_a_special_token_opener_is_forced_as_that_token_and_read_back(smollm2: Tokenizer) -> None:
    import numpy as np
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Backend

    from shoal.api.chat_tools import MarkerText

    backend = Backend.from_str(smollm2.tokenizers_json())
    backend.add_special_tokens([AddedToken("<|tool_call|>", special=True, normalized=False)])
    granite = Tokenizer(
        backend,
        bos_token_id=None,
        eos_token_ids=smollm2.eos_token_ids,
        add_bos=False,
        chat_template="{{ tools | tojson }}{% for m in messages %}{{ m.content }}{% endfor %}"
        "<|tool_call|>",
    )
    opener = granite.special_token_id("<|tool_call|>")
    assert opener is not None
    body = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "t?"}],
            "tools": [ZONED],
            "tool_choice": "required",
        }
    )
    card = Catalog().get("smollm2-135m").model_copy(update={"vocab_size": granite.vocab_size})
    plan = plan_chat(body, granite, card)
    assert plan.calls is not None and plan.calls.name == "granite" and plan.keep == {opener}
    assert plan.constraint is not None
    constraint = plan.constraint()
    rng = np.random.default_rng(0)
    ids: list[int] = []
    while not constraint.finished and len(ids) < 400:
        mask = constraint.allowed()
        assert mask is not None
        allowed = np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little"))
        token = int(rng.choice(allowed))
        constraint.advance(token)
        if token in granite.eos_token_ids:
            break
        ids.append(token)
    assert ids[0] == opener  # the special token itself, not its text spelled out
    assert "<|tool_call|>" not in granite.decode(ids)  # what the scheduler's text would say
    marked = MarkerText(granite, plan.keep)
    text = marked.push(ids) + marked.flush()
    message, finish = answer_message(plan, text, "stop")
    assert finish == "tool_calls", text
    assert message["tool_calls"][0]["function"]["name"] == "get_time"
