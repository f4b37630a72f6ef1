"""The HTTP API in this process, over the fake engine: every bad input and streaming case, fast.

`create_app` runs over an InferenceService whose one ready model is a Scheduler on the fake engine
(byte tokenizer), through httpx's ASGI transport: no sockets, no model, no subprocess. The real
model's answers are checked once, end to end, in tests/integration/test_openai_e2e.py.
"""

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shoal.api.app import create_app
from shoal.errors import ModelUnavailable
from shoal.inference.scheduler import Scheduler
from shoal.models.catalog import Catalog
from shoal.types.model_card import ModelCard
from tests.helpers.fakes import ByteTokenizer, fake_engine, fake_scheduler
from tests.helpers.inprocess import OneModelService, SchedulerHandle

pytestmark = pytest.mark.timeout(30)

MODEL = "smollm2-135m"  # its card (context 8192, vocab 49152); the fake engine does the work
GOOD: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "hi"}],
    "temperature": 0,
    "max_tokens": 4,
}


class CatalogService(OneModelService):
    """One ready model; every other card of the catalog is known but cannot run here (503)."""

    def __init__(self, handle: SchedulerHandle) -> None:
        super().__init__(handle)
        self.catalog = Catalog()

    def cards(self) -> list[ModelCard]:
        return self.catalog.all()

    def card(self, model_id: str) -> ModelCard:
        return self.catalog.get(model_id)  # ModelNotFound for an unknown id

    async def acquire(self, model_id: str) -> SchedulerHandle:
        card = self.card(model_id)
        if card.id != self.handle.card.id:
            raise ModelUnavailable(f"cannot run {card.id} here: no node can hold it")
        return self.handle


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with served(fake_scheduler(context_length=8192)) as c:
        yield c


@contextlib.asynccontextmanager
async def served(scheduler: Scheduler) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client for the app over scheduler, the scheduler stepping meanwhile."""
    card = Catalog().get(MODEL)
    service = CatalogService(SchedulerHandle(card, ByteTokenizer(), scheduler, 8192))
    app = create_app(service, max_body_bytes=4 * 1024 * 1024)
    steps = asyncio.create_task(scheduler.run())
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
            yield c
    finally:
        steps.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await steps


def raw(**fields: Any) -> bytes:
    """A JSON body; a value given as bytes goes in verbatim (an escaped lone surrogate)."""
    parts = [
        f'"{k}": ' + (v.decode() if isinstance(v, bytes) else json.dumps(v))
        for k, v in fields.items()
    ]
    return ("{" + ", ".join(parts) + "}").encode()


CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MESSAGES = [{"role": "user", "content": "hi"}]
BAD: list[tuple[str, str, Any, int, str | None, str]] = [
    # (name, path, body, status, error.param, words in the message)
    ("malformed json", CHAT, b'{"model": "smollm2-135m", "messages": [', 400, None, "JSON"),
    ("not an object", CHAT, b"[1, 2, 3]", 400, None, ""),
    ("wrong type", CHAT, {**GOOD, "temperature": "hot"}, 400, "temperature", "temperature"),
    ("missing messages", CHAT, {"model": MODEL}, 400, "messages", "messages"),
    ("empty messages", CHAT, {**GOOD, "messages": []}, 400, "messages", "messages"),
    ("bad role", CHAT, {**GOOD, "messages": [{"role": "x", "content": "y"}]}, 400, None, "role"),
    ("negative max_tokens", CHAT, {**GOOD, "max_tokens": -1}, 400, "max_tokens", "max_tokens"),
    ("n past the batch", CHAT, {**GOOD, "n": 100}, 400, "n", "n must be"),
    ("presence_penalty 5", CHAT, {**GOOD, "presence_penalty": 5.0}, 400, "presence_penalty", "2"),
    ("frequency_penalty -3", CHAT, {**GOOD, "frequency_penalty": -3}, 400, "frequency_penalty", ""),
    (
        "repetition_penalty 0",
        CHAT,
        {**GOOD, "repetition_penalty": 0},
        400,
        "repetition_penalty",
        "",
    ),
    ("min_p 2", CHAT, {**GOOD, "min_p": 2.0}, 400, "min_p", ""),
    ("logit_bias 101", CHAT, {**GOOD, "logit_bias": {"5": 101}}, 400, "logit_bias", "100"),
    ("logit_bias word", CHAT, {**GOOD, "logit_bias": {"x": 1}}, 400, "logit_bias", "token ids"),
    ("logit_bias past vocab", CHAT, {**GOOD, "logit_bias": {"999999": 1}}, 400, "logit_bias", ""),
    (
        "top_logprobs 21",
        CHAT,
        {**GOOD, "logprobs": True, "top_logprobs": 21},
        400,
        "top_logprobs",
        "",
    ),
    ("top_logprobs alone", CHAT, {**GOOD, "top_logprobs": 2}, 400, "top_logprobs", "logprobs"),
    ("audio", CHAT, {**GOOD, "audio": {"voice": "x"}}, 400, "audio", "not supported"),
    (
        "modalities audio",
        CHAT,
        {**GOOD, "modalities": ["audio"]},
        400,
        "modalities",
        "not supported",
    ),
    ("prediction", CHAT, {**GOOD, "prediction": {"type": "content"}}, 400, "prediction", ""),
    ("web_search_options", CHAT, {**GOOD, "web_search_options": {}}, 400, "web_search_options", ""),
    ("suffix", COMPLETIONS, {"model": MODEL, "prompt": "a", "suffix": "b"}, 400, "suffix", ""),
    ("best_of 3", COMPLETIONS, {"model": MODEL, "prompt": "a", "best_of": 3}, 400, "best_of", ""),
    (
        "logprobs 6",
        COMPLETIONS,
        {"model": MODEL, "prompt": "a", "logprobs": 6},
        400,
        "logprobs",
        "",
    ),
    ("unknown model", CHAT, {**GOOD, "model": "no-such-model"}, 404, None, "no-such-model"),
    ("not runnable here", CHAT, {**GOOD, "model": "deepseek-v3.1-4bit"}, 503, None, "deepseek"),
    (
        "prompt over context",
        CHAT,
        {**GOOD, "messages": [{"role": "user", "content": "Paris " * 1500}]},
        400,
        "messages",
        "8192",
    ),
    ("output over context", CHAT, {**GOOD, "max_tokens": 9000}, 400, "max_tokens", "8192"),
    (
        "body over limit",
        CHAT,
        {**GOOD, "messages": [{"role": "user", "content": "x" * 5_000_000}]},
        413,
        None,
        "limit",
    ),
    ("seed -1", CHAT, {**GOOD, "seed": -1}, 400, "seed", "seed"),
    ("seed 2**63", CHAT, {**GOOD, "seed": 2**63}, 400, "seed", "seed"),
    (
        "lone surrogate in chat",
        CHAT,
        raw(model=MODEL, messages=b'[{"role": "user", "content": "a\\ud800b"}]'),
        400,
        "messages.0.content",
        "surrogate",
    ),
    (
        "lone surrogate in a prompt",
        COMPLETIONS,
        raw(model=MODEL, prompt=b'"\\udfff"'),
        400,
        "prompt",
        "surrogate",
    ),
    ("empty prompt", COMPLETIONS, {"model": MODEL, "prompt": ""}, 400, "prompt", "empty"),
    (
        "empty prompt streamed",
        COMPLETIONS,
        {"model": MODEL, "prompt": "", "stream": True},
        400,
        "prompt",
        "empty",
    ),
    (
        "token id = vocab",
        COMPLETIONS,
        {"model": MODEL, "prompt": [1, 49152]},
        400,
        "prompt",
        "49152",
    ),
    ("token id < 0", COMPLETIONS, {"model": MODEL, "prompt": [5, -1]}, 400, "prompt", "-1"),
    (
        "completions over context",
        COMPLETIONS,
        {"model": MODEL, "prompt": "x" * 9000},
        400,
        "prompt",
        "8192",
    ),
    (
        "five stop strings",
        COMPLETIONS,
        {"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]},
        400,
        "stop",
        "4",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "words"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
async def test_bad_input_gets_an_openai_error_and_the_app_serves_on(
    client: httpx.AsyncClient,
    path: str,
    body: object,
    status: int,
    param: str | None,
    words: str,
) -> None:
    if isinstance(body, bytes):
        r = await client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = await client.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words.lower() in error["message"].lower()
    if param is not None:
        assert error["param"] == param
    good = await client.post(CHAT, json=GOOD)
    assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"]


async def test_a_tiny_temperature_is_greedy(client: httpx.AsyncClient) -> None:
    greedy = await client.post(CHAT, json={**GOOD, "max_tokens": 12})
    tiny = await client.post(
        CHAT,
        content=raw(**{**GOOD, "max_tokens": 12, "temperature": b"1e-320"}),
        headers={"content-type": "application/json"},
    )
    assert tiny.status_code == 200
    text = tiny.json()["choices"][0]["message"]["content"]
    assert text == greedy.json()["choices"][0]["message"]["content"]


async def test_completions_max_tokens_null_is_16(client: httpx.AsyncClient) -> None:
    r = await client.post(
        COMPLETIONS, json={"model": MODEL, "prompt": "abc", "max_tokens": None, "stop": ["\x00"]}
    )
    assert r.status_code == 200
    usage = r.json()["usage"]
    assert usage["completion_tokens"] <= 16
    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")


def sse(text: str) -> list[Any]:
    """The data events of an SSE body: JSON objects, then the string "[DONE]"."""
    out: list[Any] = []
    for line in text.splitlines():
        if line.startswith("data: "):
            payload = line[6:]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


async def test_a_chat_stream_is_chunks_then_usage_then_done(client: httpx.AsyncClient) -> None:
    body = {**GOOD, "max_tokens": 10, "stream": True, "stream_options": {"include_usage": True}}
    events = sse((await client.post(CHAT, json=body)).text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    whole = await client.post(CHAT, json={**GOOD, "max_tokens": 10})
    assert streamed == whole.json()["choices"][0]["message"]["content"]


async def test_a_completions_stream_echoes_and_ends_with_done(client: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 5, "stream": True, "echo": True}
    events = sse((await client.post(COMPLETIONS, json=body)).text)
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["text"] == "abc"
    assert all(e["object"] == "text_completion" for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")


async def test_a_stream_whose_step_fails_ends_in_band_and_its_neighbour_streams_on() -> None:
    engine = fake_engine(delay_s=0.002)
    forward = engine.forward

    shared: list[bool] = []  # whether a failing step also held the victim
    scheduler = fake_scheduler(engine, context_length=8192)

    def poisoned(batch, **kw):
        if any(item.request_id.startswith("cmpl") for item in batch):  # completions fail here
            shared.append(any(item.request_id.startswith("chatcmpl") for item in batch))
            raise RuntimeError("engine fault")
        if not shared:  # the victim alone waits for the bad request, however slow this host is
            for _ in range(100):
                if scheduler._waiting:
                    break
                time.sleep(0.005)
        return forward(batch, **kw)

    async with served(scheduler) as client:
        alone = await client.post(CHAT, json={**GOOD, "max_tokens": 30})
        engine.forward = poisoned  # type: ignore[method-assign]
        victim = asyncio.create_task(client.post(CHAT, json={**GOOD, "max_tokens": 30}))
        for _ in range(1000):  # the victim is decoding when the bad request comes
            if any(seq.tokens for seq in scheduler._active):
                break
            await asyncio.sleep(0.002)
        bad = await client.post(COMPLETIONS, json={"model": MODEL, "prompt": "x", "stream": True})
        events = sse(bad.text)
        assert events[-1] == "[DONE]"
        assert "engine fault" in events[-2]["error"]["message"]
        assert (await victim).json()["choices"] == alone.json()["choices"]
    assert shared[0]  # the bad request failed a step it shared with the victim


async def test_unknown_route_is_an_openai_404(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/nope")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


async def test_models_say_whether_they_run_here(tmp_path: Path) -> None:
    """With the node's Hub cache, /v1/models carries `shoal models`' answer for this machine:
    the packaged SmolLM2 runs now, a Hub-only card after a download of its size."""
    card = Catalog().get(MODEL)
    service = CatalogService(SchedulerHandle(card, ByteTokenizer(), fake_scheduler(), 8192))
    transport = httpx.ASGITransport(app=create_app(service, hub_root=tmp_path / "hub"))
    async with httpx.AsyncClient(transport=transport, base_url="http://node") as c:
        models = {m["id"]: m for m in (await c.get("/v1/models")).json()["data"]}
        one = (await c.get("/v1/models/qwen3-0.6b")).json()
    assert models[MODEL]["availability_kind"] == "runs_here"
    assert models[MODEL]["availability"] == "runs here now (gguf)"
    qwen = models["qwen3-0.6b"]
    assert qwen["availability_kind"] == "needs_download" and qwen["download_bytes"] > 0
    assert qwen["availability"].startswith("runs after a download of ")
    assert one["availability"] == qwen["availability"]
    assert {m["availability_kind"] for m in models.values()} <= {
        "runs_here",
        "needs_download",
        "cannot_run",
    }


async def test_models_and_healthz(client: httpx.AsyncClient) -> None:
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list" and any(m["id"] == MODEL for m in models["data"])
    health = (await client.get("/healthz")).json()
    assert health["status"] == "ok" and health["active_requests"] == 0
