"""The data plane of a stage runner: one loaded engine served to its peers over TCP.

Each connection starts with HELLO (net/frames.py). FORWARDs from a "client" run through the
engine one at a time in arrival order (prefill chunks on the engine thread, so the loop stays
free; decode-sized steps inline, see _on_engine); then a middle stage sends the hidden states on
to the next stage, and the last stage samples and sends a RESULT to the "listener" connection of
the frame's session. FREE frees every stage down the chain. Errors flow back the way the frame
came (the last stage answers through the listener), so the client always hears why a step
failed; the runner keeps serving.

Peers are members: with credentials (RunnerConfig.credentials) the runner serves and connects
over mutual TLS against the cluster CA (net/credentials.py), and a peer whose certificate names a
revoked node (Control.revoked, updated by the worker) is refused, its open connections closed.

Even a member is not trusted (worker/limits.py): frames larger than the model allows are refused
from their header, bad items and requests past the live-cache cap get an ERROR for their step, a
connection must say HELLO in time and may not stall midway through a frame, connections past a
cap are refused, and the caches a client connection created are freed, here and down the
chain, when it closes.
"""

import asyncio
import dataclasses
import logging
import ssl
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from shoal.engines.args import ModelArgs
from shoal.engines.base import Engine, StepInput
from shoal.engines.cache import cache_dims
from shoal.inference.pipeline import Sampled, Sampler, verified
from shoal.inference.prefix import Retained, budget_positions
from shoal.inference.request import SamplingParams
from shoal.net import frames
from shoal.net.credentials import BadCertificate, peer_node_id
from shoal.net.frames import Frame, FrameError, FrameReader, Kind
from shoal.types.ids import NodeId, RequestId
from shoal.types.model_config import ModelConfig
from shoal.worker.limits import LimitExceeded, LiveRequests, StageLimits
from shoal.worker.supervisor import RunnerConfig

log = logging.getLogger(__name__)

_T = TypeVar("_T")

READ_CHUNK = 1 << 20
CONNECT_TIMEOUT_S = 5.0


@dataclass
class Control:
    """What the parent has said so far: where outputs go, who is revoked, whether to stop."""

    next_addr: str | None = None
    revoked: frozenset[NodeId] = frozenset()
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    on_revoke: list[Callable[[frozenset[NodeId]], None]] = field(default_factory=list)

    def revoke(self, node_ids: tuple[NodeId, ...]) -> None:
        """Every revoked node from now on (a new list, not a change); tells on_revoke."""
        self.revoked = frozenset(node_ids)
        for hook in self.on_revoke:
            hook(self.revoked)


def one_line(exc: BaseException) -> str:
    """An exception as one line of text."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def stage_limits(config: RunnerConfig, model: ModelConfig) -> StageLimits:
    """What the runner of config accepts from a peer, for a shard of model, and the positions
    its prefix cache keeps (config's byte budget over what one position costs the shard)."""
    limits = StageLimits.of(
        model,
        first=config.shard.is_first,
        max_step_tokens=config.max_step_tokens,
        max_items=config.max_items,
        max_live_requests=config.max_live_requests,
    )
    dims = cache_dims(ModelArgs.from_config(model))
    layers = config.end - config.start
    keep = budget_positions(config.prefix_cache_bytes, layers, *dims)
    return dataclasses.replace(limits, keep_positions=keep)


def wire(sampling: frames.WireSampling) -> SamplingParams:
    """The sampler's view of an item's wire sampling."""
    s = sampling
    return SamplingParams(
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        seed=s.seed,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        repetition_penalty=s.repetition_penalty,
        min_p=s.min_p,
        logit_bias=s.logit_bias,
        logprobs=s.logprobs,
    )


def wire_logprob(token: Sampled | None) -> frames.WireLogprob | None:
    """A sampled token's logprobs as a RESULT carries them."""
    lp = None if token is None else token.logprob
    if lp is None:
        return None
    ids = tuple(t for t, _ in lp.top)
    return frames.WireLogprob(
        logprob=lp.logprob, top_ids=ids, top_logprobs=tuple(v for _, v in lp.top)
    )


class StageServer:
    """Serves one loaded engine on the data plane (the asyncio.start_server callback)."""

    def __init__(
        self,
        engine: Engine,
        config: RunnerConfig,
        control: Control,
        executor: ThreadPoolExecutor,
        limits: StageLimits,
        *,
        client_ssl: ssl.SSLContext | None,  # to the next stage; None: plain TCP (no credentials)
    ) -> None:
        self.engine = engine
        self.shard = config.shard
        self.config = config
        self.limits = limits
        self._live = LiveRequests(limits.max_live_requests)  # request caches, by connection
        self._retained = Retained(limits.keep_positions)  # kept for prefixes (inference/prefix.py)
        self.control = control
        self._executor = executor
        self._engine_lock = asyncio.Lock()  # one engine call at a time, inline or on the thread
        self._sampler = Sampler()
        self._listeners: dict[int, asyncio.StreamWriter] = {}  # session → its listener
        self._origins: dict[int, asyncio.StreamWriter] = {}  # session → its FORWARDs' sender
        self._handlers: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        # connections that have not said HELLO yet, oldest first
        self._greeting: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        # the next stage: its address, the connection, and the task reading it (held: the loop
        # keeps only weak references to tasks)
        self._next: tuple[str, asyncio.StreamWriter, asyncio.Task[None]] | None = None
        self._next_lock = asyncio.Lock()
        self._client_ssl = client_ssl
        self._peers: dict[asyncio.StreamWriter, NodeId] = {}  # TLS connections, in and out
        control.on_revoke.append(self._drop_revoked)
        self._closing = False
        self._warned: set[str] = set()

    @property
    def live_requests(self) -> int:
        """Request caches held on this stage now."""
        return len(self._live)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One incoming connection: HELLO in time, then frames until it closes."""
        task = asyncio.current_task()
        assert task is not None
        if not self._member(writer, "refusing"):
            writer.close()
            return
        if not self._admit(task, writer):
            self._peers.pop(writer, None)
            return
        role, session, parser = None, 0, self.limits.reader()
        hello_by = asyncio.get_running_loop().time() + self.config.hello_timeout_s
        try:
            while chunk := await self._read(reader, role is not None, parser.partial, hello_by):
                for frame in parser.feed(chunk):
                    if role is None:
                        if not isinstance(frame.meta, frames.HelloMeta):
                            raise FrameError(f"expected HELLO first, got {frame.kind.name}")
                        role, session = frame.meta.role, frame.session
                        self._greeting.pop(task, None)
                        if role == "listener":
                            self._listeners[session] = writer
                        await self._send(writer, frames.hello(session, "stage"))
                    elif role == "client":
                        await self._on_client_frame(frame, writer)
        except FrameError as exc:
            self._warn_once("frame", f"closing a connection that sent a bad frame: {exc}")
        except ConnectionError:
            pass
        finally:
            self._handlers.pop(task, None)
            self._greeting.pop(task, None)
            self._peers.pop(writer, None)
            if self._listeners.get(session) is writer:
                del self._listeners[session]
            for s in [s for s, w in self._origins.items() if w is writer]:
                del self._origins[s]
            writer.close()
            if role == "client":  # its requests can never be continued on this connection
                await self._release(writer)

    def _member(self, writer: asyncio.StreamWriter, doing: str) -> bool:
        """Whether the peer is a member not revoked (remembered per connection); plain TCP is
        taken as is: the runner then has no credentials, and TLS already refused strangers."""
        conn = writer.get_extra_info("ssl_object")
        if conn is None:
            return True
        try:
            peer = peer_node_id(conn)
        except BadCertificate as exc:
            self._warn_once("certificate", f"{doing} a peer: {exc}")
            return False
        if peer in self.control.revoked:
            self._warn_once(f"revoked {peer}", f"{doing} {peer}: it was removed from the cluster")
            return False
        self._peers[writer] = peer
        return True

    def _drop_revoked(self, revoked: frozenset[NodeId]) -> None:
        """Close every connection, in or out, to a node that is revoked now."""
        for writer, peer in list(self._peers.items()):
            if peer in revoked:
                log.warning("closing a connection to %s: it was removed from the cluster", peer)
                writer.close()
                if self._next is not None and self._next[1] is writer:
                    self._drop_next()

    def _admit(self, task: asyncio.Task[Any], writer: asyncio.StreamWriter) -> bool:
        """Take a new connection if there is room; when full, the oldest without HELLO goes."""
        if len(self._handlers) >= self.config.max_connections and self._greeting:
            oldest = next(iter(self._greeting))
            self._handlers.pop(oldest, None)
            self._greeting.pop(oldest).close()
            self._warn_once("full", "closing the oldest connection without HELLO to make room")
        if len(self._handlers) >= self.config.max_connections:
            self._warn_once("full", f"refusing a connection: {len(self._handlers)} open, the limit")
            writer.close()
            return False
        self._handlers[task] = writer
        self._greeting[task] = writer
        return True

    async def _read(
        self, reader: asyncio.StreamReader, greeted: bool, partial: bool, hello_by: float
    ) -> bytes:
        """The next chunk; b"" at EOF, when HELLO is late, or when a frame stalls midway.

        An established connection between frames waits as long as it likes: the API node and
        the previous stage keep theirs open across requests.
        """
        if not greeted:
            timeout = hello_by - asyncio.get_running_loop().time()
            why = f"no HELLO within {self.config.hello_timeout_s:g} s"
        elif partial:
            timeout = self.config.frame_timeout_s
            why = f"a frame stalled midway for {timeout:g} s"
        else:
            return await reader.read(READ_CHUNK)
        try:
            async with asyncio.timeout(timeout):
                return await reader.read(READ_CHUNK)
        except TimeoutError:
            self._warn_once("slow", f"closing a connection: {why}")
            return b""

    async def close(self) -> None:
        """Close every connection, in and out, and let their handlers finish."""
        self._closing = True
        self._drop_next()
        for writer in self._handlers.values():
            writer.close()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=CONNECT_TIMEOUT_S)

    async def _on_client_frame(self, frame: Frame, origin: asyncio.StreamWriter) -> None:
        if frame.kind == Kind.FORWARD:
            self._origins[frame.session] = origin
            await self._forward(frame, origin)
        elif isinstance(frame.meta, frames.FreeMeta):
            # whoever owns it; kept (prefix caching) as the budget allows
            await self._on_engine(self._free, frame.meta.rid, frame.meta.keep, inline=True)
            if not self.shard.is_last:
                await self._send_next(frame, origin, report=False)
        else:
            log.debug("ignoring a %s frame from a client", frame.kind.name)

    async def _forward(self, frame: Frame, origin: asyncio.StreamWriter) -> None:
        """Run one batch; pass the hidden states on, or answer the listener with tokens."""
        try:
            self.limits.check(frame)
            # the connection owns its requests from here on: taken over from an earlier one
            new = self._live.admit(origin, [item.rid for item in frame.items])
        except LimitExceeded as exc:
            self._warn_once("limit", f"stage {self.shard}: refusing a step: {exc}")
            await self._fail(frame, origin, str(exc))
            return
        inline = sum(item.length for item in frame.items) <= self.config.inline_tokens
        try:
            out = await self._on_engine(self._step, frame, inline=inline)
        except Exception as exc:  # the engine's failure is the step's, not the runner's
            log.warning("stage %s: step %d failed: %s", self.shard, frame.step, one_line(exc))
            await self._release(origin, new)  # a request's failed first step leaves no cache
            await self._fail(frame, origin, one_line(exc))
            return
        if not self.shard.is_last:
            await self._send_next(out, origin)
        elif (listener := self._listeners.get(frame.session)) is not None:
            await self._send(listener, out)
        else:
            self._warn_once("listener", f"no listener for session {frame.session:x}")

    async def _fail(self, frame: Frame, origin: asyncio.StreamWriter, why: str) -> None:
        """Tell the step's listener (or, without one, its sender) that the step failed."""
        reply = frames.error(frame.session, frame.step, f"stage {self.shard}: {why}")
        await self._send(self._listeners.get(frame.session, origin), reply)

    async def _on_engine(self, fn: Callable[..., _T], *args: Any, inline: bool) -> _T:
        """fn(*args) with the engine to itself: on the engine thread, or on the loop if inline.

        The engine thread also loaded the engine, so torch's compute stays on one thread (one
        OpenMP pool); the handoff costs about 0.2 ms a step, and the loop keeps serving meanwhile.
        """
        async with self._engine_lock:
            if inline:
                return fn(*args)
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _step(self, frame: Frame) -> Frame:
        """The engine's part of a FORWARD: the next stage's FORWARD, or the last stage's RESULT."""
        items = frame.items
        inputs = [
            StepInput(item.rid, data, item.start)
            for item, data in zip(items, frame.arrays(), strict=True)
        ]
        for item in items:
            if item.rewind:  # a speculative step's rejected drafts
                self.engine.truncate(item.rid, item.start)
            if item.fork is not None:  # from its prompt's prefill (n choices), or a kept prefix
                self._retained.touch(item.fork)
                self.engine.fork(item.fork, item.rid, item.start)
            if self.shard.is_last and item.prompt_len is not None:
                self._sampler.observe(item.rid, item.start, item.tokens, item.prompt_len)
        every = self.shard.is_last and any(item.verify for item in items)
        outputs = self.engine.forward(inputs, all_logits=every)
        if not self.shard.is_last:
            hidden = np.concatenate(outputs)  # [sum T, hidden]
            return frames.forward(frame.session, frame.step, items, hidden, self.config.wire_dtype)
        tokens = [
            None
            if item.sampling is None
            else verified(logits)
            if item.verify
            else self._sampler(
                item.rid,
                logits[-1] if every else logits,
                wire(item.sampling),
                item.start + item.length,
                None if item.mask is None else frames.decode_mask(item.mask),
            )
            for item, logits in zip(items, outputs, strict=True)
        ]
        logprobs = [wire_logprob(t) for t in tokens]
        if all(lp is None for lp in logprobs):
            logprobs = []
        following = [t.following if t is not None else () for t in tokens] if every else []
        return frames.result(frame.session, frame.step, tokens, logprobs, following)

    def _free(self, rid: RequestId, keep: bool = False) -> None:
        """Free the request's cache, or keep it for later requests to start from (it is then
        no longer live; the least recently used kept caches go past the budget)."""
        self._sampler.free(rid)
        self._live.forget(rid)
        self._retained.discard(rid)
        gone = self._retained.keep(rid, self.engine.cache_length(rid)) if keep else [rid]
        for old in gone:
            self.engine.free(old)

    async def _release(
        self, owner: asyncio.StreamWriter, rids: list[RequestId] | None = None
    ) -> None:
        """Free the caches owner still owns (all, or of rids), here and down the chain.

        Ownership is checked and the FREEs are written under the engine lock, with no wait in
        between, so a request another connection has taken over is left alone and its FREE can
        never overtake that connection's FORWARD to the next stage.
        """
        async with self._engine_lock:
            freed = self._live.release(owner, rids)
            for rid in freed:
                self._free(rid)
            nxt = self._next
            if freed and nxt is not None and not nxt[1].is_closing() and not self._closing:
                nxt[1].write(b"".join(frames.encode(frames.free(0, rid)) for rid in freed))
        if freed:
            log.debug("stage %s: freed %d requests of a closed connection", self.shard, len(freed))

    async def _send_next(
        self, frame: Frame, origin: asyncio.StreamWriter, report: bool = True
    ) -> None:
        """Send to the next stage, (re)connecting as needed; tell origin when it is unreachable."""
        addr = self.control.next_addr
        try:
            if addr is None:
                raise ConnectionError("no next stage routed")
            writer = await self._downstream(addr)
            writer.write(frames.encode(frame))
            await writer.drain()
        except (OSError, TimeoutError) as exc:
            self._drop_next()
            why = f"stage {self.shard} cannot reach the next stage {addr}: {one_line(exc)}"
            self._warn_once(f"next {addr}", why)
            if report:
                reply = frames.error(frame.session, frame.step, why, lost_stage=addr or "unrouted")
                await self._send(origin, reply)

    async def _downstream(self, addr: str) -> asyncio.StreamWriter:
        """The persistent connection to addr, opened on first use and after a break or reroute."""
        async with self._next_lock:
            if self._next is not None and self._next[0] == addr and not self._next[1].is_closing():
                return self._next[1]
            self._drop_next()
            if self._closing:
                raise ConnectionError("stopping")
            host, port = frames.parse_addr(addr)
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=self._client_ssl), CONNECT_TIMEOUT_S
            )
            if not self._member(writer, "not sending to"):
                writer.close()
                raise ConnectionError(f"the next stage {addr} is not a member")
            writer.write(frames.encode(frames.hello(0, "client")))
            watcher = asyncio.get_running_loop().create_task(self._watch_next(addr, reader, writer))
            self._next = (addr, writer, watcher)
            log.info("stage %s: connected to the next stage %s", self.shard, addr)
            return writer

    async def _watch_next(
        self, addr: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Relay the next stage's ERRORs back upstream; forget the connection when it ends."""
        parser = FrameReader()
        try:
            while chunk := await reader.read(READ_CHUNK):
                for frame in parser.feed(chunk):
                    origin = self._origins.get(frame.session)
                    if frame.kind == Kind.ERROR and origin is not None:
                        await self._send(origin, frame)
        except (FrameError, ConnectionError) as exc:
            log.debug("connection to the next stage %s: %s", addr, exc)
        finally:
            if self._next is not None and self._next[1] is writer:
                self._next = None
            self._peers.pop(writer, None)
            writer.close()

    def _drop_next(self) -> None:
        if self._next is not None:
            self._next[1].close()
            self._next = None

    async def _send(self, writer: asyncio.StreamWriter, frame: Frame) -> None:
        if writer.is_closing():
            return
        writer.write(frames.encode(frame))
        try:
            await writer.drain()
        except ConnectionError as exc:
            log.debug("send %s: %s", frame.kind.name, exc)

    def _warn_once(self, key: str, message: str) -> None:
        """Peer-caused noise: WARNING the first time, DEBUG after."""
        level = logging.DEBUG if key in self._warned else logging.WARNING
        self._warned.add(key)
        log.log(level, message)
