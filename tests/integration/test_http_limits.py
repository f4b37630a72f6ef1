"""The HTTP edge under abuse: silent and slow clients, a full queue, a stream that breaks.

A real uvicorn server on loopback (port 0) runs the real app over a scheduler on the fake
engine, with the limits shortened so the tests take seconds.
"""

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn

from shoal.api.app import create_app
from shoal.api.limits import header_timeout_protocol
from shoal.inference.scheduler import Scheduler
from shoal.models.catalog import Catalog
from tests.helpers.fakes import ByteTokenizer, fake_engine, fake_scheduler
from tests.helpers.inprocess import OneModelService, SchedulerHandle

pytestmark = pytest.mark.timeout(60)

TIMEOUT_S = 0.5  # headers and body must arrive within this
MODEL = "smollm2-135m"  # the card only; the fake engine and byte tokenizer do the work


@dataclass
class Served:
    url: str
    port: int
    scheduler: Scheduler


@contextlib.asynccontextmanager
async def serving(scheduler: Scheduler) -> AsyncIterator[Served]:
    card = Catalog().get(MODEL)
    service = OneModelService(SchedulerHandle(card, ByteTokenizer(), scheduler, 512))
    app = create_app(service, body_timeout_s=TIMEOUT_S)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_level="warning",
        lifespan="off",
        http=header_timeout_protocol(TIMEOUT_S),
    )
    server = uvicorn.Server(config)
    serve = asyncio.create_task(server.serve())
    steps = asyncio.create_task(scheduler.run())
    try:
        for _ in range(1000):  # uvicorn says it has started with a flag only
            if server.started:
                break
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield Served(f"http://127.0.0.1:{port}", port, scheduler)
    finally:
        server.should_exit = True
        await serve
        steps.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await steps


def chat(max_tokens: int = 8, **extra: object) -> dict[str, object]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello"}],
        "temperature": 0,
        "max_tokens": max_tokens,
        **extra,
    }


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True when the server closes the connection (EOF or reset) within seconds."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(4096):
                pass
        return True
    except ConnectionError:
        return True
    except TimeoutError:
        return False


async def test_silent_and_slowloris_connections_are_closed_while_others_are_served() -> None:
    async with serving(fake_scheduler()) as served:
        silent = [await asyncio.open_connection("127.0.0.1", served.port) for _ in range(100)]
        partial = []
        for _ in range(100):
            reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            await writer.drain()
            partial.append((reader, writer))
        async with httpx.AsyncClient(base_url=served.url, timeout=10) as client:
            reply = await client.post("/v1/chat/completions", json=chat())
            assert reply.status_code == 200  # served while 200 connections hang
        started = time.monotonic()
        closed = await asyncio.gather(
            *(closed_within(r, TIMEOUT_S + 2.0) for r, _ in [*silent, *partial])
        )
        assert all(closed), f"{closed.count(False)} of 200 connections still open"
        assert time.monotonic() - started < TIMEOUT_S + 2.0
        for _, writer in [*silent, *partial]:
            writer.close()


async def test_a_keep_alive_client_is_not_cut_between_requests() -> None:
    async with (
        serving(fake_scheduler()) as served,
        httpx.AsyncClient(base_url=served.url, timeout=10) as client,
    ):
        for _ in range(3):  # one connection, requests spaced by less than the keep-alive
            assert (await client.get("/healthz")).status_code == 200
            await asyncio.sleep(TIMEOUT_S / 2)


async def test_a_body_that_stalls_gets_408() -> None:
    async with serving(fake_scheduler()) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: application/json\r\nContent-Length: 400\r\n\r\n"
        )
        writer.write(head.encode() + b'{"model": "')
        await writer.drain()
        async with asyncio.timeout(TIMEOUT_S + 5):
            response = await reader.read()
        writer.close()
        status = response.split(b"\r\n", 1)[0]
        assert b" 408 " in status
        body = json.loads(response.split(b"\r\n\r\n", 1)[1])
        assert "not sent within" in body["error"]["message"]


async def test_a_full_queue_answers_429_with_retry_after_and_then_serves() -> None:
    scheduler = fake_scheduler(fake_engine(delay_s=0.01), max_batch=1)
    scheduler._max_queue = 2  # 2 waiting (+ 1 decoding, once the scheduler has stepped)
    async with (
        serving(scheduler) as served,
        httpx.AsyncClient(base_url=served.url, timeout=30) as client,
    ):
        asks = [chat(max_tokens=40, stream=i % 2 == 1, stop=["never"]) for i in range(10)]
        replies = await asyncio.gather(
            *(client.post("/v1/chat/completions", json=ask) for ask in asks)
        )
        codes = [r.status_code for r in replies]
        assert set(codes) == {200, 429} and codes.count(200) >= 2
        for refused in (r for r in replies if r.status_code == 429):
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["type"] == "rate_limit_error"
        assert (await client.post("/v1/chat/completions", json=chat())).status_code == 200


async def test_a_stream_that_breaks_ends_with_an_error_event_and_done() -> None:
    engine = fake_engine()
    async with (
        serving(fake_scheduler(engine)) as served,
        httpx.AsyncClient(base_url=served.url, timeout=10) as client,
    ):
        engine.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("engine fault"))  # type: ignore[method-assign]
        reply = await client.post("/v1/chat/completions", json=chat(stream=True))
        del engine.forward
        events = [line[6:] for line in reply.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert "engine fault" in error["message"] and error["type"] == "server_error"
        again = await client.post("/v1/chat/completions", json=chat())
        assert again.status_code == 200  # and the node keeps serving
