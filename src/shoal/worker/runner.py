"""A stage runner: one engine serving one shard [start, end) over the data plane, as a subprocess.

With its parent (supervisor.py), in JSON lines. stdin: one RunnerConfig, then commands
{"cmd": "route", "next": "host:port" | null} and {"cmd": "stop"}; EOF also means stop (the parent
died). stdout: {"status": "loading", "done", "total"}, then {"status": "ready", "data_addr"} or
{"status": "failed", "reason"} (exit 1). Logs go to stderr: stdout carries only statuses.

Data plane (net/frames.py): each connection starts with HELLO. FORWARDs from a "client" run
through the engine one at a time in arrival order (prefill chunks on the engine thread, so the
loop stays free; decode-sized steps inline, see _on_engine); then a middle stage sends the hidden
states on to the next stage, and the last stage samples and sends a RESULT to the "listener"
connection of the frame's session. FREE frees every stage down the chain. Errors flow
back the way the frame came (the last stage answers through the listener), so the client always
hears why a step failed; the runner keeps serving.
"""

import asyncio
import contextlib
import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import ValidationError

from shoal.engines.base import Engine, StepInput, WeightSource
from shoal.engines.registry import create_engine
from shoal.inference.pipeline import Sampler
from shoal.inference.request import SamplingParams
from shoal.models.source import open_weights
from shoal.models.weight_cache import CachedWeights
from shoal.net import frames
from shoal.net.frames import Frame, FrameError, FrameReader, Kind
from shoal.types.ids import RequestId
from shoal.worker.supervisor import RunnerConfig

# under `python -m`, __name__ is "__main__"; the spec keeps the module's real name
log = logging.getLogger(__spec__.name if __spec__ is not None else __name__)

_T = TypeVar("_T")

READ_CHUNK = 1 << 20
CONNECT_TIMEOUT_S = 5.0


@dataclass
class Control:
    """What the parent has said so far: where outputs go, and whether to stop."""

    next_addr: str | None = None
    stopped: asyncio.Event = field(default_factory=asyncio.Event)


# ---- status lines (stdout) ----

_stdout_lock = threading.Lock()


def emit(status: str, **fields: Any) -> None:
    """One status line for the parent; called from the loading thread too."""
    with _stdout_lock:
        sys.stdout.write(json.dumps({"status": status, **fields}) + "\n")
        sys.stdout.flush()


def one_line(exc: BaseException) -> str:
    """An exception as one line of text."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def load_engine(config: RunnerConfig) -> Engine:
    """Open the weights and load the shard, reporting progress per layer."""
    source: WeightSource = open_weights(Path(config.model_path))
    if config.cache_dir is not None:
        source = CachedWeights(source, Path(config.model_path), Path(config.cache_dir))
    options: dict[str, Any]
    if config.engine == "llamacpp":  # offloads every layer it can, unless told to stay on cpu
        options = {"n_threads": config.threads, "n_gpu_layers": 0 if config.device == "cpu" else -1}
    elif config.engine == "torch":
        options = {"device": config.device, "dtype": config.dtype, "quant": config.quant}
    elif config.engine == "numpy":
        options = {"quant": config.quant, "threads": config.threads}
    else:
        options = {}
    engine = create_engine(config.engine, **options)
    if config.threads is not None and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(config.threads)
    engine.load(config.shard, source, lambda done, total: emit("loading", done=done, total=total))
    return engine


def wire(sampling: frames.WireSampling) -> SamplingParams:
    """The sampler's view of an item's wire sampling."""
    s = sampling
    return SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=s.seed)


# ---- data plane ----


class StageServer:
    """Serves one loaded engine on the data plane (the asyncio.start_server callback)."""

    def __init__(
        self,
        engine: Engine,
        config: RunnerConfig,
        control: Control,
        executor: ThreadPoolExecutor,
    ) -> None:
        self.engine = engine
        self.shard = config.shard
        self.config = config
        self.control = control
        self._executor = executor
        self._engine_lock = asyncio.Lock()  # one engine call at a time, inline or on the thread
        self._sampler = Sampler()
        self._listeners: dict[int, asyncio.StreamWriter] = {}  # session → its listener
        self._origins: dict[int, asyncio.StreamWriter] = {}  # session → its FORWARDs' sender
        self._handlers: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        # the next stage: its address, the connection, and the task reading it (held: the loop
        # keeps only weak references to tasks)
        self._next: tuple[str, asyncio.StreamWriter, asyncio.Task[None]] | None = None
        self._next_lock = asyncio.Lock()
        self._closing = False
        self._warned: set[str] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One incoming connection: HELLO, then frames until it closes."""
        task = asyncio.current_task()
        assert task is not None
        self._handlers[task] = writer
        role, session, parser = None, 0, FrameReader()
        try:
            while chunk := await reader.read(READ_CHUNK):
                for frame in parser.feed(chunk):
                    if role is None:
                        if not isinstance(frame.meta, frames.HelloMeta):
                            raise FrameError(f"expected HELLO first, got {frame.kind.name}")
                        role, session = frame.meta.role, frame.session
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
            del self._handlers[task]
            if self._listeners.get(session) is writer:
                del self._listeners[session]
            for s in [s for s, w in self._origins.items() if w is writer]:
                del self._origins[s]
            writer.close()

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
            await self._on_engine(self._free, frame.meta.rid, inline=True)
            if not self.shard.is_last:
                await self._send_next(frame, origin, report=False)
        else:
            log.debug("ignoring a %s frame from a client", frame.kind.name)

    async def _forward(self, frame: Frame, origin: asyncio.StreamWriter) -> None:
        """Run one batch; pass the hidden states on, or answer the listener with tokens."""
        inline = sum(item.length for item in frame.items) <= self.config.inline_tokens
        try:
            out = await self._on_engine(self._step, frame, inline=inline)
        except Exception as exc:  # the engine's failure is the step's, not the runner's
            log.warning("stage %s: step %d failed: %s", self.shard, frame.step, one_line(exc))
            reply = frames.error(frame.session, frame.step, f"stage {self.shard}: {one_line(exc)}")
            await self._send(self._listeners.get(frame.session, origin), reply)
            return
        if not self.shard.is_last:
            await self._send_next(out, origin)
        elif (listener := self._listeners.get(frame.session)) is not None:
            await self._send(listener, out)
        else:
            self._warn_once("listener", f"no listener for session {frame.session:x}")

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
        outputs = self.engine.forward(inputs)
        if not self.shard.is_last:
            hidden = np.concatenate(outputs)  # [sum T, hidden]
            return frames.forward(frame.session, frame.step, items, hidden, self.config.wire_dtype)
        tokens = [
            None if item.sampling is None else self._sampler(item.rid, logits, wire(item.sampling))
            for item, logits in zip(items, outputs, strict=True)
        ]
        return frames.result(frame.session, frame.step, tokens)

    def _free(self, rid: RequestId) -> None:
        self.engine.free(rid)
        self._sampler.free(rid)

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
                asyncio.open_connection(host, port), CONNECT_TIMEOUT_S
            )
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


# ---- the process ----


async def read_commands(stdin: asyncio.StreamReader, control: Control) -> None:
    """Apply the parent's commands until stop or EOF."""
    while line := await stdin.readline():
        try:
            cmd = json.loads(line)
            if cmd["cmd"] == "stop":
                break
            if cmd["cmd"] == "route":
                control.next_addr = cmd["next"]
                log.info("routed to %s", control.next_addr or "(the last stage)")
                continue
            raise ValueError(f"unknown command {cmd['cmd']!r}")
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring a bad command line %r: %s", line[:200], exc)
    control.stopped.set()


async def serve() -> int:
    """Read the config, load, listen, serve until stopped; the process exit code."""
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    line = await stdin.readline()
    if not line.strip() or line.strip() == b'{"cmd": "stop"}':
        return 0  # stopped before a config: a spare runner that was never needed
    try:
        config = RunnerConfig.model_validate_json(line)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "line"
        emit("failed", reason=f"bad runner config: {where}: {error['msg']}")
        return 1
    logging.getLogger().setLevel(config.log_level)
    control = Control()
    commands = asyncio.create_task(read_commands(stdin, control))
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
    emit("loading", done=0, total=config.end - config.start)
    loading = asyncio.ensure_future(loop.run_in_executor(executor, load_engine, config))
    stopped = asyncio.create_task(control.stopped.wait())
    first: list[asyncio.Future[Any]] = [loading, stopped]
    await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
    if not loading.done():  # stopped mid-load: the loading thread cannot be interrupted
        log.info("stopped while loading %s", config.shard)
        sys.stdout.flush()
        os._exit(0)
    try:
        engine = loading.result()
        stage = StageServer(engine, config, control, executor)
        server = await asyncio.start_server(stage.handle, config.host, 0)
    except Exception as exc:  # any load or bind failure becomes the failed status
        log.error("starting %s failed: %s", config.shard, exc)
        emit("failed", reason=one_line(exc))
        commands.cancel()
        stopped.cancel()
        executor.shutdown(wait=False)
        return 1
    port = server.sockets[0].getsockname()[1]
    addr = frames.format_addr(config.host, port)
    log.info("serving %s on %s", config.shard, addr)
    emit("ready", data_addr=addr)
    await stopped
    server.close()
    await stage.close()
    await loop.run_in_executor(executor, engine.close)
    executor.shutdown(wait=False)
    log.info("stopped %s", config.shard)
    return 0


def main() -> None:
    """Entry point of `python -m shoal.worker.runner [--preload ENGINE]`."""
    if len(sys.argv) == 3 and sys.argv[1] == "--preload":
        # a spare runner: import the engine's framework now, while it waits for a config
        with contextlib.suppress(Exception):
            create_engine(sys.argv[2])
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format=f"%(asctime)s runner[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
    code = asyncio.run(serve())
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # nothing left to save: skip joining idle framework threads at exit


if __name__ == "__main__":
    main()
