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
