"""Start, watch, route and stop one stage runner subprocess; restarting is the caller's choice.

The runner (worker/runner.py) reads a config line and commands on stdin and reports JSON status
lines on stdout; its logs go to this process's stderr unless told otherwise. Closing its stdin
stops it, so a runner never outlives a crashed parent for long.
"""

import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import AsyncGenerator, Mapping
from typing import IO, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shoal.errors import ShoalError
from shoal.net.frames import WireDType
from shoal.types.ids import ModelId
from shoal.types.shard import Shard
from shoal.types.weights import DType, Quant

log = logging.getLogger(__name__)


class RunnerConfig(BaseModel):
    """What one runner loads and where it listens."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_path: str
    model_id: ModelId
    start: int
    end: int
    n_layers: int
    engine: str = "torch"
    device: str | None = None
    dtype: DType = "float32"  # torch only
    quant: Quant = "none"  # torch and numpy: engines/torch/quant.py, engines/numpy/llama.py
    host: str = "127.0.0.1"
    threads: int | None = None
    wire_dtype: WireDType = "float32"
    # Steps of at most this many tokens run on the loop's thread instead of the engine thread
    # (runner._on_engine). 0: torch's OpenMP pool belongs to the calling thread, and torch work
    # on two threads of one process makes two pools that slow each other down ~2x on 2 cores.
    inline_tokens: int = 0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    cache_dir: str | None = None  # dequantized weights cached here (models/weight_cache.py)
    # What one data-plane peer may ask of the runner (worker/limits.py, stage.StageServer):
    # tokens and items per step (frames larger than the tokens allow are refused from their
    # header), live request caches, open connections; a connection must say HELLO within
    # hello_timeout_s, and a frame that stops arriving midway for frame_timeout_s is dropped.
    max_step_tokens: int = Field(default=8192, gt=0)
    max_items: int = Field(default=256, gt=0)
    max_live_requests: int = Field(default=64, gt=0)
    max_connections: int = Field(default=64, gt=0)
    hello_timeout_s: float = Field(default=5.0, gt=0)
    frame_timeout_s: float = Field(default=10.0, gt=0)

    @property
    def shard(self) -> Shard:
        return Shard(model_id=self.model_id, start=self.start, end=self.end, n_layers=self.n_layers)

    @model_validator(mode="after")
    def _check_shard(self) -> "RunnerConfig":
        self.shard  # noqa: B018 -- Shard checks the layer range
        return self


class RunnerStartFailed(ShoalError):
    """The runner reported failure, or exited, before it was ready."""


class RunnerProcess:
    """One runner subprocess: its config in, its statuses out, route and stop commands."""

    def __init__(
        self,
        config: RunnerConfig | None = None,  # None: a spare, configured later
        *,
        python: str = sys.executable,
        env: Mapping[str, str] | None = None,
        stderr: IO[Any] | int | None = None,
        stop_timeout_s: float = 5.0,
    ) -> None:
        self.config = config
        self._python = python
        self._env = dict(env) if env is not None else None
        self._stderr = stderr
        self._stop_timeout_s = stop_timeout_s
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def _what(self) -> str:
        return str(self.config.shard) if self.config is not None else "a spare runner"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc is not None else None

    async def start(self) -> None:
        """Spawn the runner and hand it its config."""
        assert self.config is not None, "start() needs a config; spawn() a spare"
        await self.spawn(threads=self.config.threads)
        await self.configure(self.config)

    async def spawn(self, *, preload: str | None = None, threads: int | None = None) -> None:
        """Start the process only; with `preload` it imports that engine while it waits."""
        env = dict(os.environ if self._env is None else self._env)
        if threads is not None:  # numpy/BLAS read it at import
            env.setdefault("OMP_NUM_THREADS", str(threads))
        self._proc = await asyncio.create_subprocess_exec(
            self._python,
            "-m",
            "shoal.worker.runner",
            *(["--preload", preload] if preload else []),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            # its own session: Ctrl-C in the node's terminal (or a signal to the node's process
            # group) must reach the node, which then stops its runners in order through stdin
            start_new_session=True,
        )

    async def configure(self, config: RunnerConfig) -> None:
        """Hand a spawned runner the shard to load."""
        self.config = config
        log.info("runner %d starting %s", self._started().pid, config.shard)
        await self._send(config.model_dump(mode="json"))

    async def statuses(self) -> AsyncGenerator[dict[str, Any], None]:
        """Each status line the runner prints, parsed, until its stdout closes."""
        proc = self._started()
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            try:
                status = json.loads(line)
            except json.JSONDecodeError:
                log.warning("runner %d printed a non-status line: %r", proc.pid, line[:200])
                continue
            if isinstance(status, dict):
                yield status

    async def wait_ready(self, timeout_s: float = 300.0) -> str:
        """The runner's data address once ready; RunnerStartFailed if it fails or exits first."""
        async with asyncio.timeout(timeout_s), contextlib.aclosing(self.statuses()) as statuses:
            async for status in statuses:
                if status.get("status") == "ready":
                    return str(status["data_addr"])
                if status.get("status") == "failed":
                    reason = status.get("reason")
                    raise RunnerStartFailed(f"runner for {self._what}: {reason}")
        code = await self._started().wait()
        raise RunnerStartFailed(f"runner for {self._what} exited with {code} before ready")

    async def route(self, next_addr: str | None) -> None:
        """Where the runner sends its outputs: the next stage, or None on the last stage."""
        await self._send({"cmd": "route", "next": next_addr})

    async def stop(self) -> int | None:
        """Ask the runner to stop; terminate, then kill it by pid if it does not. Its exit code."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return self.returncode
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self._send({"cmd": "stop"})
        if proc.stdin is not None:
            proc.stdin.close()
        for signal_it in (None, proc.terminate, proc.kill):
            if signal_it is not None:
                with contextlib.suppress(ProcessLookupError):
                    signal_it()
            try:
                code = await asyncio.wait_for(proc.wait(), self._stop_timeout_s)
            except TimeoutError:
                continue
            log.info("runner %d exited with %d", proc.pid, code)
            return code
        return proc.returncode

    async def _send(self, message: dict[str, Any]) -> None:
        stdin = self._started().stdin
        assert stdin is not None
        stdin.write(json.dumps(message).encode() + b"\n")
        await stdin.drain()

    def _started(self) -> asyncio.subprocess.Process:
        if self._proc is None:
            raise RuntimeError("RunnerProcess used before start()")
        return self._proc
