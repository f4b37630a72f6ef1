"""The master actor: on the elected node only, it turns what happens into indexed log entries.

Inputs: peers coming and going (liveliness), nodes' local events, commands. Output: entries
appended to its own journal first, then published on global_events in order. A new master
continues from its own log — the cluster state survives master loss — and first reconciles the
membership it inherited with who is actually alive.
"""

import asyncio
import logging
from collections.abc import Callable, Sequence

from shoal.net.codec import Sealer
from shoal.net.transport import PeerEvent, Transport
from shoal.state.model import State
from shoal.state.store import StateStore
from shoal.types.commands import (
    AdmitMember,
    CommandResult,
    DeleteInstance,
    ForgetNode,
    PlaceModel,
    RemoveMember,
)
from shoal.types.events import (
    Event,
    IndexedEvent,
    InstanceDeleted,
    InstancePlaced,
    MasterElected,
    MemberAdmitted,
    MemberRemoved,
    NodeForgotten,
    NodeJoined,
    NodeLost,
    NodeProfiled,
    RunnerStatusChanged,
)
from shoal.types.ids import NodeId, new_instance_id
from shoal.types.instance import Instance
from shoal.types.runner import Failed
from shoal.types.wire import CommandMessage, GlobalEvent, LocalEvent

log = logging.getLogger(__name__)

DEDUP_MEMORY = 4096  # (origin, seq) and command ids remembered to drop duplicates

# Decides where a model goes: the instance, or why it cannot be placed (one line).
Placer = Callable[[PlaceModel, State], Instance | str]


def no_placement(command: PlaceModel, state: State) -> Instance | str:
    """The placer of a node that cannot place models."""
    return "this master cannot place models"


class Master:
    """Orders events while this node is master; idle otherwise."""

    def __init__(
        self,
        store: StateStore,
        transport: Transport,
        sealer: Sealer,
        on_applied: Callable[[list[IndexedEvent]], None],
        placer: Placer = no_placement,
        founders: frozenset[NodeId] = frozenset(),
    ) -> None:
        self._placer = placer
        self._store = store
        self._transport = transport
        self._sealer = sealer
        self._founders = founders  # the members a log without any starts with
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

    def become(self, term: int, quorum: bool = True) -> None:
        """Take over: record the election, then reconcile membership with who is alive."""
        self.term = term
        log.info("this node is master (term %d%s)", term, "" if quorum else ", minority side")
        events: list[Event] = [MasterElected(node_id=self.me, term=term, quorum=quorum)]
        state = self._store.state
        if not state.members:  # a new cluster's log starts with who may speak in it
            events += [MemberAdmitted(node_id=n) for n in sorted(self._founders | {self.me})]
        live = self._transport.peers() | {self.me}
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
        for entry in entries:
            self._heal(entry.event)
        return entries

    # --- failover ----------------------------------------------------------------------------

    def _heal(self, event: Event) -> None:
        """Re-place the instances a lost node or a given-up stage runner leaves broken."""
        if isinstance(event, NodeLost | MemberRemoved):
            lost = event.node_id
            self._replace(lambda i: lost in i.nodes, f"node {lost} was lost", ())
        elif isinstance(event, RunnerStatusChanged) and isinstance(event.status, Failed):
            iid, why = event.instance_id, f"stage {event.stage} failed: {event.status.reason}"
            self._replace(lambda i: i.instance_id == iid, why, (event.node_id,))

    def _replace(
        self, affected: Callable[[Instance], bool], why: str, avoid: tuple[NodeId, ...]
    ) -> None:
        for iid, record in list(self._store.state.instances.items()):
            old = record.instance
            if not affected(old):
                continue
            self.append([InstanceDeleted(instance_id=iid, reason=why)])
            new_id = new_instance_id(old.model_id)
            command = PlaceModel(
                instance_id=new_id,
                model_id=old.model_id,
                policy=old.policy,
                avoid=tuple(dict.fromkeys((*old.avoid, *avoid))),
                card=old.card,
            )
            placed = self._placer(command, self._store.state)
            if isinstance(placed, str):
                log.warning(
                    "instance %s is gone (%s) and cannot be re-placed: %s", iid, why, placed
                )
                continue
            self.append([InstancePlaced(instance=placed)])
            stages = ", ".join(f"{s.node_id[-6:]}:[{s.start},{s.end})" for s in placed.stages)
            log.info("re-placed %s (%s) as %s on %s", iid, why, new_id, stages)

    async def run(self) -> None:
        """Publish appended entries, one at a time, in index order."""
        while True:
            entry = await self._outbox.get()
            await self._transport.publish(
                "global_events", self._sealer.seal(GlobalEvent(entry=entry))
            )

    # --- inputs ----------------------------------------------------------------------------

    def on_peer(self, change: PeerEvent) -> None:
        if not self.active:
            return
        record = self._store.state.nodes.get(change.node_id)
        if change.up and (record is None or not record.connected):
            self.append([NodeJoined(node_id=change.node_id)])
        elif not change.up and record is not None and record.connected:
            self.append([NodeLost(node_id=change.node_id, reason="left or unreachable")])

    def on_local(self, message: LocalEvent, sender: NodeId | None = None) -> None:
        """A node's fact about itself (sender: the member that signed it; None: this node)."""
        if not self.active:
            return
        origin = message.origin
        event = message.event
        if origin != (self.me if sender is None else sender):
            log.warning("node %s sent an event as %s: dropped", sender, origin)
            return
        if not isinstance(event, NodeProfiled | RunnerStatusChanged):
            log.warning(
                "node %s sent a %s event, which nodes do not report: dropped", origin, event.kind
            )
            return
        about = event.profile.node_id if isinstance(event, NodeProfiled) else event.node_id
        if about != origin:
            log.warning("node %s sent a %s event for %s: dropped", origin, event.kind, about)
            return
        if self._duplicate((origin, message.seq)):
            return
        self.append([event])

    def on_command(self, message: CommandMessage) -> CommandResult:
        """Carry out a command; the result says what happened (and at which log index)."""
        if not self.active:
            return CommandResult.not_the_master()
        if self._duplicate(("command", message.command_id)):
            return CommandResult(ok=True, message="already done", index=self._store.last_index)
        state = self._store.state
        match message.command:
            case ForgetNode(node_id=node_id):
                record = state.nodes.get(node_id)
                if record is None or record.connected:
                    return CommandResult(ok=False, message=f"node {node_id} is not a lost node")
                self.append([NodeForgotten(node_id=node_id)])
            case PlaceModel() as place:
                if place.instance_id in state.instances:
                    return CommandResult(ok=True, message="placed", index=self._store.last_index)
                placed = self._placer(place, state)
                if isinstance(placed, str):
                    return CommandResult(ok=False, message=placed)
                self.append([InstancePlaced(instance=placed)])
                stages = ", ".join(f"{s.node_id[-6:]}:[{s.start},{s.end})" for s in placed.stages)
                log.info("placed %s as %s on %s", place.model_id, place.instance_id, stages)
            case DeleteInstance(instance_id=instance_id):
                if instance_id not in state.instances:
                    return CommandResult(ok=False, message=f"no instance {instance_id}")
                self.append([InstanceDeleted(instance_id=instance_id, reason="deleted on request")])
            case AdmitMember(node_id=node_id):
                if node_id in state.revoked:
                    return CommandResult(ok=False, message=f"node {node_id} was removed")
                if node_id not in state.members:
                    self.append([MemberAdmitted(node_id=node_id)])
                    log.info("admitted member %s", node_id)
            case RemoveMember(node_id=node_id):
                if node_id == self.me:
                    return CommandResult(ok=False, message="the master cannot remove itself")
                if node_id not in state.revoked:
                    self.append([MemberRemoved(node_id=node_id, reason="removed on request")])
                    log.warning("removed member %s: its messages are dropped from now on", node_id)
        return CommandResult(ok=True, index=self._store.last_index)

    async def serve_command(self, payload: bytes) -> bytes:
        """The "command" request: a CommandMessage in, a CommandResult out."""
        message = CommandMessage.model_validate_json(payload)
        return self.on_command(message).model_dump_json().encode()

    def _duplicate(self, key: tuple[str, int | str]) -> bool:
        if key in self._seen:
            return True
        self._seen[key] = None
        if len(self._seen) > DEDUP_MEMORY:
            del self._seen[next(iter(self._seen))]
        return False
