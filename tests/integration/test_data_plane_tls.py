"""A runner's data port takes members only: mutual TLS against the cluster CA, revocations obeyed.

Real runner processes (fake engine) on loopback. A plain TCP client, a TLS client holding a
certificate from another cluster's CA, and a member after it is revoked are refused (no HELLO
back, never a step run); a member is served, and a revocation closes its open connections.
"""

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from shoal.inference.remote import RemotePipeline, StageLost
from shoal.net import frames
from shoal.net.credentials import Credentials
from shoal.net.frames import FrameReader, Kind
from shoal.worker.supervisor import RunnerConfig, RunnerProcess
from tests.helpers.dataplane import trust
from tests.helpers.tiny import MODEL_ID, N_LAYERS, write_fake_model
from tests.integration.test_stage_limits import GREEDY, prompt, step

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio(loop_scope="module")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config.json and one tiny safetensors file: all the fake engine reads."""
    return write_fake_model(tmp_path_factory.mktemp("fake-llama"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(model_dir: Path) -> AsyncIterator[tuple[RunnerProcess, str]]:
    """One whole-model runner with the cluster's credentials; stopped at the end."""
    config = RunnerConfig(
        model_path=str(model_dir),
        model_id=MODEL_ID,
        start=0,
        end=N_LAYERS,
        n_layers=N_LAYERS,
        engine="fake",
        hello_timeout_s=1.0,
        credentials=trust().runner_dir,
    )
    runner = RunnerProcess(config, stop_timeout_s=3.0)
    try:
        await runner.start()
        await runner.route(None)
        yield runner, await runner.wait_ready(60)
    finally:
        await runner.stop()


def unverifying(creds: Credentials) -> ssl.SSLContext:
    """A client presenting creds' certificate that takes any server (the server must refuse)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(creds.paths.node_cert, creds.paths.node_key)
    return ctx


async def refused(addr: str, tls: ssl.SSLContext | None) -> bool:
    """Whether the runner closes a connection that says HELLO without ever answering it."""
    host, port = frames.parse_addr(addr)
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection(host, port, ssl=tls)
            writer.write(frames.encode(frames.hello(9, "client")))
            await writer.drain()
            parser = FrameReader()
            while chunk := await reader.read(1 << 16):
                if any(f.kind == Kind.HELLO for f in parser.feed(chunk)):
                    writer.close()
                    return False
    except (ssl.SSLError, ConnectionError):
        return True
    with contextlib.suppress(ssl.SSLError, ConnectionError):
        writer.close()
        await writer.wait_closed()
    return True


async def test_the_runner_binds_the_address_it_was_given(
    served: tuple[RunnerProcess, str],
) -> None:
    assert served[1].startswith("127.0.0.1:")


async def test_a_member_is_served(served: tuple[RunnerProcess, str]) -> None:
    assert not await refused(served[1], trust().client_ssl())
    pipeline = RemotePipeline([served[1]], tls=trust().client_ssl(), result_timeout_s=10)
    await pipeline.connect()
    assert (await pipeline.forward([step("member", prompt(), 0, GREEDY)]))[0] is not None
    await pipeline.close()


async def test_a_plain_tcp_client_is_refused(served: tuple[RunnerProcess, str]) -> None:
    assert await refused(served[1], None)
    with pytest.raises(StageLost, match="cannot connect"):
        await RemotePipeline([served[1]], tls=None, connect_timeout_s=3).connect()


async def test_a_certificate_from_another_ca_is_refused(
    served: tuple[RunnerProcess, str],
) -> None:
    assert await refused(served[1], unverifying(trust().stranger))
    # and a member does not talk to a server of another cluster either
    with pytest.raises(StageLost, match="cannot connect"):
        stranger = trust().stranger.client_ssl_context()
        await RemotePipeline([served[1]], tls=stranger, connect_timeout_s=3).connect()


async def test_a_revoked_member_is_cut_off_and_refused(
    served: tuple[RunnerProcess, str],
) -> None:
    runner, addr = served
    pipeline = RemotePipeline([addr], tls=trust().client_ssl(), result_timeout_s=10)
    await pipeline.connect()
    assert (await pipeline.forward([step("before", prompt(), 0, GREEDY)]))[0] is not None
    await runner.revoke((trust().client.node_id,))
    with pytest.raises(StageLost):  # its open connections are closed
        async with asyncio.timeout(5):
            while True:
                await pipeline.forward([step("after", prompt(), 0, GREEDY)])
                await asyncio.sleep(0.05)
    await pipeline.close()
    assert await refused(addr, trust().client_ssl())
    await runner.revoke(())  # the list is replaced, not added to
    assert not await refused(addr, trust().client_ssl())
