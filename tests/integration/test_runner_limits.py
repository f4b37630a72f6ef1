"""Real runner processes (fake engine, loopback) against a raw TCP client on their data ports.

The attacks of issue 14: caches left behind by a client that goes, a header declaring 4 GiB,
300 slowloris connections, request ids past the cap, out-of-range items. Each must fail alone
while a legitimate pipeline keeps getting the same answers.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from shoal.errors import ShoalError
from shoal.inference.remote import RemotePipeline
from shoal.net import frames
from shoal.net.frames import HEADER, DType, Kind, WireItem
from shoal.types.ids import RequestId
from shoal.worker.supervisor import RunnerConfig, RunnerProcess
from tests.helpers.dataplane import trust
from tests.helpers.tiny import BASE, MODEL_ID, N_LAYERS, VOCAB, write_fake_model
from tests.integration.test_stage_limits import GREEDY, Raw, prompt, step

log = logging.getLogger(__name__)
pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio(loop_scope="module")]

LIVE_CAP = 8
TIMEOUT_S = 1.0  # HELLO and stalled-frame timeouts, shortened
CONTEXT = BASE["max_position_embeddings"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config.json and one tiny safetensors file: all the fake engine reads."""
    return write_fake_model(tmp_path_factory.mktemp("fake-llama"))


def runner(model_dir: Path, start: int, end: int) -> RunnerProcess:
    config = RunnerConfig(
        model_path=str(model_dir),
        model_id=MODEL_ID,
        start=start,
        end=end,
        n_layers=N_LAYERS,
        engine="fake",
        max_live_requests=LIVE_CAP,
        hello_timeout_s=TIMEOUT_S,
        frame_timeout_s=TIMEOUT_S,
        credentials=trust().runner_dir,
    )
    return RunnerProcess(config, stop_timeout_s=3.0)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def chain(model_dir: Path) -> AsyncIterator[tuple[list[RunnerProcess], list[str]]]:
    """Two runners, [0, 2) routed to [2, 4), shared by this module's tests; stopped at the end."""
    runners = [runner(model_dir, 0, 2), runner(model_dir, 2, N_LAYERS)]
    try:
        for r in runners:
            await r.start()
        addrs = list(await asyncio.gather(*(r.wait_ready(60) for r in runners)))
        await runners[0].route(addrs[1])
        yield runners, addrs
    finally:
        await asyncio.gather(*(r.stop() for r in runners))


async def connected(addrs: list[str]) -> RemotePipeline:
    pipeline = RemotePipeline(addrs, tls=trust().client_ssl(), result_timeout_s=10)
    await pipeline.connect()
    return pipeline


def rss_kib(pid: int | None) -> int:
    """The process's resident memory (VmRSS)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))


async def test_a_client_gone_leaves_no_caches_on_any_stage(
    chain: tuple[list[RunnerProcess], list[str]],
) -> None:
    _, addrs = chain
    first = await connected(addrs)
    for i in range(LIVE_CAP):
        await first.forward([step(f"gone-{i}", prompt(), 0)])
    with pytest.raises(ShoalError, match="too many live requests"):  # (d): the cap answers
        await first.forward([step("one-too-many", prompt(), 0)])
    await first.close()  # the client goes without a FREE
    second = await connected(addrs)
    began = time.monotonic()
    while True:  # each stage frees the closed connection's caches as soon as it sees it go
        try:
            await second.forward([step("after-0", prompt(), 0)])
            break
        except ShoalError:
            assert time.monotonic() - began < 3.0, "the closed client's caches were kept"
            await asyncio.sleep(0.05)
    for i in range(1, LIVE_CAP):  # a full cap's worth again, on both stages
        await second.forward([step(f"after-{i}", prompt(), 0)])
    await second.close()


async def test_a_4_gib_header_is_refused_without_allocating(
    chain: tuple[list[RunnerProcess], list[str]],
) -> None:
    runners, addrs = chain
    pipeline = await connected(addrs)
    expected = await pipeline.forward([step("big", prompt(), 0, GREEDY)])
    await pipeline.free(RequestId("big"))
    for r, addr in zip(runners, addrs, strict=True):
        before = rss_kib(r.pid)
        raw = await Raw.open(addr)
        dtype = DType.INT64 if addr == addrs[0] else DType.FLOAT32
        began = time.monotonic()
        await raw.send(HEADER.pack(b"SHDP", 1, Kind.FORWARD, dtype, 0, 7, 1, 64, 4 << 30))
        with contextlib.suppress(ConnectionError):  # refused before this arrives, often
            await raw.send(b"x" * (1 << 20))  # the start of the "data"
        async with asyncio.timeout(2):
            assert await raw.closed_by_stage()
        closed_s = time.monotonic() - began
        await raw.close()
        after = rss_kib(r.pid)
        log.info(
            "stage %s: closed in %.1f ms, RSS %d -> %d KiB", addr, closed_s * 1e3, before, after
        )
        assert closed_s < 1.0
        assert after - before < 16 * 1024  # not the 4 GiB, nor a read buffer's worth of it
    assert await pipeline.forward([step("big", prompt(), 0, GREEDY)]) == expected
    await pipeline.free(RequestId("big"))
    await pipeline.close()


async def test_300_slowloris_connections_are_closed_while_a_client_is_served(
    chain: tuple[list[RunnerProcess], list[str]],
) -> None:
    _, addrs = chain
    host, port = frames.parse_addr(addrs[0])
    hello = frames.encode(frames.hello(1, "client"))
    floods = []
    began = time.monotonic()
    for i in range(300):  # nothing, or half a header
        reader, writer = await asyncio.open_connection(host, port, ssl=trust().client_ssl())
        writer.write(hello[:20] if i % 2 else b"")
        floods.append((reader, writer))
    flooded_s, began = time.monotonic() - began, time.monotonic()
    pipeline = await connected(addrs)
    assert (await pipeline.forward([step("loris", prompt(), 0, GREEDY)]))[0] is not None
    served_s = time.monotonic() - began

    async def until_closed(reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError):
            while await reader.read(1 << 16):
                pass

    async with asyncio.timeout(10):
        await asyncio.gather(*(until_closed(r) for r, _ in floods))
    closed_s = time.monotonic() - began
    for _, writer in floods:
        writer.close()
    log.info(
        "300 connections opened in %.2f s; then served in %.0f ms, all closed %.2f s after",
        flooded_s,
        served_s * 1e3,
        closed_s,
    )
    assert served_s < 1.0
    assert closed_s < TIMEOUT_S + 0.5
    await asyncio.sleep(TIMEOUT_S + 0.2)  # an idle established pipeline stays open
    assert (await pipeline.forward([step("loris", np.array([1]), 6, GREEDY)]))[0] is not None
    await pipeline.free(RequestId("loris"))
    await pipeline.close()


@pytest.mark.parametrize(
    ("item", "data", "match"),
    [
        (WireItem(rid=RequestId("bad"), start=0, length=2), np.array([3, VOCAB + 7]), "token id"),
        (WireItem(rid=RequestId("bad"), start=CONTEXT - 1, length=2), np.array([3, 4]), "context"),
    ],
    ids=["token-id", "past-context"],
)
async def test_an_out_of_range_item_gets_an_error_and_the_next_step_works(
    chain: tuple[list[RunnerProcess], list[str]], item: WireItem, data: np.ndarray, match: str
) -> None:
    _, addrs = chain
    pipeline = await connected(addrs)
    raw = await Raw.open(addrs[0])
    await raw.send(frames.forward(7, 1, [item], data))
    reply = await raw.receive()
    assert reply.kind == Kind.ERROR and isinstance(reply.meta, frames.ErrorMeta)
    assert match in reply.meta.message
    assert (await pipeline.forward([step("next", prompt(), 0, GREEDY)]))[0] is not None
    await pipeline.free(RequestId("next"))
    await raw.close()
    await pipeline.close()
