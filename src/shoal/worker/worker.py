"""The worker actor: keeps this node's stage runners in line with the replicated state.

After every change to the state it compares `plan(state, me)` with the runner processes it
has: starts the missing ones, stops the ones no longer wanted, and tells each runner where its
output goes. Runner status lines become RunnerStatusChanged events through the master, so a
crashed runner is an event in the log, never a dead node.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from shoal.net.frames import WireDType
from shoal.state.model import State
from shoal.types.events import Event, RunnerStatusChanged
from shoal.types.ids import ModelId, NodeId
from shoal.types.runner import Failed, Loading, Ready, RunnerStatus
from shoal.types.weights import DType, Quant
from shoal.worker.plan import Assignment, StageKey, plan
from shoal.worker.supervisor import RunnerConfig, RunnerProcess

log = logging.getLogger(__name__)

Report = Callable[[Event], Awaitable[None]]
Locate = Callable[[ModelId], Path | None]  # where this node has the model's weights


@dataclass
class _Running:
    assignment: Assignment
    process: RunnerProcess
    route: str | None = None
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)


class Worker:
    """Starts, routes and stops the runner processes for the stages placed on this node."""

    def __init__(
        self,
        me: NodeId,
        state: Callable[[], State],
        wait_past: Callable[[int], Awaitable[None]],  # until the state is past an index
        report: Report,
        locate: Locate,
        *,
        host: str = "127.0.0.1",
        advertise: str | None = None,
        device: str | None = None,
        dtype: DType = "float32",
        quant: Callable[[ModelId], Quant] = lambda _: "none",
        threads: int | None = None,
        wire_dtype: WireDType = "float32",
        progress_steps: int = 4,
        max_restarts: int = 3,
        backoff_s: float = 0.5,
        cache_dir: Path | None = None,
        keep_spare: bool = True,
    ) -> None:
        self._cache_dir = cache_dir
        self._keep_spare = keep_spare
        self._spare: RunnerProcess | None = None
        self._stopping: set[asyncio.Task[None]] = set()
        self._me = me
        self._state = state
        self._wait_past = wait_past
        self._report = report
        self._locate = locate
        self._host = host
        self._advertise = advertise or host  # the address others reach this node's runners at
        self._device = device
        self._dtype = dtype
        self._quant = quant  # the torch weight format of a model
        self._threads = threads
        self._wire_dtype = wire_dtype
        self._progress_steps = progress_steps
        self._running: dict[StageKey, _Running] = {}
        self._done: set[StageKey] = set()  # given up on: not restarted (no crash loops)
        self._crashes: dict[StageKey, int] = {}
        self._retry_at: dict[StageKey, float] = {}  # crashed runners wait here before a restart
        self._max_restarts = max_restarts
        self._backoff_s = backoff_s

    async def run(self) -> None:
        """Reconcile after every state change, and when a crashed runner's backoff ends."""
        try:
            while True:
                seen = self._state().index
                await self._reconcile()
                now = time.monotonic()
                backoff = min((t - now for t in self._retry_at.values() if t > now), default=None)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(backoff):
                        await self._wait_past(seen)
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        """Stop every runner process (and the spare)."""
        running, self._running = self._running, {}
        for item in running.values():
            await self._stop(item)
        await asyncio.gather(*self._stopping, return_exceptions=True)
        spare, self._spare = self._spare, None
        if spare is not None:
            await spare.stop()

    async def _spawn_spare(self, engine: str) -> None:
        """Keep one runner process started with its engine imported: a restart skips that."""
        if self._spare is None and self._keep_spare:
            self._spare = RunnerProcess()
            await self._spare.spawn(preload=engine, threads=self._threads)

    async def _reconcile(self) -> None:
        wanted = plan(self._state(), self._me)
        for key in [k for k in self._running if k not in wanted]:
            log.info("stopping runner %s: no longer placed here", key)
            stopping = asyncio.create_task(self._stop(self._running.pop(key)))
            self._stopping.add(stopping)  # in the background: new runners need not wait
            stopping.add_done_callback(self._stopping.discard)
        self._done &= set(wanted)
        now = time.monotonic()
        for key, assignment in wanted.items():
            item = self._running.get(key)
            if item is None and key not in self._done and self._retry_at.get(key, 0) <= now:
                await self._start(assignment)
            elif item is not None and not assignment.last and item.route != assignment.next_addr:
                item.route = assignment.next_addr
                await item.process.route(assignment.next_addr)

    async def _start(self, assignment: Assignment) -> None:
        key, stage = assignment.key, assignment.plan
        path = self._locate(assignment.instance.model_id)
        if path is None:
            self._done.add(key)
            reason = f"the weights of {assignment.instance.model_id} are not on this node"
            await self._status(assignment, Failed(reason=reason))
            return
        config = RunnerConfig(
            model_path=str(path),
            model_id=assignment.instance.model_id,
            start=stage.start,
            end=stage.end,
            n_layers=assignment.instance.n_layers,
            engine=stage.engine,
            device=self._device,
            dtype=self._dtype,
            quant=self._quant(assignment.instance.model_id),
            host=self._host,
            threads=self._threads,
            wire_dtype=self._wire_dtype,
            cache_dir=str(self._cache_dir) if self._cache_dir is not None else None,
        )
        log.info(
            "starting runner %s: layers [%d, %d) of %s on %s",
            key,
            stage.start,
            stage.end,
            assignment.instance.model_id,
            stage.engine,
        )
        process, self._spare = self._spare, None
        if process is None:
            process = RunnerProcess()
            await process.spawn(threads=self._threads)
        await process.configure(config)
        await self._spawn_spare(stage.engine)
        item = _Running(assignment, process)
        self._running[key] = item
        await self._status(assignment, Loading(done=0, total=stage.layers))
        item.watcher = asyncio.create_task(self._watch(item), name=f"runner {key}")

    async def _watch(self, item: _Running) -> None:
        """Turn the runner's status lines into events; its exit into Failed."""
        a = item.assignment
        step = max(1, a.plan.layers // self._progress_steps)
        reason = "the runner exited"
        try:
            async for status in item.process.statuses():
                match status.get("status"):
                    case "loading":
                        done, total = int(status["done"]), int(status["total"])
                        if done % step == 0 and 0 < done < total:
                            log.info("runner %s loading: %d/%d layers", a.key, done, total)
                            await self._status(a, Loading(done=done, total=total))
                    case "ready":
                        port = str(status["data_addr"]).rpartition(":")[2]
                        log.info("runner %s ready on port %s", a.key, port)
                        await self._status(a, Ready(), f"{self._advertise}:{port}")
                    case "failed":
                        reason = str(status.get("reason", reason))
        finally:
            code = await item.process.stop()  # reaps it (it has exited, or is made to)
            if self._running.get(a.key) is item:  # not stopped on purpose: a crash or failure
                del self._running[a.key]
                why = reason if reason != "the runner exited" else f"runner exited with {code}"
                await self._crashed(a, why, loaded=reason == "the runner exited")

    async def _crashed(self, a: Assignment, why: str, *, loaded: bool) -> None:
        """Restart a runner that crashed after loading, with backoff; give up after a few."""
        crashes = self._crashes[a.key] = self._crashes.get(a.key, 0) + 1
        if loaded and crashes <= self._max_restarts:
            delay = self._backoff_s * 2 ** (crashes - 1)
            log.warning(
                "runner %s crashed (%s): restart %d/%d in %.1f s",
                a.key,
                why,
                crashes,
                self._max_restarts,
                delay,
            )
            self._retry_at[a.key] = time.monotonic() + delay
            await self._status(a, Loading(done=0, total=a.plan.layers))
            return
        self._done.add(a.key)
        if loaded:
            why = f"crashed {crashes} times, last: {why}"
        log.warning("runner %s failed: %s", a.key, why)
        await self._status(a, Failed(reason=why))

    async def _stop(self, item: _Running) -> None:
        if item.watcher is not None:
            item.watcher.cancel()
        await item.process.stop()

    async def _status(
        self, a: Assignment, status: RunnerStatus, data_addr: str | None = None
    ) -> None:
        await self._report(
            RunnerStatusChanged(
                instance_id=a.key.instance_id,
                stage=a.key.stage,
                node_id=self._me,
                status=status,
                data_addr=data_addr,
            )
        )
