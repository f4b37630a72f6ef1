"""Tools and structured output through the HTTP API, with the official openai client, over a
random model: the fake engine's logits behind SmolLM2's vocabulary and a chat template that lays
tools out. Nothing but the grammar makes its answers valid, so every check here fails without it.
"""

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jsonschema
import pytest
from openai import AsyncOpenAI

from shoal.api.app import create_app
from shoal.engines.fake import FakeEngine
from shoal.inference.pipeline import LocalPipeline
from shoal.inference.scheduler import Scheduler
from shoal.models.catalog import Catalog
from shoal.models.gguf import GGUFSource
from shoal.models.tokenizer import Tokenizer
from shoal.types.ids import ModelId
from shoal.types.shard import Shard
from tests.helpers.inprocess import OneModelService, SchedulerHandle
from tests.helpers.smollm2 import SMOLLM

pytestmark = pytest.mark.timeout(120)

MODEL = "smollm2-135m"
# Qwen 2.5's layout of tools and calls, cut down: tools in the system turn, calls as <tool_call>
TOOLS_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
Call one in <tool_call></tool_call> tags: {"name": <function-name>, "arguments": <args>}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' and tools and loop.first %}
{%- elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}
{%- for call in message.tool_calls or [] %}
<tool_call>
{{ {"name": call.function.name, "arguments": call.function.arguments} | tojson }}
</tool_call>
{%- endfor %}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["C", "F"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit", "days"],
            "additionalProperties": False,
        },
    },
}
TIME: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"tz": {"enum": ["UTC", "CET", "PST"]}},
            "required": ["tz"],
            "additionalProperties": False,
        },
    },
}
TOOLS: Any = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0},
        "langs": {"type": "array", "items": {"enum": ["en", "fr"]}, "maxItems": 2},
    },
    "required": ["name", "age", "langs"],
    "additionalProperties": False,
}
ASK: Any = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    smol = GGUFSource(SMOLLM).tokenizer()
    return Tokenizer(
        smol.backend,
        bos_token_id=smol.bos_token_id,
        eos_token_ids=smol.eos_token_ids,
        add_bos=smol.add_bos,
        chat_template=TOOLS_TEMPLATE,
    )


@pytest.fixture
async def client(tokenizer: Tokenizer) -> AsyncIterator[AsyncOpenAI]:
    card = Catalog().get(MODEL)
    engine = FakeEngine(vocab_size=card.vocab_size, hidden_size=16, seed=0)
    engine.load(Shard.whole(ModelId(MODEL), 4))
    scheduler = Scheduler(LocalPipeline([engine]), tokenizer, context_length=2048)
    app = create_app(OneModelService(SchedulerHandle(card, tokenizer, scheduler, 2048)))
    async with _Steps(scheduler):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            yield AsyncOpenAI(base_url="http://app/v1", api_key="x", http_client=http)  # type: ignore[arg-type]


class _Steps:
    """The scheduler's step loop for the test's length."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler

    async def __aenter__(self) -> None:
        self._task = asyncio.create_task(self._scheduler.run())

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()


def _check_calls(calls: Any, only: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    assert calls, "no tool call"
    out = []
    for call in calls:
        assert call.type == "function" and call.id
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, SCHEMAS[call.function.name])
        out.append((call.function.name, args))
    if only is not None:
        assert {name for name, _ in out} == {only}
    return out


@pytest.mark.parametrize("seed", range(4))
async def test_required_always_calls_a_tool_with_arguments_valid_against_its_schema(
    client: AsyncOpenAI, seed: int
) -> None:
    reply = await client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", seed=seed, max_tokens=300
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    _check_calls(choice.message.tool_calls)


@pytest.mark.parametrize("seed", range(3))
async def test_a_named_tool_is_always_the_one_called(client: AsyncOpenAI, seed: int) -> None:
    reply = await client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False,
        seed=seed,
        max_tokens=300,
    )
    calls = reply.choices[0].message.tool_calls
    assert len(calls or []) == 1
    _check_calls(calls, only="get_time")


async def _streamed(client: AsyncOpenAI, **kwargs: Any) -> tuple[str, list[dict[str, Any]], str]:
    """Content, the calls assembled from their deltas, and the finish reason of a stream."""
    stream = await client.chat.completions.create(model=MODEL, stream=True, **kwargs)
    content, finish = "", ""
    calls: dict[int, dict[str, Any]] = {}
    async for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for call in delta.tool_calls or []:
                slot = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                slot["id"] = call.id or slot["id"]
                if call.function is not None:
                    slot["name"] += call.function.name or ""
                    slot["arguments"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("choice", ["required", "auto"])
@pytest.mark.parametrize("seed", range(3))
async def test_streaming_and_non_streaming_agree(
    client: AsyncOpenAI, choice: str, seed: int
) -> None:
    kwargs: Any = {
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": choice,
        "seed": seed,
        "max_tokens": 120,
    }
    whole = (await client.chat.completions.create(model=MODEL, **kwargs)).choices[0]
    content, calls, finish = await _streamed(client, **kwargs)
    assert finish == whole.finish_reason
    assert (content or None) == (whole.message.content or None)
    assert "<tool_call>" not in content
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        (c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls or []
    ]
    assert all(c["id"] for c in calls)


@pytest.mark.parametrize("seed", range(4))
async def test_every_json_schema_answer_is_valid_against_the_schema(
    client: AsyncOpenAI, seed: int
) -> None:
    reply = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe someone."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON, "strict": True},
        },
        seed=seed,
        max_tokens=300,
    )
    jsonschema.validate(json.loads(reply.choices[0].message.content or ""), PERSON)


async def test_a_history_with_calls_and_results_renders_through_the_template(
    client: AsyncOpenAI,
) -> None:
    history: Any = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    ]
    reply = await client.chat.completions.create(
        model=MODEL, messages=history, tools=TOOLS, tool_choice="required", max_tokens=300
    )
    _check_calls(reply.choices[0].message.tool_calls)


async def test_each_of_n_choices_is_constrained_on_its_own(client: AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", n=3, seed=7, max_tokens=300
    )
    assert len(reply.choices) == 3
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls"
        _check_calls(choice.message.tool_calls)
