"""Replica.wait_past: waiting for the state by condition, so no change is ever missed."""

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal.net.memory import MemoryNetwork, MemoryTransport
from shoal.state.replica import Replica
from shoal.state.store import StateStore
from shoal.types.events import IndexedEvent, NodeJoined
from shoal.types.ids import NodeId
from tests.helpers.state import indexed

ME, MASTER = NodeId("me"), NodeId("master")

pytestmark = pytest.mark.timeout(10)


@pytest.fixture
def replica(tmp_path: Path) -> Iterator[Replica]:
    store = StateStore.open(tmp_path / "journal.db")
    replica = Replica(store, MemoryTransport(MemoryNetwork(), ME))
    replica.master = MASTER
    yield replica
    store.close()


def joined(*names: str, term: int = 1, after: tuple[int, int] = (0, 0)) -> list[IndexedEvent]:
    return indexed([NodeJoined(node_id=NodeId(n)) for n in names], term=term, after=after)


def take(replica: Replica, entries: list[IndexedEvent]) -> None:
    for entry in entries:
        replica.on_entry(MASTER, entry)


async def settle() -> None:
    """Let every ready task run once (no clock involved)."""
    for _ in range(3):
        await asyncio.sleep(0)


async def test_returns_at_once_when_already_past(replica: Replica) -> None:
    take(replica, joined("a", "b"))
    async with asyncio.timeout(1):
        await replica.wait_past(0)
        await replica.wait_past(1)


async def test_a_change_between_reading_and_waiting_is_not_missed(replica: Replica) -> None:
    take(replica, joined("a"))
    seen = replica.state.index  # the caller reads the state here...
    take(replica, joined("b", after=(1, 1)))  # ...a change lands before it waits...
    async with asyncio.timeout(1):
        await replica.wait_past(seen)  # ...and the wait still sees it


async def test_a_waiter_wakes_on_the_next_entry_only(replica: Replica) -> None:
    take(replica, joined("a"))
    waiter = asyncio.create_task(replica.wait_past(replica.state.index))
    await settle()
    assert not waiter.done()
    take(replica, joined("b", after=(1, 1)))
    async with asyncio.timeout(1):
        await waiter


async def test_a_later_index_waits_for_that_index(replica: Replica) -> None:
    waiter = asyncio.create_task(replica.wait_past(2))
    take(replica, joined("a", "b"))
    await settle()
    assert not waiter.done()  # at 2, not past it
    take(replica, joined("c", after=(2, 1)))
    async with asyncio.timeout(1):
        await waiter


async def test_entries_out_of_order_wake_once_the_gap_fills(replica: Replica) -> None:
    first, second = joined("a", "b")
    waiter = asyncio.create_task(replica.wait_past(0))
    take(replica, [second])  # buffered: index 1 is missing, the state has not moved
    await settle()
    assert not waiter.done()
    take(replica, [first])
    async with asyncio.timeout(1):
        await waiter


async def test_a_replaced_entry_wakes_a_waiter_at_the_same_index(replica: Replica) -> None:
    take(replica, joined("a", "b"))
    waiter = asyncio.create_task(replica.wait_past(replica.state.index))
    await settle()
    take(replica, joined("c", term=2, after=(1, 1)))  # a new master's entry 2 replaces ours
    assert replica.state.index == 2 and NodeId("c") in replica.state.nodes
    async with asyncio.timeout(1):
        await waiter


async def test_many_waiters_and_a_cancelled_one(replica: Replica) -> None:
    waiters = [asyncio.create_task(replica.wait_past(0)) for _ in range(5)]
    await settle()
    waiters[0].cancel()
    await asyncio.gather(waiters[0], return_exceptions=True)
    take(replica, joined("a"))
    async with asyncio.timeout(1):
        await asyncio.gather(*waiters[1:])
    assert replica._waiters == []  # nothing left behind


async def test_reached_waits_for_that_entry(replica: Replica) -> None:
    reached = asyncio.create_task(replica.reached(2))
    take(replica, joined("a"))
    await settle()
    assert not reached.done()
    take(replica, joined("b", after=(1, 1)))
    async with asyncio.timeout(1):
        await reached
