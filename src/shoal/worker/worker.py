"""The worker actor: keeps this node's stage runners in line with the replicated state.

After every change to the state it compares `plan(state, me)` with the runner processes it
has: starts the missing ones, stops the ones no longer wanted, and tells each runner where its
output goes. Runner status lines become RunnerStatusChanged events through the master, so a
crashed runner is an event in the log, never a dead node.
"""

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.errors import ShoalError
from shoal.net.frames import WireDType
from shoal.settings import LogFormat
from shoal.state.model import State
from shoal.types.events import Event, RunnerStatusChanged
from shoal.types.ids import NodeId
from shoal.types.instance import Instance, StagePlan
from shoal.types.runner import Downloading, Failed, Loading, Ready, RunnerStatus
from shoal.types.weights import DType, Quant
from shoal.worker.pipe import (
    RunnerConfig,
    RunnerExited,
    RunnerFailed,
    RunnerLoading,
    RunnerReady,
    RunnerUsage,
)
from shoal.worker.plan import Assignment, StageKey, plan
from shoal.worker.supervisor import RunnerProcess

log = logging.getLogger(__name__)

Report = Callable[[Event], Awaitable[None]]
ProgressFn = Callable[[int, int], None]  # (bytes done, bytes to fetch)
# The path a stage loads its weights from, fetched first where they are not here
# (worker/fetch.py); raises ShoalError with one line when they cannot be had.
Fetch = Callable[[Assignment, ProgressFn], Coroutine[Any, Any, Path]]


@dataclass(frozen=True)
class RunnerOptions:
    """What every runner of this node starts with: where it listens, how its engine runs (the
    weight format is the model's: Worker's `quant`)."""

    host: str = "127.0.0.1"
    advertise: str | None = None  # the address others reach this node's runners at (None: host)
    device: str | None = None  # for stages placed on no device in particular
    simulated_gpus: bool = False  # the node's GPUs are simulated: their stages run on the CPU
    dtype: DType = "float32"
    threads: int | None = None
    wire_dtype: WireDType = "float32"
    cache_dir: Path | None = None  # dequantized weights cached here (models/weight_cache.py)
    # the data dir with this node's cluster credentials: runners speak mutual TLS with them and
    # refuse revoked nodes (worker/stage.py); None: plain TCP (node.py always passes it)
    credentials: Path | None = None
    keep_spare: bool = True  # one process with its engine imported, so a restart skips that
    log_format: LogFormat = "text"  # the runners' log lines, as the node's (log.py)
    prefix_cache_bytes: int = 0  # each runner keeps finished requests' caches up to this


@dataclass(frozen=True)
class Watch:
    """How the worker watches its runners: loading reports, restarts after a crash."""

    progress_steps: int = 4  # Loading events per load
    download_report_s: float = 1.0  # at most one Downloading event per this while fetching
    max_restarts: int = 3  # then the stage is Failed (and re-placed elsewhere)
    backoff_s: float = 0.5  # before the first restart, doubled for each next one


@dataclass(frozen=True)
class StageUsage:
    """One running stage and the positions its KV caches hold."""

    assignment: Assignment
    positions: int


@dataclass
class _Running:
    assignment: Assignment
    process: RunnerProcess
    route: str | None = None
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)
    on_cpu: bool = False  # its engine computes on the node's cores (shared: Worker._share_cores)
    threads: int | None = None  # what it was last told to compute on


def node_cores() -> int:
    """The cores this process may run on (a cgroup's or taskset's cpuset, else all)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def cpu_share(runners: int, cores: int) -> int | None:
    """Each of `runners` CPU runners' threads: the cores split evenly, at least one each; None
    for a runner alone (its engine's own default). Two runners that each took every core
    decoded ~5x slower together than one alone, on 2 cores: each OpenMP team spins on the
    cores the other needs."""
    return None if runners <= 1 else max(1, cores // runners)


def computes_on_cpu(device: str | None, engine: str, cpu_layers: int) -> bool:
    """Whether a stage's runner computes on the node's cores: a CPU stage, or a GPU stage's
    CPU part (engines/split.py). MLX and GPU stages need a thread at most."""
    if cpu_layers > 0:
        return True
    if engine == "mlx":
        return False
    return device is None or device == "cpu"


class Worker:
    """Starts, routes and stops the runner processes for the stages placed on this node."""

    def __init__(
        self,
        me: NodeId,
        state: Callable[[], State],
        wait_past: Callable[[int], Awaitable[None]],  # until the state is past an index
        report: Report,
        fetch: Fetch,
        *,
        quant: Callable[[Instance], Quant] = lambda _: "none",  # the weight format of a model
        options: RunnerOptions = RunnerOptions(),
        watch: Watch = Watch(),
    ) -> None:
        self._options = options
        self._watching = watch
        self._spare: RunnerProcess | None = None
        self._stopping: set[asyncio.Task[None]] = set()
        self._me = me
        self._state = state
        self._wait_past = wait_past
        self._report = report
        self._fetch = fetch
        self._fetching: dict[StageKey, asyncio.Task[None]] = {}  # weights on their way
        self._advertise = options.advertise or options.host
        self._quant = quant
        self._running: dict[StageKey, _Running] = {}
        self._done: set[StageKey] = set()  # given up on: not restarted (no crash loops)
        self._crashes: dict[StageKey, int] = {}
        self.restarts = 0  # runners restarted after a crash since the node started (/metrics)
        self._usage: dict[StageKey, int] = {}  # positions each runner's caches hold (/metrics)
        self._retry_at: dict[StageKey, float] = {}  # crashed runners wait here before a restart
        self._revoked: tuple[NodeId, ...] = ()  # what the runners were last told

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
        """Stop every download, every runner process (and the spare)."""
        fetching, self._fetching = self._fetching, {}
        for task in fetching.values():
            task.cancel()
        await asyncio.gather(*fetching.values(), return_exceptions=True)
        running, self._running = self._running, {}
        for item in running.values():
            await self._stop(item)
        await asyncio.gather(*self._stopping, return_exceptions=True)
        spare, self._spare = self._spare, None
        if spare is not None:
            await spare.stop()

    async def _spawn_spare(self, engine: str) -> None:
        """Keep one runner process started with its engine imported: a restart skips that."""
        if self._spare is None and self._options.keep_spare:
            self._spare = RunnerProcess(log_format=self._options.log_format)
            await self._spare.spawn(preload=engine, threads=self._options.threads)

    async def _reconcile(self) -> None:
        await self._revoke(self._state().revoked)
        wanted = plan(self._state(), self._me)
        for key in [k for k in self._fetching if k not in wanted]:
            log.info("stopping the download for %s: no longer placed here", key)
            self._fetching.pop(key).cancel()
        gone = [k for k in self._running if k not in wanted]
        for key in gone:
            log.info("stopping runner %s: no longer placed here", key)
            stopping = asyncio.create_task(self._stop(self._running.pop(key)))
            self._stopping.add(stopping)  # in the background: new runners need not wait
            stopping.add_done_callback(self._stopping.discard)
        if gone:
            await self._share_cores()
        self._done &= set(wanted)
        now = time.monotonic()
        for key, assignment in wanted.items():
            item = self._running.get(key)
            if (
                item is None
                and key not in self._done
                and key not in self._fetching
                and self._retry_at.get(key, 0) <= now
            ):
                self._start(assignment)
            elif item is not None and not assignment.last and item.route != assignment.next_addr:
                item.route = assignment.next_addr
                await item.process.route(assignment.next_addr)

    async def _revoke(self, revoked: tuple[NodeId, ...]) -> None:
        """Tell every runner when the revoked nodes change: they refuse them from then on."""
        if revoked == self._revoked:
            return
        self._revoked = revoked
        for item in self._running.values():
            with contextlib.suppress(ConnectionError, RuntimeError):  # an exiting runner
                await item.process.revoke(revoked)

    def _start(self, assignment: Assignment) -> None:
        """Get the weights (a download reports Downloading), then start the runner."""
        key = assignment.key
        task = asyncio.create_task(self._prepare(assignment), name=f"fetch {key}")
        self._fetching[key] = task
        task.add_done_callback(
            lambda t: self._fetching.pop(key) if self._fetching.get(key) is t else None
        )

    async def _prepare(self, assignment: Assignment) -> None:
        key = assignment.key
        latest: list[int] = [0, 0]

        def progress(done: int, total: int) -> None:
            latest[:] = [done, total]

        fetching = asyncio.create_task(self._fetch(assignment, progress))
        sent: tuple[int, int] | None = None
        try:
            while not fetching.done():
                await asyncio.wait({fetching}, timeout=self._watching.download_report_s)
                now = (latest[0], latest[1])
                if now[1] > 0 and now != sent and not fetching.done():
                    sent = now
                    await self._status(assignment, Downloading(done=now[0], total=now[1]))
            path = fetching.result()
        except asyncio.CancelledError:
            fetching.cancel()
            raise
        except Exception as exc:  # ShoalError says why in one line; anything else is a bug
            self._done.add(key)
            reason = str(exc) if isinstance(exc, ShoalError) else f"{type(exc).__name__}: {exc}"
            log.warning("cannot get the weights for %s: %s", key, reason)
            await self._status(assignment, Failed(reason=reason))
            return
        # not cancelled half-way: a spawned process must end up watched (or stopped)
        await asyncio.shield(self._launch(assignment, path))

    async def _launch(self, assignment: Assignment, path: Path) -> None:
        key, stage = assignment.key, assignment.plan
        options = self._options
        device = self._device(stage)
        on_cpu = computes_on_cpu(device, stage.engine, stage.cpu_layers)
        threads = options.threads
        if threads is None and on_cpu:  # its share, counting itself
            threads = cpu_share(1 + sum(r.on_cpu for r in self._running.values()), node_cores())
        config = RunnerConfig(
            model_path=str(path),
            model_id=assignment.instance.model_id,
            start=stage.start,
            end=stage.end,
            n_layers=assignment.instance.n_layers,
            engine=stage.engine,
            device=device,
            cpu_layers=stage.cpu_layers,
            gpu_split=stage.gpu_split,
            dtype=options.dtype,
            quant=self._quant(assignment.instance),
            host=options.host,
            threads=threads,
            wire_dtype=options.wire_dtype,
            cache_dir=str(options.cache_dir) if options.cache_dir is not None else None,
            credentials=str(options.credentials) if options.credentials is not None else None,
            revoked=self._revoked,
            prefix_cache_bytes=options.prefix_cache_bytes,
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
            process = RunnerProcess(log_format=self._options.log_format)
            await process.spawn(threads=self._options.threads)
        await process.configure(config)
        await self._spawn_spare(stage.engine)
        item = _Running(assignment, process, on_cpu=on_cpu, threads=threads)
        self._running[key] = item
        await self._share_cores()  # the others give up what this one takes
        await self._status(assignment, Loading(done=0, total=stage.layers))
        item.watcher = asyncio.create_task(self._watch(item), name=f"runner {key}")
        if key not in plan(self._state(), self._me):  # unplaced while it started
            await self._stop(self._running.pop(key))
            await self._share_cores()

    async def _share_cores(self) -> None:
        """Split the node's cores evenly among the runners that compute on them, telling each
        whose share changed (a runner started or ended). --threads turns this off."""
        if self._options.threads is not None:
            return
        on_cpu = [item for item in self._running.values() if item.on_cpu]
        cores = node_cores()
        share = cpu_share(len(on_cpu), cores)
        for item in on_cpu:
            if item.threads == share:
                continue  # also a runner alone that was never cut: its engine's default
            item.threads = share
            threads = share or cores  # alone again after sharing: every core
            log.info("runner %s computes on %d threads now", item.assignment.key, threads)
            with contextlib.suppress(ConnectionError, RuntimeError):  # an exiting runner
                await item.process.set_threads(threads)

    def kv_usage(self) -> list[StageUsage]:
        """The positions each running stage's KV caches hold, as its runner last said."""
        return [
            StageUsage(item.assignment, self._usage[key])
            for key, item in self._running.items()
            if key in self._usage
        ]

    def _device(self, stage: StagePlan) -> str | None:
        """The device the stage's runner opens: placement's, else the node's --device."""
        device = stage.device or self._options.device
        if self._options.simulated_gpus and device is not None and device.startswith("cuda"):
            log.info("%s is a simulated GPU: the stage runs on the CPU", device)
            return "cpu"
        return device

    async def _watch(self, item: _Running) -> None:
        """Turn the runner's statuses into events; its exit into Failed."""
        a = item.assignment
        step = max(1, a.plan.layers // self._watching.progress_steps)
        failed: RunnerFailed | None = None
        try:
            async for status in item.process.statuses():
                match status:
                    case RunnerLoading(done=done, total=total):
                        if done % step == 0 and 0 < done < total:
                            log.info("runner %s loading: %d/%d layers", a.key, done, total)
                            await self._status(a, Loading(done=done, total=total))
                    case RunnerReady(data_addr=addr, engine=engine):
                        port = addr.rpartition(":")[2]
                        log.info("runner %s ready on port %s (%s)", a.key, port, engine)
                        await self._status(a, Ready(engine=engine), f"{self._advertise}:{port}")
                    case RunnerUsage(positions=positions):
                        self._usage[a.key] = positions
                    case RunnerFailed():
                        failed = status
        finally:
            self._usage.pop(a.key, None)
            code = await item.process.stop()  # reaps it (it has exited, or is made to)
            if self._running.get(a.key) is item:  # not stopped on purpose: a crash or failure
                del self._running[a.key]
                await self._share_cores()
                await self._crashed(a, failed or RunnerExited(code))

    async def _crashed(self, a: Assignment, outcome: RunnerFailed | RunnerExited) -> None:
        """Restart a runner that exited (after loading, or while), with backoff; give up after a
        few. One that reported a failure is not restarted: it would fail again."""
        why, loaded = outcome.reason, isinstance(outcome, RunnerExited)
        crashes = self._crashes[a.key] = self._crashes.get(a.key, 0) + 1
        if loaded and crashes <= self._watching.max_restarts:
            delay = self._watching.backoff_s * 2 ** (crashes - 1)
            log.warning(
                "runner %s crashed (%s): restart %d/%d in %.1f s",
                a.key,
                why,
                crashes,
                self._watching.max_restarts,
                delay,
            )
            self._retry_at[a.key] = time.monotonic() + delay
            self.restarts += 1
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
