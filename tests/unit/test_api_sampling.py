"""n choices and logprobs in OpenAI's shapes, through the official openai client against the app
over the fake engine in this process (the real model: tests/integration/test_sampling_e2e.py)."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI

from shoal.api.app import create_app
from shoal.models.catalog import Catalog
from tests.helpers.fakes import ByteTokenizer, fake_scheduler
from tests.helpers.inprocess import OneModelService, SchedulerHandle

pytestmark = pytest.mark.timeout(30)
MODEL = "smollm2-135m"  # its card; the fake engine does the work
CHAT: Any = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


@pytest.fixture
async def client() -> AsyncIterator[AsyncOpenAI]:
    scheduler = fake_scheduler(context_length=8192)
    handle = SchedulerHandle(Catalog().get(MODEL), ByteTokenizer(), scheduler, 8192)
    app = create_app(OneModelService(handle), max_body_bytes=1 << 20)
    steps = asyncio.create_task(scheduler.run())
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app/v1")
    try:
        yield AsyncOpenAI(base_url="http://app/v1", api_key="x", http_client=http, max_retries=0)  # type: ignore[arg-type]
    finally:
        await http.aclose()
        steps.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await steps


async def test_n_greedy_chat_choices_are_equal_and_the_prompt_counts_once(
    client: AsyncOpenAI,
) -> None:
    one = await client.chat.completions.create(**CHAT, max_tokens=8)
    two = await client.chat.completions.create(**CHAT, max_tokens=8, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert {c.message.content for c in two.choices} == {one.choices[0].message.content}
    assert one.usage is not None and two.usage is not None
    assert two.usage.prompt_tokens == one.usage.prompt_tokens
    assert two.usage.completion_tokens == 2 * one.usage.completion_tokens


async def test_streamed_choices_carry_their_index_and_usage_comes_once_at_the_end(
    client: AsyncOpenAI,
) -> None:
    whole = await client.chat.completions.create(**CHAT, max_tokens=8, n=3)
    texts, finishes = ["", "", ""], [None, None, None]
    chunks = [
        c
        async for c in await client.chat.completions.create(
            **CHAT, max_tokens=8, n=3, stream=True, stream_options={"include_usage": True}
        )
    ]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert texts == [c.message.content for c in whole.choices]
    assert finishes == [c.finish_reason for c in whole.choices]
    assert [c.usage for c in chunks if c.usage] == [whole.usage]


async def test_chat_logprobs_have_openai_s_shape_streamed_or_not(client: AsyncOpenAI) -> None:
    ask: Any = {**CHAT, "max_tokens": 6, "logprobs": True, "top_logprobs": 2}
    whole = await client.chat.completions.create(**ask)
    content = whole.choices[0].logprobs.content
    assert content is not None and len(content) == whole.usage.completion_tokens
    # the fake's bytes are random: only whole characters read back (SmolLM2's: e2e test)
    text = whole.choices[0].message.content or ""
    assert all(e.token in text for e in content if "\ufffd" not in e.token)
    for entry in content:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.top_logprobs[0].token == entry.token  # greedy takes the most likely
    streamed = [
        e
        async for chunk in await client.chat.completions.create(**ask, stream=True)
        for choice in chunk.choices
        if choice.logprobs and choice.logprobs.content
        for e in choice.logprobs.content
    ]
    assert streamed == content
    plain = await client.chat.completions.create(**CHAT, max_tokens=2)
    assert plain.choices[0].logprobs is None


async def test_completion_logprobs_have_the_legacy_shape(client: AsyncOpenAI) -> None:
    reply = await client.completions.create(
        model=MODEL, prompt="abc", max_tokens=5, temperature=0, logprobs=3, n=2
    )
    assert [c.index for c in reply.choices] == [0, 1]
    for choice in reply.choices:
        lp = choice.logprobs
        assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
        assert "".join(lp.tokens) == choice.text
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
        assert all(len(top) == 3 and max(top.values()) <= 0 for top in lp.top_logprobs)
        assert lp.token_logprobs[0] == max(lp.top_logprobs[0].values())
