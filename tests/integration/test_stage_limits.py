"""StageServers in this process (fake engines, loopback sockets) against clients that misbehave.

A client's caches go when its connection does, on every stage, unless a reconnected client took
its requests over; bad items, requests past the cap and oversized frames fail alone; silent and
stalled connections are closed while the real pipeline's idle connections stay open.
"""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from shoal.engines.base import StepInput
from shoal.engines.fake import FakeEngine
from shoal.errors import ShoalError
from shoal.inference.pipeline import Step
from shoal.inference.remote import RemotePipeline
from shoal.inference.request import SamplingParams
from shoal.net import frames
from shoal.net.frames import HEADER, DType, Frame, FrameReader, Kind, WireItem
from shoal.types.ids import RequestId
from shoal.worker.stage import Control, StageServer, stage_limits
from shoal.worker.supervisor import RunnerConfig
from tests.helpers.dataplane import trust
from tests.helpers.tiny import HIDDEN, MODEL_ID, N_LAYERS, VOCAB, tiny_config

pytestmark = pytest.mark.timeout(60)

GREEDY = SamplingParams(temperature=0.0)
CONTEXT = tiny_config().max_position_embeddings


@dataclass
class Stage:
    server: StageServer
    engine: FakeEngine
    listener: asyncio.Server
    addr: str


@asynccontextmanager
async def chain(*bounds: tuple[int, int], **limits: Any) -> AsyncIterator[list[Stage]]:
    """Stages over the given layer ranges, each routed to the next; closed on exit."""
    executor = ThreadPoolExecutor(1)
    stages: list[Stage] = []
    try:
        for start, end in reversed(bounds):  # the last first, so each can route to the next
            config = RunnerConfig(
                model_path="unused",
                model_id=MODEL_ID,
                start=start,
                end=end,
                n_layers=N_LAYERS,
                engine="fake",
                inline_tokens=1 << 20,
                credentials=trust().runner_dir,
                **limits,
            )
            engine = FakeEngine(vocab_size=VOCAB, hidden_size=HIDDEN)
            engine.load(config.shard)
            control = Control(next_addr=stages[0].addr if stages else None)
            limits_ = stage_limits(config, tiny_config())
            client_ssl = trust().runner.client_ssl_context()
            server = StageServer(engine, config, control, executor, limits_, client_ssl=client_ssl)
            listener = await asyncio.start_server(
                server.handle,
                "127.0.0.1",
                0,
                ssl=trust().runner.server_ssl_context(),
                ssl_handshake_timeout=config.hello_timeout_s,
            )
            port = listener.sockets[0].getsockname()[1]
            stages.insert(0, Stage(server, engine, listener, f"127.0.0.1:{port}"))
        yield stages
    finally:
        for stage in stages:
            stage.listener.close()
            await stage.server.close()
            await stage.listener.wait_closed()
        executor.shutdown()


class Raw:
    """A hand-driven data-plane connection: frames or bare bytes, as an attacker sends them."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.parser = reader, writer, FrameReader()

    @classmethod
    async def open(cls, addr: str, role: str | None = "client", session: int = 7) -> "Raw":
        host, port = frames.parse_addr(addr)
        raw = cls(*await asyncio.open_connection(host, port, ssl=trust().client_ssl()))
        if role is not None:
            await raw.send(frames.hello(session, role))  # type: ignore[arg-type]
            assert (await raw.receive()).kind == Kind.HELLO
        return raw

    async def send(self, data: Frame | bytes) -> None:
        self.writer.write(data if isinstance(data, bytes) else frames.encode(data))
        await self.writer.drain()

    async def receive(self) -> Frame:
        while True:
            chunk = await self.reader.read(1 << 16)
            if not chunk:
                raise ConnectionError("closed by the stage")
            if got := self.parser.feed(chunk):
                return got[0]

    async def closed_by_stage(self) -> bool:
        """Whether the stage closes the connection (reads to EOF)."""
        with contextlib.suppress(ConnectionError):
            while await self.reader.read(1 << 16):
                pass
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def step(rid: str, data: np.ndarray, start: int, sampling: SamplingParams | None = None) -> Step:
    return Step(StepInput(RequestId(rid), data, start), sampling)


def prompt(n: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, n)


async def connected(stages: list[Stage]) -> RemotePipeline:
    pipeline = RemotePipeline(
        [s.addr for s in stages], tls=trust().client_ssl(), result_timeout_s=10
    )
    await pipeline.connect()
    return pipeline


async def settled(condition: Any) -> None:
    """Until condition() holds, polled on the loop (callers bound it with asyncio.timeout)."""
    # a stage's counters have no event to wait on
    while not condition():  # noqa: ASYNC110
        await asyncio.sleep(0.01)


def live(stages: list[Stage]) -> list[int]:
    return [s.server.live_requests for s in stages]


async def test_a_closed_client_frees_its_caches_on_every_stage() -> None:
    async with chain((0, 2), (2, N_LAYERS)) as stages:
        pipeline = await connected(stages)
        rids = [f"r{i}" for i in range(20)]
        for rid in rids:
            await pipeline.forward([step(rid, prompt(), 0)])
        assert live(stages) == [20, 20]
        assert all(s.engine.cache_length(RequestId(r)) == 6 for s in stages for r in rids)
        await pipeline.close()
        async with asyncio.timeout(5):
            await settled(lambda: live(stages) == [0, 0])
        assert all(s.engine.cache_length(RequestId(r)) == 0 for s in stages for r in rids)


async def test_a_reconnected_client_keeps_what_it_took_over() -> None:
    """Failover's two ways on: replay after a FREE, or carry on; closing the old link frees
    neither."""
    async with chain((0, 2), (2, N_LAYERS)) as stages:
        old = await connected(stages)
        first = await old.forward([step("replayed", prompt(), 0, GREEDY)])
        await old.forward([step("carried", prompt(seed=1), 0)])
        new = await connected(stages)
        await new.free(RequestId("replayed"))
        assert await new.forward([step("replayed", prompt(), 0, GREEDY)]) == first
        await new.forward([step("carried", np.array([3]), 6)])
        await old.close()
        await asyncio.sleep(0.2)  # the old connection's release has run
        for s in stages:
            assert s.engine.cache_length(RequestId("replayed")) == 6
            assert s.engine.cache_length(RequestId("carried")) == 7
        assert (await new.forward([step("replayed", np.array([5]), 6, GREEDY)]))[0] is not None
        await new.close()
        async with asyncio.timeout(5):
            await settled(lambda: live(stages) == [0, 0])


async def test_requests_past_the_cap_get_an_error_and_the_rest_go_on() -> None:
    async with chain((0, N_LAYERS), max_live_requests=4) as stages:
        pipeline = await connected(stages)
        for i in range(4):
            await pipeline.forward([step(f"r{i}", prompt(), 0)])
        with pytest.raises(ShoalError, match="too many live requests"):
            await pipeline.forward([step("r4", prompt(), 0)])
        assert (await pipeline.forward([step("r0", np.array([1]), 6, GREEDY)]))[0] is not None
        await pipeline.free(RequestId("r0"))
        await pipeline.forward([step("r4", prompt(), 0)])  # room again
        assert live(stages) == [4]
        await pipeline.close()


@pytest.mark.parametrize(
    ("items", "data", "match"),
    [
        ([WireItem(rid=RequestId("x"), start=0, length=2)], np.array([1, VOCAB]), "token id"),
        ([WireItem(rid=RequestId("x"), start=0, length=2)], np.array([-5, 1]), "token id -5"),
        ([WireItem(rid=RequestId("x"), start=CONTEXT - 1, length=2)], np.array([1, 2]), "context"),
        ([WireItem(rid=RequestId("x"), start=0, length=1)], np.zeros((1, HIDDEN)), "int64"),
    ],
    ids=["vocab", "negative", "context", "floats"],
)
async def test_a_bad_item_fails_its_step_only(items: list[WireItem], data: Any, match: str) -> None:
    async with chain((0, 2), (2, N_LAYERS)) as stages:
        pipeline = await connected(stages)
        await pipeline.forward([step("good", prompt(), 0)])
        raw = await Raw.open(stages[0].addr)
        await raw.send(frames.forward(7, 1, items, data))
        reply = await raw.receive()
        assert reply.kind == Kind.ERROR and reply.step == 1
        assert isinstance(reply.meta, frames.ErrorMeta) and match in reply.meta.message
        assert live(stages) == [1, 1]  # nothing of the bad step was kept
        assert (await pipeline.forward([step("good", np.array([2]), 6, GREEDY)]))[0] is not None
        await raw.send(
            frames.forward(7, 2, [WireItem(rid=RequestId("x"), start=0, length=1)], np.array([1]))
        )
        async with asyncio.timeout(5):
            await settled(lambda: live(stages) == [2, 2])  # the same connection goes on
        await raw.close()
        await pipeline.close()


async def test_hidden_states_of_the_wrong_width_fail_on_a_later_stage() -> None:
    async with chain((0, 2), (2, N_LAYERS)) as stages:
        raw = await Raw.open(stages[1].addr)
        item = WireItem(rid=RequestId("w"), start=0, length=2)
        await raw.send(frames.forward(7, 3, [item], np.zeros((2, HIDDEN + 1), np.float32)))
        reply = await raw.receive()
        assert isinstance(reply.meta, frames.ErrorMeta) and "65 wide" in reply.meta.message
        await raw.close()


async def test_a_header_declaring_4_gib_closes_that_connection_only() -> None:
    async with chain((0, 2), (2, N_LAYERS)) as stages:
        pipeline = await connected(stages)
        expected = await pipeline.forward([step("a", prompt(), 0, GREEDY)])
        for stage in stages:
            raw = await Raw.open(stage.addr)
            header = HEADER.pack(b"SHDP", 1, Kind.FORWARD, DType.INT64, 0, 7, 1, 60, 4 << 30)
            began = time.monotonic()
            await raw.send(header + b"{" * 60)
            async with asyncio.timeout(2):
                assert await raw.closed_by_stage()
            assert time.monotonic() - began < 1.0
            await raw.close()
        await pipeline.free(RequestId("a"))
        assert await pipeline.forward([step("a", prompt(), 0, GREEDY)]) == expected
        await pipeline.close()


async def test_silent_and_stalled_connections_are_closed_while_the_pipeline_is_served() -> None:
    timing = {"hello_timeout_s": 0.5, "frame_timeout_s": 0.5, "max_connections": 64}
    async with chain((0, N_LAYERS), **timing) as stages:
        pipeline = await connected(stages)  # established before the flood, idle through it
        host, port = frames.parse_addr(stages[0].addr)
        hello = frames.encode(frames.hello(1, "client"))
        item = WireItem(rid=RequestId("s"), start=0, length=4)
        half = frames.encode(frames.forward(1, 1, [item], np.arange(4)))[:50]
        # ten say HELLO, then stop halfway through a frame; 300 say nothing or half a header
        sent = [hello + half] * 10 + [b"", hello[:20]] * 150
        floods = []
        for data in sent:
            reader, writer = await asyncio.open_connection(host, port, ssl=trust().client_ssl())
            writer.write(data)
            floods.append((reader, writer))
        began = time.monotonic()
        fresh = await connected(stages)  # a newcomer in the middle of the flood gets in
        assert (await fresh.forward([step("f", prompt(), 0, GREEDY)]))[0] is not None

        async def until_closed(reader: asyncio.StreamReader) -> None:
            with contextlib.suppress(ConnectionError):
                while await reader.read(1 << 16):
                    pass

        async with asyncio.timeout(5):
            await asyncio.gather(*(until_closed(r) for r, _ in floods))
        elapsed = time.monotonic() - began
        assert elapsed < 1.5, f"slowloris connections open for {elapsed:.2f} s"
        for _, writer in floods:
            writer.close()
        await asyncio.sleep(0.6)  # past both timeouts: the idle pipelines stay connected
        assert (await pipeline.forward([step("p", prompt(), 0, GREEDY)]))[0] is not None
        assert (await fresh.forward([step("f", np.array([1]), 6, GREEDY)]))[0] is not None
        await fresh.close()
        await pipeline.close()


async def test_connections_past_the_cap_are_refused() -> None:
    async with chain((0, N_LAYERS), max_connections=3, hello_timeout_s=30) as stages:
        pipeline = await connected(stages)  # two connections: client and listener
        third = await Raw.open(stages[0].addr)
        host, port = frames.parse_addr(stages[0].addr)
        reader, writer = await asyncio.open_connection(host, port, ssl=trust().client_ssl())
        async with asyncio.timeout(2):
            assert await reader.read(1) == b""  # refused: nobody without HELLO to make room for
        writer.close()
        assert (await pipeline.forward([step("c", prompt(), 0, GREEDY)]))[0] is not None
        await third.close()
        await pipeline.close()
