"""One request can never hurt another (issue 14).

Against a real `shoal node` serving SmolLM2 (its real tokenizer and vocabulary): each bad input is
sent while a victim stream (greedy, fixed prompt) decodes on the same instance; the victim must
get exactly the text it gets alone, and the bad request a 400 naming the field (or an ordinary
answer where the issue says so). Bodies go as raw JSON bytes, so an escaped lone surrogate
reaches the server as one. Then: /healthz stays fast while a 4 MB prompt is tokenized (the event
loop is not blocked), and, in-process over a fake engine that fails on one prompt, the failing
stream ends with an in-band error event and `[DONE]` while its batch-mate streams on.
"""

import asyncio
import json
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import numpy as np
import pytest

from shoal.api.app import create_app
from shoal.engines.base import StepInput
from shoal.engines.fake import FakeEngine
from shoal.inference.pipeline import LocalPipeline
from shoal.inference.scheduler import Scheduler
from shoal.models.catalog import Catalog
from shoal.types.ids import ModelId
from shoal.types.shard import Shard
from tests.helpers.fakes import VOCAB as FAKE_VOCAB
from tests.helpers.fakes import ByteTokenizer
from tests.helpers.inprocess import OneModelService, SchedulerHandle
from tests.helpers.nodes import NodeProcess, start_node

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MODEL = "smollm2-135m"
VOCAB = 49152  # the smollm2 card's vocab_size (and its GGUF tokenizer's)
JSON = {"content-type": "application/json"}
VICTIM = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Tell me about the sea."}],
    "temperature": 0,
    "max_tokens": 24,
    "stream": True,
}
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def raw(**fields: Any) -> bytes:
    """A JSON body; a value given as bytes goes in verbatim (e.g. an escaped lone surrogate)."""
    parts = [
        f'"{k}": ' + (v.decode() if isinstance(v, bytes) else json.dumps(v))
        for k, v in fields.items()
    ]
    return ("{" + ", ".join(parts) + "}").encode()


# (id, path, body, status, the field error.param names; None = answered normally)
BAD_INPUTS = [
    (
        "token id = vocab",
        COMPLETIONS,
        raw(model=MODEL, prompt=[1, 2, VOCAB], max_tokens=4),
        400,
        "prompt",
    ),
    ("token id < 0", COMPLETIONS, raw(model=MODEL, prompt=[1, -1, 2], max_tokens=4), 400, "prompt"),
    (
        "seed -1",
        CHAT,
        raw(model=MODEL, messages=[{"role": "user", "content": "Hi"}], seed=-1, max_tokens=4),
        400,
        "seed",
    ),
    ("empty prompt", COMPLETIONS, raw(model=MODEL, prompt="", max_tokens=4), 400, "prompt"),
    (
        "empty prompt streamed",
        COMPLETIONS,
        raw(model=MODEL, prompt="", max_tokens=4, stream=True),
        400,
        "prompt",
    ),
    (
        "temperature 1e-320",
        CHAT,
        raw(
            model=MODEL,
            messages=[{"role": "user", "content": "Hi"}],
            temperature=1e-320,
            max_tokens=8,
        ),
        200,
        None,
    ),
    (
        "lone surrogate in a chat message",
        CHAT,
        raw(
            model=MODEL,
            messages=b'[{"role": "user", "content": "Hi \\ud800 there"}]',
            max_tokens=4,
        ),
        400,
        "messages",
    ),
    (
        "completions prompt over the context",
        COMPLETIONS,
        raw(model=MODEL, prompt="Paris " * 9000, max_tokens=4),
        400,
        "prompt",
    ),
    (
        "lone surrogate in a completions prompt",
        COMPLETIONS,
        raw(model=MODEL, prompt=b'"\\ud800"', max_tokens=4),
        400,
        "prompt",
    ),
]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    proc = start_node(tmp_path_factory.mktemp("isolation"), ["--model", MODEL], threads=2)
    try:
        proc.wait_ready(MODEL, timeout=180)
        yield proc
    finally:
        proc.stop()


def sse_payloads(body: str) -> list[str]:
    """Every `data:` payload of an event stream, in order."""
    return [line[5:].strip() for line in body.splitlines() if line.startswith("data:")]


def content_of(payloads: Sequence[str]) -> str:
    """The text a chat or completions stream carried (the error event carries none)."""
    text = []
    for payload in payloads:
        if payload == "[DONE]":
            continue
        for choice in json.loads(payload).get("choices", []):
            text.append(choice.get("delta", {}).get("content") or choice.get("text") or "")
    return "".join(text)


async def victim_stream(client: httpx.AsyncClient, decoding: asyncio.Event) -> list[str]:
    """The victim's payloads; `decoding` is set at its first content chunk."""
    payloads: list[str] = []
    async with client.stream("POST", CHAT, json=VICTIM) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                payloads.append(line[5:].strip())
                if content_of(payloads[-1:]):
                    decoding.set()
    return payloads


@pytest.fixture(scope="module")
def alone(node: NodeProcess) -> str:
    """The victim's text with nothing else on the instance."""

    async def run() -> list[str]:
        async with httpx.AsyncClient(base_url=node.url, timeout=120) as client:
            return await victim_stream(client, asyncio.Event())

    payloads = asyncio.run(run())
    assert payloads[-1] == "[DONE]" and not any('"error"' in p for p in payloads)
    text = content_of(payloads)
    assert len(text) > 20, text
    return text


def alongside(url: str, path: str, body: bytes) -> tuple[list[str], httpx.Response]:
    """The bad request sent once the victim decodes: the victim's payloads, the bad response."""

    async def run() -> tuple[list[str], httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            decoding = asyncio.Event()
            victim = asyncio.create_task(victim_stream(client, decoding))
            await asyncio.wait_for(decoding.wait(), 60)
            response = await client.post(path, content=body, headers=JSON)
            return await victim, response

    return asyncio.run(run())


def assert_names(response: httpx.Response, field: str) -> None:
    """An OpenAI-shaped error whose param is `field` (or a part of it, e.g. messages.0.content)."""
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    param = error["param"] or ""
    assert param == field or param.startswith(field + "."), error


@pytest.mark.parametrize(
    ("path", "body", "status", "field"), [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS]
)
def test_a_bad_request_beside_a_stream_leaves_the_stream_as_it_is_alone(
    node: NodeProcess, alone: str, path: str, body: bytes, status: int, field: str | None
) -> None:
    victim, response = alongside(node.url, path, body)
    assert response.status_code == status, response.text
    if field is not None:
        assert_names(response, field)
    else:
        assert response.json()["choices"][0]["message"]["content"]
    assert victim[-1] == "[DONE]" and not any('"error"' in p for p in victim), victim[-3:]
    assert content_of(victim) == alone


def test_a_subnormal_temperature_is_greedy(node: NodeProcess, alone: str) -> None:
    body = raw(**(VICTIM | {"stream": False, "temperature": 1e-320}))
    assert b'"temperature": 1e-320' in body  # subnormal: 1e-320 > 0, yet 1 / 1e-320 is inf
    r = httpx.post(f"{node.url}{CHAT}", content=body, headers=JSON, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == alone


def test_healthz_answers_within_100_ms_while_a_4_mb_prompt_is_tokenized(node: NodeProcess) -> None:
    """Tokenizing ~920k tokens takes seconds; the event loop must serve /healthz meanwhile."""
    content = "The river runs by the old market. " * 115_000
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}]})
    assert 3_900_000 < len(body) < 4 * 1024 * 1024  # under the body limit: it is tokenized
    answer: list[httpx.Response] = []
    sender = threading.Thread(
        target=lambda: answer.append(
            httpx.post(f"{node.url}{CHAT}", content=body, headers=JSON, timeout=120)
        )
    )
    latencies: list[float] = []
    with httpx.Client(base_url=node.url, timeout=30) as client:
        client.get("/healthz")  # connected before the big request goes
        sender.start()
        try:
            while sender.is_alive():
                start = time.perf_counter()
                assert client.get("/healthz").status_code == 200
                latencies.append(time.perf_counter() - start)
                time.sleep(0.02)
        finally:
            sender.join(timeout=120)
    assert answer and answer[0].status_code == 400, answer  # ~920k tokens: over the context
    assert_names(answer[0], "messages")
    assert max(latencies) < 0.1, f"slowest /healthz {max(latencies) * 1000:.0f} ms"
    assert len(latencies) >= 10  # the polls did span the tokenization


def test_the_node_still_answers_after_every_bad_input(node: NodeProcess) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0,
        "max_tokens": 16,
    }
    r = httpx.post(f"{node.url}{CHAT}", json=body, timeout=120)
    assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]
    assert httpx.get(f"{node.url}/healthz").json()["active_requests"] == 0


# --- a stream that fails, in-process over a fake engine -------------------------------------------

POISON = b"POISON"  # a prompt holding these bytes makes the engine raise


class PoisonedEngine(FakeEngine):
    """A FakeEngine that raises when a batch holds a prefill with the poison bytes."""

    def forward(self, batch: Sequence[StepInput], *, all_logits: bool = False) -> list[np.ndarray]:
        poison = np.frombuffer(POISON, dtype=np.uint8).astype(np.int64) + 3  # ByteTokenizer ids
        for item in batch:
            data = np.asarray(item.data)
            if data.ndim == 1 and len(data) >= len(poison):
                windows = np.lib.stride_tricks.sliding_window_view(data, len(poison))
                if (windows == poison).all(axis=1).any():
                    raise RuntimeError("the engine choked on this prompt")
        return super().forward(batch, all_logits=all_logits)


async def test_a_failing_stream_ends_in_band_and_its_batch_mate_streams_on() -> None:
    engine = PoisonedEngine(vocab_size=FAKE_VOCAB, hidden_size=16, seed=0, delay_s=0.005)
    engine.load(Shard.whole(ModelId("fake"), 4))
    tokenizer = ByteTokenizer(eos=frozenset())  # never stops early: max_tokens decides
    scheduler = Scheduler(LocalPipeline([engine]), tokenizer, context_length=512)
    card = Catalog().get(MODEL)
    app = create_app(OneModelService(SchedulerHandle(card, tokenizer, scheduler, 512)))
    steps = asyncio.create_task(scheduler.run())
    victim_body = {**VICTIM, "max_tokens": 40}
    bad = {**VICTIM, "messages": [{"role": "user", "content": "say POISON"}]}
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            alone = (await client.post(CHAT, json=victim_body)).text

            async def victim() -> str:
                return (await client.post(CHAT, json=victim_body)).text

            async def failing() -> httpx.Response:
                await asyncio.sleep(0.05)  # the victim decodes by now
                return await client.post(CHAT, json=bad)

            together, failed = await asyncio.wait_for(asyncio.gather(victim(), failing()), 60)
    finally:
        steps.cancel()
    assert failed.status_code == 200  # the stream had started: the error must come in-band
    payloads = sse_payloads(failed.text)
    assert payloads[-1] == "[DONE]", payloads
    error = json.loads(payloads[-2])["error"]
    assert error["message"] and error["type"], error
    assert content_of(sse_payloads(alone))
    assert content_of(sse_payloads(together)) == content_of(sse_payloads(alone))
    assert sse_payloads(together)[-1] == "[DONE]"
