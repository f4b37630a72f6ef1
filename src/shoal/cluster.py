"""The control-plane actors of one node, assembled over a transport and a state store.

Used by node.py (over zenoh) and by tests (many nodes over the memory transport in one process).
`coroutines()` are the long-running loops; the caller runs them in its TaskGroup. Every actor
talks through a `Guard` over the transport: messages are signed with this node's identity and
only trusted members' signed messages get through (the members come from the replicated state,
and from `seed` until this node's log has them).
"""

import asyncio
import logging
import time
import uuid
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

from shoal.election.actor import Election
from shoal.errors import ShoalError
from shoal.master import Master, Placer, no_placement
from shoal.net.codec import Decoder, Keys, Sealer
from shoal.net.dispatch import Dispatcher
from shoal.net.guard import Guard, Trust
from shoal.net.identity import Identity, key_in_id
from shoal.net.transport import PeerEvent, Transport
from shoal.reporter import Reporter
from shoal.state.model import State
from shoal.state.replica import Replica
from shoal.state.store import StateStore
from shoal.types.commands import AdmitMember, Command, CommandResult, RemoveMember
from shoal.types.events import Event, IndexedEvent, MemberAdmitted, MemberRemoved
from shoal.types.ids import NodeId
from shoal.types.wire import Campaign, CommandMessage, GlobalEvent, LocalEvent

log = logging.getLogger(__name__)

COMMAND_RPC = "command"
PING_RPC = "ping"  # echoes its payload: round-trip times for `shoal bench`


@dataclass(frozen=True)
class Timing:
    """Control-plane timing; tests shorten it."""

    heartbeat_s: float = 0.5
    settle_s: float = 0.3
    join_grace_s: float = 1.5
    repair_interval_s: float = 0.2
    request_timeout_s: float = 3.0


class ClusterNode:
    """Replica + election + master + reporter, wired to one transport."""

    def __init__(
        self,
        transport: Transport,
        store: StateStore,
        cluster: str,
        identity: Identity,
        seed: Iterable[NodeId] = (),
        timing: Timing = Timing(),
        placer: Placer = no_placement,
        keys: Keys = key_in_id,
    ) -> None:
        if identity.node_id != transport.node_id:
            raise ValueError(
                f"identity {identity.node_id} is not the transport's {transport.node_id}"
            )
        self.store = store
        self.cluster = cluster
        self._admitting: set[asyncio.Task[None]] = set()
        self.trust = Trust(seed, lambda: store.state)
        sealer = Sealer(identity, cluster)
        decoder = Decoder(cluster, self.trust, keys)
        self.guard = Guard(transport, sealer, decoder, self.trust)
        self.transport: Transport = self.guard
        transport = self.guard
        self.replica = Replica(
            store,
            transport,
            repair_interval_s=timing.repair_interval_s,
            request_timeout_s=timing.request_timeout_s,
        )
        self.replica.listeners.append(self._membership_changed)
        self.master = Master(
            store, transport, sealer, self.replica.applied, placer, founders=self.trust.seed
        )
        transport.serve(COMMAND_RPC, self.master.serve_command)
        transport.serve(PING_RPC, _pong)
        self.election = Election(
            transport,
            store,
            sealer,
            self._master_changed,
            heartbeat_s=timing.heartbeat_s,
            settle_s=timing.settle_s,
            join_grace_s=timing.join_grace_s,
        )
        self.reporter = Reporter(transport, sealer, self.master.on_local)
        dispatch = Dispatcher(transport, decoder)
        dispatch.on(GlobalEvent, self._on_global)
        dispatch.on(LocalEvent, lambda sender, body: self.master.on_local(body, sender))
        dispatch.on(CommandMessage, self._on_command)
        dispatch.on(Campaign, self._on_campaign)
        transport.on_peer(self._on_peer)

    @property
    def node_id(self) -> NodeId:
        return self.transport.node_id

    @property
    def state(self) -> State:
        return self.store.state

    @property
    def master_id(self) -> NodeId | None:
        return self.election.master

    def coroutines(self) -> list[Coroutine[Any, Any, None]]:
        return [self.replica.run(), self.master.run(), self.election.run(), self.reporter.run()]

    async def report(self, event: Event) -> None:
        """A fact about this node, for the log."""
        await self.reporter.report(event)

    async def command(self, command: Command, *, within_s: float = 10.0) -> CommandResult:
        """Have the master carry out a command; returns once this node's state shows it."""
        message = CommandMessage(command_id=uuid.uuid4().hex, command=command)
        async with asyncio.timeout(within_s):
            while True:
                master = self.master_id
                if master == self.node_id:
                    result = self.master.on_command(message)
                elif master is not None:
                    try:
                        raw = await self.transport.request(
                            master, COMMAND_RPC, message.model_dump_json().encode(), within_s / 2
                        )
                        result = CommandResult.model_validate_json(raw)
                    except TimeoutError:
                        result = CommandResult.not_the_master()
                else:
                    result = CommandResult.not_the_master()
                if not result.not_master:
                    break
                await asyncio.sleep(0.1)  # no master yet, or it just changed: ask again
            if result.ok:
                await self.replica.reached(result.index)
        return result

    async def admit(self, node_id: NodeId) -> list[NodeId]:
        """Have a newly certified node recorded as a member (in the background: a joiner need not
        wait for a master); the members it may trust until its log has them."""
        if node_id in self.state.revoked:
            raise ShoalError(f"node {node_id} was removed from this cluster")
        if node_id not in self.state.members:
            self.trust.vouch(node_id)  # we certified it: no waiting for a master to see it
            self.guard.refresh()
            task = asyncio.get_running_loop().create_task(self._admit(node_id))
            self._admitting.add(task)
            task.add_done_callback(self._admitting.discard)
        return sorted({*self.state.members, *self.trust.seed, self.node_id, node_id})

    async def _admit(self, node_id: NodeId) -> None:
        while True:
            try:
                result = await self.command(AdmitMember(node_id=node_id), within_s=30.0)
            except TimeoutError:
                log.warning("no master recorded member %s within 30 s: asking again", node_id)
                continue
            if not result.ok:
                log.warning("member %s not admitted: %s", node_id, result.message)
            return

    async def remove_member(self, node_id: NodeId) -> str:
        """Revoke a member for good (its messages dropped, no rejoining); what happened."""
        result = await self.command(RemoveMember(node_id=node_id))
        if not result.ok:
            raise ShoalError(f"not removed: {result.message}")
        return f"removed {node_id}"

    async def ping(
        self, node: NodeId, count: int, timeout_s: float = 2.0
    ) -> tuple[list[float], int]:
        """`count` round trips to `node` over the control plane: the times in ms, and how many
        got no answer within timeout_s."""
        rtt_ms: list[float] = []
        for i in range(count):
            start = time.perf_counter()
            try:
                await self.transport.request(node, PING_RPC, i.to_bytes(4, "little"), timeout_s)
            except TimeoutError:
                continue
            rtt_ms.append((time.perf_counter() - start) * 1000)
        return rtt_ms, count - len(rtt_ms)

    # --- wiring ----------------------------------------------------------------------------

    def _on_global(self, sender: NodeId, body: GlobalEvent) -> None:
        if body.entry.term > self.election.term and sender != self.election.master:
            self.election.observed_term(body.entry.term)
        self.replica.on_entry(sender, body.entry)

    def _on_command(self, sender: NodeId, body: CommandMessage) -> None:
        result = self.master.on_command(body)
        if not result.ok:
            log.info(
                "command %s from %s not carried out: %s", body.command.kind, sender, result.message
            )

    def _on_campaign(self, sender: NodeId, body: Campaign) -> None:
        if body.node_id == sender:
            self.election.on_campaign(body)

    def _membership_changed(self, entries: list[IndexedEvent]) -> None:
        if not entries or any(isinstance(e.event, MemberAdmitted | MemberRemoved) for e in entries):
            self.guard.refresh()

    def _on_peer(self, change: PeerEvent) -> None:
        self.election.on_peer(change)
        self.master.on_peer(change)

    async def _master_changed(self, master: NodeId | None, term: int) -> None:
        if master == self.node_id:
            self.master.become(term, self.election.quorum)
        else:
            self.master.step_down()
        await self.replica.follow(master)
        await self.reporter.master_changed(master)


async def _pong(payload: bytes) -> bytes:
    """The ping RPC: the payload back."""
    return payload
