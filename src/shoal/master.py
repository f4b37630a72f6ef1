"""The master actor: on the elected node only, it turns what happens into indexed log entries.

Inputs: peers coming and going (liveliness), nodes' local events, commands. Output: entries
appended to its own journal first, then published on global_events in order. A new master
continues from its own log — the cluster state survives master loss — and first reconciles the
membership it inherited with who is actually alive.
"""

import asyncio
import logging
from collections.abc import Callable, Sequence

from shoal.net.codec import encode
from shoal.net.transport import PeerEvent, Transport
from shoal.state.store import StateStore
from shoal.types.events import (
    Event,
    IndexedEvent,
    MasterElected,
    NodeForgotten,
    NodeJoined,
    NodeLost,
    NodeProfiled,
)
from shoal.types.ids import NodeId
from shoal.types.wire import PROTOCOL_VERSION, CommandMessage, Envelope, GlobalEvent, LocalEvent

log = logging.getLogger(__name__)

DEDUP_MEMORY = 4096  # (origin, seq) and command ids remembered to drop duplicates


class Master:
    """Orders events while this node is master; idle otherwise."""

    def __init__(
        self,
        store: StateStore,
        transport: Transport,
        cluster: str,
        on_applied: Callable[[list[IndexedEvent]], None],
    ) -> None:
        self._store = store
        self._transport = transport
        self._cluster = cluster
        self._on_applied = on_applied
        self.term: int | None = None  # set while this node is master
        self._outbox: asyncio.Queue[IndexedEvent] = asyncio.Queue()
        self._seen: dict[tuple[str, int | str], None] = {}

    @property
    def active(self) -> bool:
        return self.term is not None

    @property
    def me(self) -> NodeId:
        return self._transport.node_id

    def become(self, term: int) -> None:
        """Take over: record the election, then reconcile membership with who is alive."""
        self.term = term
        log.info("this node is master (term %d)", term)
        events: list[Event] = [MasterElected(node_id=self.me, term=term)]
        live = self._transport.peers() | {self.me}
        state = self._store.state
        for node_id, record in state.nodes.items():
            if record.connected and node_id not in live:
                events.append(NodeLost(node_id=node_id, reason=f"not reachable at term {term}"))
        for node_id in sorted(live):
            known = state.nodes.get(node_id)
            if known is None or not known.connected:
                events.append(NodeJoined(node_id=node_id))
        self.append(events)

    def step_down(self) -> None:
        if self.term is not None:
            log.info("this node is no longer master")
        self.term = None

    def append(self, events: Sequence[Event]) -> list[IndexedEvent]:
        """Index, apply and journal events, then queue them for publishing in order."""
        if self.term is None or not events:
            return []
        entries = self._store.append_as_master(events, self.term)
        for entry in entries:
            self._outbox.put_nowait(entry)
        self._on_applied(entries)
        self._store.maybe_compact()
        return entries

    async def run(self) -> None:
        """Publish appended entries, one at a time, in index order."""
        while True:
            entry = await self._outbox.get()
            envelope = Envelope(
                v=PROTOCOL_VERSION,
                cluster=self._cluster,
                sender=self.me,
                body=GlobalEvent(entry=entry),
            )
            await self._transport.publish("global_events", encode(envelope))

    # --- inputs ----------------------------------------------------------------------------

    def on_peer(self, change: PeerEvent) -> None:
        if not self.active:
            return
        record = self._store.state.nodes.get(change.node_id)
        if change.up and (record is None or not record.connected):
            self.append([NodeJoined(node_id=change.node_id)])
        elif not change.up and record is not None and record.connected:
            self.append([NodeLost(node_id=change.node_id, reason="left or unreachable")])

    def on_local(self, message: LocalEvent) -> None:
        if not self.active or self._duplicate((message.origin, message.seq)):
            return
        event = message.event
        if isinstance(event, NodeProfiled) and event.profile.node_id != message.origin:
            log.warning(
                "node %s sent a profile for %s: dropped", message.origin, event.profile.node_id
            )
            return
        self.append([event])

    def on_command(self, message: CommandMessage) -> None:
        if not self.active or self._duplicate(("command", message.command_id)):
            return
        command = message.command
        record = self._store.state.nodes.get(command.node_id)
        if record is not None and not record.connected:
            self.append([NodeForgotten(node_id=command.node_id)])

    def _duplicate(self, key: tuple[str, int | str]) -> bool:
        if key in self._seen:
            return True
        self._seen[key] = None
        if len(self._seen) > DEDUP_MEMORY:
            del self._seen[next(iter(self._seen))]
        return False
