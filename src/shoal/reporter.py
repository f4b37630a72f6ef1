"""Local events on their way to the master: sent at once, re-sent to each new master.

A node's facts about itself (today: its profile) reach the log only through the master. The
latest fact of each kind is kept and handed again to every new master, so a master change
never loses one; the master drops exact repeats by (origin, seq).
"""

import asyncio
import logging
import time
from collections.abc import Callable

from shoal.net.codec import Sealer
from shoal.net.transport import Transport
from shoal.types.events import Event, RunnerStatusChanged
from shoal.types.ids import NodeId
from shoal.types.wire import LocalEvent

log = logging.getLogger(__name__)


class Reporter:
    """Delivers this node's local events to whoever is master."""

    def __init__(
        self, transport: Transport, sealer: Sealer, deliver_locally: Callable[[LocalEvent], None]
    ) -> None:
        self._transport = transport
        self._sealer = sealer
        self._deliver_locally = deliver_locally  # the Master, when this node is master
        self._seq = time.time_ns()  # unique across restarts, so dedup never eats a new event
        self._latest: dict[tuple[str, ...], LocalEvent] = {}
        self.master: NodeId | None = None

    async def report(self, event: Event) -> None:
        """Send event to the master now (or when one is elected)."""
        self._seq += 1
        message = LocalEvent(origin=self._transport.node_id, seq=self._seq, event=event)
        self._latest[_key(event)] = message
        await self._send(message)

    async def run(self, every_s: float = 2.0) -> None:
        """Re-send the latest facts now and then: a publish can be lost while routes to a new
        master are still forming, and the master drops the repeats it already has (same seq)."""
        while True:
            await asyncio.sleep(every_s)
            for message in list(self._latest.values()):
                await self._send(message)

    async def master_changed(self, master: NodeId | None) -> None:
        """Hand the latest of each kind to the new master."""
        self.master = master
        for message in list(self._latest.values()):
            await self._send(message)

    async def _send(self, message: LocalEvent) -> None:
        if self.master is None:
            return
        if self.master == self._transport.node_id:
            self._deliver_locally(message)
            return
        await self._transport.publish("local_events", self._sealer.seal(message))


def _key(event: Event) -> tuple[str, ...]:
    """Events that replace each other share a key: the latest one is all a new master needs."""
    if isinstance(event, RunnerStatusChanged):
        return (event.kind, event.instance_id, str(event.stage))
    return (event.kind,)
