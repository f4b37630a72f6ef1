"""Start, watch, route and stop one stage runner subprocess; restarting is the caller's choice.

The runner (worker/runner.py) reads a config and commands on stdin and reports statuses on stdout,
one typed message a line (worker/pipe.py); its logs go to this process's stderr unless told
otherwise. Closing its stdin stops it, so a runner never outlives a crashed parent for long.
"""

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from typing import IO, Any

from shoal.errors import ShoalError
from shoal.settings import LogFormat
from shoal.types.ids import NodeId
from shoal.types.message import Message
from shoal.worker.pipe import (
    FromRunner,
    Revoke,
    Route,
    RunnerConfig,
    RunnerExited,
    RunnerFailed,
    RunnerReady,
    Stop,
    Threads,
    up_decoder,
)

log = logging.getLogger(__name__)


class RunnerStartFailed(ShoalError):
    """The runner reported failure, or exited, before it was ready."""

    def __init__(self, message: str, outcome: RunnerFailed | RunnerExited) -> None:
        super().__init__(message)
        self.outcome = outcome


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
        log_format: LogFormat = "text",
    ) -> None:
        self.config = config
        self._python = python
        self._env = dict(env) if env is not None else None
        self._log_format = log_format
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
        # CUDA counts GPUs in PCI bus order, as NVML does: the profile's indexes (profile/nvidia.py)
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        self._proc = await asyncio.create_subprocess_exec(
            self._python,
            "-m",
            "shoal.worker.runner",
            *(["--preload", preload] if preload else []),
            *(["--log-format", self._log_format] if self._log_format != "text" else []),
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
        await self._send(config)

    async def statuses(self) -> AsyncGenerator[FromRunner, None]:
        """Each status the runner reports until its stdout closes; other lines dropped (logged)."""
        proc = self._started()
        assert proc.stdout is not None
        decode = up_decoder(log)
        while line := await proc.stdout.readline():
            status = decode(line)
            if status is not None:
                yield status

    async def wait_ready(self, timeout_s: float = 300.0) -> str:
        """The runner's data address once ready; RunnerStartFailed if it fails or exits first."""
        async with asyncio.timeout(timeout_s), contextlib.aclosing(self.statuses()) as statuses:
            async for status in statuses:
                if isinstance(status, RunnerReady):
                    return status.data_addr
                if isinstance(status, RunnerFailed):
                    raise RunnerStartFailed(f"runner for {self._what}: {status.reason}", status)
        exited = RunnerExited(await self._started().wait())
        raise RunnerStartFailed(
            f"runner for {self._what} exited with {exited.code} before ready", exited
        )

    async def route(self, next_addr: str | None) -> None:
        """Where the runner sends its outputs: the next stage, or None on the last stage."""
        await self._send(Route(next_addr=next_addr))

    async def revoke(self, node_ids: tuple[NodeId, ...]) -> None:
        """Every revoked node: the runner refuses them and closes their connections."""
        await self._send(Revoke(node_ids=node_ids))

    async def set_threads(self, threads: int) -> None:
        """The CPU threads the runner's engine computes on, from its next step."""
        await self._send(Threads(threads=threads))

    async def stop(self) -> int | None:
        """Ask the runner to stop; terminate, then kill it by pid if it does not. Its exit code."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return self.returncode
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self._send(Stop())
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

    async def _send(self, message: Message) -> None:
        stdin = self._started().stdin
        assert stdin is not None
        stdin.write(message.model_dump_json().encode() + b"\n")
        await stdin.drain()

    def _started(self) -> asyncio.subprocess.Process:
        if self._proc is None:
            raise RuntimeError("RunnerProcess used before start()")
        return self._proc


@contextlib.asynccontextmanager
async def runner_chain(
    base: RunnerConfig, cuts: Sequence[int], *, ready_s: float = 300.0, stop_timeout_s: float = 5.0
) -> AsyncIterator[list[str]]:
    """Runners of `base` holding layers cuts[i]..cuts[i+1], each routed to the next, outside a
    node (benchmarks, tests); their data addresses, first stage first. All stop on exit."""
    runners = [
        RunnerProcess(base.model_copy(update={"start": a, "end": b}), stop_timeout_s=stop_timeout_s)
        for a, b in zip(cuts, cuts[1:], strict=False)
    ]
    try:
        for r in runners:
            await r.start()
        addrs = await asyncio.gather(*(r.wait_ready(ready_s) for r in runners))
        for r, nxt in zip(runners, [*addrs[1:], None], strict=True):
            await r.route(nxt)
        yield list(addrs)
    finally:
        await asyncio.gather(*(r.stop() for r in runners), return_exceptions=True)
