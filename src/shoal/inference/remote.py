"""RemotePipeline: the stages of one instance as stage runners on the data plane.

Two TCP connections per pipeline, each opened with a HELLO that the stage answers: a "client"
connection to stage 0 carries FORWARD and FREE frames, and a "listener" connection to the last
stage, registered under a random session id, brings back the RESULTs. Stages pass hidden states
to each other directly. Errors come back on either connection. A stage that is gone (refused,
reset, EOF, unreachable from its predecessor, or silent past the result timeout) raises
StageLost; the pipeline is then dead and the caller re-places the instance.

Both connections run TLS with the node's cluster certificate (`tls`: Credentials'
client_ssl_context()); a stage must hold a certificate from the cluster CA, and stages take
only members. The handshake is paid once per connection: connections are persistent.
"""

import asyncio
import contextlib
import logging
import secrets
import ssl
from collections.abc import Sequence
from typing import Literal

import numpy as np

from shoal.errors import ShoalError
from shoal.inference.pipeline import PipelineBroken, Sampled, Step
from shoal.inference.request import SamplingParams, TokenLogprob
from shoal.net import frames
from shoal.net.frames import Frame, FrameError, FrameReader, Kind, WireDType
from shoal.types.ids import RequestId

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20


class StageLost(PipelineBroken):
    """A stage of the pipeline cannot be reached any more."""

    def __init__(self, stage_addr: str, reason: str) -> None:
        super().__init__(f"stage {stage_addr} lost: {reason}")
        self.stage_addr = stage_addr
        self.reason = reason


class _Link:
    """One open connection to a stage, after its HELLO."""

    def __init__(self, addr: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.addr = addr
        self.reader = reader
        self.writer = writer
        self.parser = FrameReader()
        self.task: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        addr: str,
        role: Literal["client", "listener"],
        session: int,
        timeout_s: float,
        tls: ssl.SSLContext | None,
    ) -> "_Link":
        """Connect (TLS when given) and shake hands within timeout_s; StageLost if the stage does
        not answer, or its certificate is not from our cluster."""
        try:
            async with asyncio.timeout(timeout_s):
                host, port = frames.parse_addr(addr)
                reader, writer = await asyncio.open_connection(host, port, ssl=tls)
                link = cls(addr, reader, writer)
                await link.send(frames.hello(session, role))
                reply = (await link.receive())[0]
        except (OSError, TimeoutError, FrameError) as exc:
            raise StageLost(addr, f"cannot connect as {role}: {str(exc) or 'timed out'}") from None
        if reply.kind != Kind.HELLO:
            writer.close()
            raise StageLost(addr, f"answered HELLO with {reply.kind.name}")
        return link

    async def send(self, frame: Frame) -> None:
        self.writer.write(frames.encode(frame))
        await self.writer.drain()

    async def receive(self) -> list[Frame]:
        """The next frames; ConnectionError at EOF."""
        while True:
            chunk = await self.reader.read(READ_CHUNK)
            if not chunk:
                raise ConnectionError("connection closed by the stage")
            received = self.parser.feed(chunk)
            if received:
                return received

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.writer.close()


class RemotePipeline:
    """The Pipeline protocol over stage runners at stage_addrs (stage 0 first)."""

    def __init__(
        self,
        stage_addrs: Sequence[str],
        *,
        tls: ssl.SSLContext | None,  # the cluster's client context; None: plain TCP (debugging)
        wire_dtype: WireDType = "float32",
        connect_timeout_s: float = 5.0,
        result_timeout_s: float = 300.0,
    ) -> None:
        if not stage_addrs:
            raise ValueError("a pipeline needs at least one stage")
        self.stage_addrs = list(stage_addrs)
        self.depth = len(self.stage_addrs)  # batches sent at once overlap across the stages
        self.tls = tls
        self.wire_dtype = wire_dtype  # for hidden states fed to stage 0 (token ids go as int64)
        self.connect_timeout_s = connect_timeout_s
        self.result_timeout_s = result_timeout_s  # generous: a long prefill chunk on a slow node
        self.session = secrets.randbits(64)
        self._client: _Link | None = None
        self._listener: _Link | None = None
        self._pending: dict[int, asyncio.Future[list[Sampled | None]]] = {}
        self._step = 0
        self._lock = asyncio.Lock()
        self._lost: StageLost | None = None

    async def connect(self) -> None:
        """Open the listener (last stage) and client (stage 0) connections."""
        self._listener = await _Link.open(
            self.stage_addrs[-1], "listener", self.session, self.connect_timeout_s, self.tls
        )
        try:
            self._client = await _Link.open(
                self.stage_addrs[0], "client", self.session, self.connect_timeout_s, self.tls
            )
        except StageLost:
            self._listener.close()
            raise
        for link in (self._listener, self._client):
            link.task = asyncio.get_running_loop().create_task(self._watch(link))
        log.debug("pipeline session %x connected to %s", self.session, self.stage_addrs)

    async def forward(self, steps: Sequence[Step]) -> list[Sampled | None]:
        """Send one batch through every stage; the sampled token per step (None for prefill)."""
        (tokens,) = await self.forward_all([steps])
        return tokens

    async def forward_all(self, batches: Sequence[Sequence[Step]]) -> list[list[Sampled | None]]:
        """Send several batches at once, in order, then wait for all their results: each stage
        runs batch i while the next runs batch i - 1 (a long prompt's chunks, pipelined)."""
        async with self._lock:
            client = self._ready()
            loop = asyncio.get_running_loop()
            futures: dict[int, asyncio.Future[list[Sampled | None]]] = {}
            try:
                for steps in batches:
                    self._step += 1
                    frame = _forward_frame(self.session, self._step, steps, self.wire_dtype)
                    futures[frame.step] = self._pending[frame.step] = loop.create_future()
                    await client.send(frame)
                async with asyncio.timeout(self.result_timeout_s * len(batches)):
                    results = [await future for future in futures.values()]
            except ConnectionError as exc:
                raise self._lose(StageLost(client.addr, f"send failed: {exc}")) from None
            except TimeoutError:
                why = f"no result in {self.result_timeout_s:g} s"
                raise self._lose(StageLost(" -> ".join(self.stage_addrs), why)) from None
            finally:
                for step in futures:
                    self._pending.pop(step, None)
        for tokens, steps in zip(results, batches, strict=True):
            if len(tokens) != len(steps):
                raise ShoalError(
                    f"the last stage answered {len(tokens)} tokens for {len(steps)} items"
                )
        return results

    async def free(self, request_id: RequestId, keep: bool = False) -> None:
        """Drop the request's caches on every stage (fire and forget, in order with forwards);
        keep: hold them for later requests to start from."""
        async with self._lock:
            client = self._ready()
            try:
                await client.send(frames.free(self.session, request_id, keep))
            except ConnectionError as exc:
                raise self._lose(StageLost(client.addr, f"send failed: {exc}")) from None

    async def close(self) -> None:
        """Close both connections; pending forwards fail."""
        self._lose(StageLost(" -> ".join(self.stage_addrs), "pipeline closed"), quiet=True)
        for link in (self._client, self._listener):
            if link is not None:
                link.close()
                with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                    if link.task is not None:
                        await link.task
                    await link.writer.wait_closed()

    def _ready(self) -> _Link:
        if self._lost is not None:
            raise self._lost
        if self._client is None:
            raise RuntimeError("RemotePipeline.forward before connect()")
        return self._client

    async def _watch(self, link: _Link) -> None:
        """Deliver what a stage sends; any end of the connection loses the pipeline."""
        try:
            while True:
                for frame in await link.receive():
                    self._on_frame(link, frame)
        except (ConnectionError, FrameError) as exc:
            self._lose(StageLost(link.addr, str(exc)))

    def _on_frame(self, link: _Link, frame: Frame) -> None:
        future = self._pending.get(frame.step)
        if isinstance(frame.meta, frames.ResultMeta) and future is not None and not future.done():
            future.set_result(_sampled(frame.meta))
        elif isinstance(frame.meta, frames.ErrorMeta):
            meta = frame.meta
            if frame.flags & frames.FLAG_STAGE_LOST:
                self._lose(StageLost(meta.stage or link.addr, meta.message))
            elif future is not None and not future.done():
                future.set_exception(ShoalError(meta.message))
            else:
                log.warning("stage %s: %s", link.addr, meta.message)
        else:
            log.debug("ignoring %s for step %d from %s", frame.kind.name, frame.step, link.addr)

    def abort(self, reason: str) -> None:
        """Give up on this chain now (the cluster says a stage is gone): pending steps fail."""
        self._lose(StageLost(" -> ".join(self.stage_addrs), reason))

    def _lose(self, exc: StageLost, quiet: bool = False) -> StageLost:
        """Mark the pipeline dead (the first reason wins) and fail every pending step."""
        if self._lost is None:
            self._lost = exc
            if not quiet:
                log.warning("pipeline session %x: %s", self.session, exc)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(self._lost)
        return self._lost


def wire_sampling(params: SamplingParams) -> frames.WireSampling:
    """What the last stage needs of a request's sampling parameters."""
    return frames.WireSampling(
        temperature=float(params.temperature),
        top_p=float(params.top_p),
        top_k=params.top_k,
        seed=params.seed,
        presence_penalty=float(params.presence_penalty),
        frequency_penalty=float(params.frequency_penalty),
        repetition_penalty=float(params.repetition_penalty),
        min_p=float(params.min_p),
        logit_bias=tuple((int(t), float(b)) for t, b in params.logit_bias),
        logprobs=params.logprobs,
    )


def _wire_item(s: Step) -> frames.WireItem:
    penalized = s.prompt_len is not None
    return frames.WireItem(
        rid=s.item.request_id,
        start=s.item.start,
        length=s.item.length,
        sampling=None if s.sampling is None else wire_sampling(s.sampling),
        fork=s.fork,
        mask=None if s.mask is None else frames.encode_mask(s.mask),
        tokens=tuple(int(t) for t in s.item.data) if penalized else (),
        prompt_len=s.prompt_len,
        verify=s.verify,
        rewind=s.rewind,
    )


def _forward_frame(session: int, step: int, steps: Sequence[Step], wire_dtype: WireDType) -> Frame:
    """One FORWARD frame of a batch of steps."""
    items = [_wire_item(s) for s in steps]
    data = np.concatenate([s.item.data for s in steps])
    return frames.forward(session, step, items, data, wire_dtype)


def _sampled(meta: frames.ResultMeta) -> list[Sampled | None]:
    """A RESULT's tokens, with their logprobs where the stage sent them."""
    logprobs = (
        meta.logprobs if len(meta.logprobs) == len(meta.tokens) else (None,) * len(meta.tokens)
    )
    following = meta.following if len(meta.following) == len(meta.tokens) else ()
    out: list[Sampled | None] = []
    for i, (token, lp) in enumerate(zip(meta.tokens, logprobs, strict=True)):
        if token is None:
            out.append(None)
        elif following and following[i]:
            out.append(Sampled(token, following=following[i]))
        elif lp is None:
            out.append(Sampled(token))
        else:
            top = tuple(zip(lp.top_ids, lp.top_logprobs, strict=False))
            out.append(Sampled(token, TokenLogprob(token, lp.logprob, top)))
    return out
