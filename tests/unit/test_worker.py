"""The worker: plan() as a table; crashed runners restarted with backoff, then given up."""

import asyncio
from pathlib import Path
from typing import Any

import pytest

from shoal.state.model import InstanceRecord, RunnerRecord, State
from shoal.types.events import Event, RunnerStatusChanged
from shoal.types.ids import InstanceId, ModelId, NodeId
from shoal.types.instance import Instance, StagePlan
from shoal.types.runner import Ready
from shoal.worker import worker as worker_module
from shoal.worker.plan import StageKey, plan
from shoal.worker.worker import RunnerOptions, Watch, Worker

A, B = NodeId("a"), NodeId("b")


def state(*stages: tuple[NodeId, int, int], ready: dict[int, str] | None = None) -> State:
    instance = Instance(
        instance_id=InstanceId("i"),
        model_id=ModelId("m"),
        n_layers=stages[-1][2],
        stages=tuple(StagePlan(node_id=n, start=s, end=e) for n, s, e in stages),
    )
    runners = {
        i: RunnerRecord(node_id=stages[i][0], status=Ready(), data_addr=addr)
        for i, addr in (ready or {}).items()
    }
    return State(
        instances={instance.instance_id: InstanceRecord(instance=instance, runners=runners)}
    )


@pytest.mark.parametrize(
    ("st", "me", "expected"),
    [
        (state((A, 0, 30)), A, {0: (None, True)}),
        (state((A, 0, 30)), B, {}),
        (state((A, 0, 10), (B, 10, 30)), A, {0: (None, False)}),  # next stage not ready yet
        (state((A, 0, 10), (B, 10, 30), ready={1: "b:1"}), A, {0: ("b:1", False)}),
        (state((A, 0, 10), (B, 10, 30), ready={1: "b:1"}), B, {1: (None, True)}),
        (state((A, 0, 10), (B, 10, 20), (A, 20, 30)), A, {0: (None, False), 2: (None, True)}),
    ],
)
def test_plan(st: State, me: NodeId, expected: dict[int, tuple[str | None, bool]]) -> None:
    got = {k.stage: (a.next_addr, a.last) for k, a in plan(st, me).items()}
    assert got == expected
    assert all(k == StageKey(InstanceId("i"), k.stage) for k in plan(st, me))


class CrashingRunner:
    """A runner process that dies right after it starts, without a status line."""

    started = 0

    def __init__(self, **_: Any) -> None:  # RunnerProcess's options (log_format)
        pass

    async def spawn(self, **_: Any) -> None:
        CrashingRunner.started += 1

    async def configure(self, config: Any) -> None:
        pass

    async def statuses(self):
        return
        yield

    async def stop(self) -> int:
        return -9

    async def route(self, addr: str | None) -> None:
        pass


async def fetch_here(_assignment: Any, _progress: Any) -> Path:
    return Path("/m")


@pytest.mark.timeout(20)
async def test_a_crashing_runner_is_retried_with_backoff_then_given_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker_module, "RunnerProcess", CrashingRunner)
    CrashingRunner.started = 0
    reports: list[Event] = []
    changed = asyncio.Event()

    async def report(event: Event) -> None:
        reports.append(event)

    async def wait_changed(_index: int) -> None:
        await changed.wait()

    worker = Worker(
        A,
        lambda: state((A, 0, 30)),
        wait_changed,
        report,
        fetch_here,
        options=RunnerOptions(keep_spare=False),
        watch=Watch(max_restarts=2, backoff_s=0.05),
    )
    task = asyncio.create_task(worker.run())
    try:
        async with asyncio.timeout(15):
            while not any(
                isinstance(r, RunnerStatusChanged) and r.status.kind == "failed" for r in reports
            ):
                changed.set()
                changed.clear()
                await asyncio.sleep(0.02)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    kinds = [r.status.kind for r in reports if isinstance(r, RunnerStatusChanged)]
    assert CrashingRunner.started == 3  # the first start and two restarts, then no more
    assert worker.restarts == 2  # what /metrics reports as shoal:runner_restarts_total
    assert kinds[-1] == "failed" and kinds.count("failed") == 1
    failed = reports[-1]
    assert isinstance(failed, RunnerStatusChanged)
    assert "crashed 3 times" in failed.status.reason  # type: ignore[union-attr]


class RecordingRunner:
    """A runner process that loads nothing and records the threads it is given."""

    made: list["RecordingRunner"] = []

    def __init__(self, **_: Any) -> None:
        self.config: Any = None
        self.told: list[int] = []
        self.stopped = asyncio.Event()
        RecordingRunner.made.append(self)

    async def spawn(self, **_: Any) -> None:
        pass

    async def configure(self, config: Any) -> None:
        self.config = config

    async def statuses(self):
        await self.stopped.wait()
        return
        yield

    async def set_threads(self, threads: int) -> None:
        self.told.append(threads)

    async def stop(self) -> int:
        self.stopped.set()
        return 0

    async def route(self, addr: str | None) -> None:
        pass


def instances(*placed: tuple[str, str | None]) -> State:
    """One whole-model instance per (id, device) on A."""
    records = {}
    for iid, device in placed:
        instance = Instance(
            instance_id=InstanceId(iid),
            model_id=ModelId("m"),
            n_layers=30,
            stages=(StagePlan(node_id=A, start=0, end=30, device=device),),
        )
        records[instance.instance_id] = InstanceRecord(instance=instance)
    return State(instances=records)


async def settle(worker: Worker, wanted: int) -> None:
    """Reconcile until `wanted` runners were made and the launches are done."""
    async with asyncio.timeout(5):
        while len(RecordingRunner.made) < wanted or worker._fetching:
            await worker._reconcile()
            await asyncio.sleep(0.01)


@pytest.mark.timeout(20)
async def test_runners_on_the_cpu_share_the_cores_and_get_them_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker_module, "RunnerProcess", RecordingRunner)
    monkeypatch.setattr(worker_module, "node_cores", lambda: 8)
    RecordingRunner.made = []
    current = instances(("one", None))

    async def report(_event: Event) -> None:
        pass

    async def never(_index: int) -> None:
        await asyncio.Event().wait()

    options = RunnerOptions(keep_spare=False)
    worker = Worker(A, lambda: current, never, report, fetch_here, options=options)
    try:
        await settle(worker, 1)
        first = RecordingRunner.made[0]
        assert first.config.threads is None and first.told == []  # alone: the engine's default
        current = instances(("one", None), ("two", "cpu"), ("gpu", "cuda:0"))
        await settle(worker, 3)
        by_device = {r.config.device: r for r in RecordingRunner.made[1:]}
        second, gpu = by_device["cpu"], by_device["cuda:0"]
        assert second.config.threads == 4 and first.told == [4]  # halves; the GPU takes none
        assert gpu.config.threads is None and gpu.told == []
        current = instances(("two", "cpu"), ("gpu", "cuda:0"))
        await worker._reconcile()
        await asyncio.gather(*worker._stopping)  # stopped in the background
        assert second.told == [8] and first.stopped.is_set()  # alone again: every core
    finally:
        await worker.shutdown()


@pytest.mark.timeout(20)
async def test_threads_the_user_chose_are_never_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_module, "RunnerProcess", RecordingRunner)
    monkeypatch.setattr(worker_module, "node_cores", lambda: 8)
    RecordingRunner.made = []

    async def report(_event: Event) -> None:
        pass

    async def never(_index: int) -> None:
        await asyncio.Event().wait()

    both = instances(("one", None), ("two", None))
    options = RunnerOptions(keep_spare=False, threads=3)
    worker = Worker(A, lambda: both, never, report, fetch_here, options=options)
    try:
        await settle(worker, 2)
        assert [(r.config.threads, r.told) for r in RecordingRunner.made] == [(3, []), (3, [])]
    finally:
        await worker.shutdown()
