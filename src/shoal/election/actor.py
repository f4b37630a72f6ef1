"""The election actor: exchanges Campaigns, applies the pure rules, and hands over mastership.

Every node sends its standing on election_messages when the membership changes and as a
heartbeat. A node decides only from the standings of peers that are alive now; after a change
it waits a short settle time (or until every live peer's standing is fresh) so that all nodes
decide from the same facts and so elect the same master.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from shoal.election.rules import Standing, decide, has_quorum, next_term
from shoal.net.codec import Sealer
from shoal.net.transport import PeerEvent, Transport
from shoal.state.store import StateStore
from shoal.types.events import MAX_TERM
from shoal.types.ids import NodeId
from shoal.types.wire import Campaign

log = logging.getLogger(__name__)

OnMaster = Callable[[NodeId | None, int], Awaitable[None]]  # (new master, its term)


class Election:
    """Keeps this node's view of who is master, and tells on_master when it changes."""

    def __init__(
        self,
        transport: Transport,
        store: StateStore,
        sealer: Sealer,
        on_master: OnMaster,
        *,
        started_at: float | None = None,
        heartbeat_s: float = 0.5,
        settle_s: float = 0.3,
        join_grace_s: float = 1.0,
    ) -> None:
        self._transport = transport
        self._store = store
        self._sealer = sealer
        self._on_master = on_master
        self.started_at = time.time() if started_at is None else started_at
        self._heartbeat = heartbeat_s
        self._settle = settle_s
        self._grace = join_grace_s
        self.master: NodeId | None = None
        self.term = store.last_term  # the highest term seen
        self.quorum = False  # when master: elected seeing a majority of the known nodes
        self._campaigns: dict[NodeId, tuple[Campaign, float]] = {}  # standing, when received
        self._wake = asyncio.Event()
        self._changed_at = time.monotonic()
        self._exhausted = False  # logged once: terms ran out (only a member could do that)

    @property
    def me(self) -> NodeId:
        return self._transport.node_id

    def last_seen(self, node: NodeId) -> float | None:
        """Monotonic time a campaign of node last arrived."""
        found = self._campaigns.get(node)
        return found[1] if found else None

    # --- inputs ----------------------------------------------------------------------------

    def on_campaign(self, campaign: Campaign) -> None:
        known = self._campaigns.get(campaign.node_id)
        self._campaigns[campaign.node_id] = (campaign, time.monotonic())
        self.term = max(self.term, campaign.term)
        if (
            known is None
            or known[1] < self._changed_at  # the first standing since the membership changed
            or known[0].last_term != campaign.last_term
            or known[0].master != campaign.master
        ):
            self._wake.set()

    def on_peer(self, change: PeerEvent) -> None:
        if not change.up:
            self._campaigns.pop(change.node_id, None)
        self._changed_at = time.monotonic()
        self._wake.set()

    def observed_term(self, term: int) -> None:
        """A log entry of a later term was seen (e.g. from the other side of a healed split)."""
        if term > self.term:
            self.term = term
            self._wake.set()

    # --- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """Heartbeat our standing; re-decide whenever something changed."""
        started = time.monotonic()
        await self._send()
        while True:
            try:
                async with asyncio.timeout(self._heartbeat):
                    await self._wake.wait()
                changed = True
            except TimeoutError:
                changed = False
            self._wake.clear()
            if changed:
                await self._send()  # let the others decide from our fresh standing too
                await asyncio.sleep(self._settle)
            elif time.monotonic() - started >= self._heartbeat * 2:
                await self._send()
            if time.monotonic() - started < self._grace and not self._transport.peers():
                continue  # alone just after start: give discovery a moment before ruling
            await self._decide()

    async def _decide(self) -> None:
        live = self._transport.peers()
        known = {n: c for n, (c, _) in self._campaigns.items() if n in live}
        waited = time.monotonic() - self._changed_at
        if set(known) != set(live) and waited < self._settle * 5:
            return  # a live peer's standing is still on its way; its arrival wakes us
        winner = decide([self._standing()] + [_standing(c) for c in known.values()])
        if winner == self.master:
            return
        if winner == self.me:
            term = next_term([self.term, self._store.last_term])
            if term > MAX_TERM:
                if not self._exhausted:
                    self._exhausted = True
                    log.error("term %d is past the last term a log can hold: not ruling", term)
                return
            self.term = term
            state = self._store.state
            members = {n for n, r in state.nodes.items() if r.connected} | live | {self.me}
            # only peers heard from since the membership changed count towards a majority: one
            # whose link just broke may still look alive (its lease has not run out)
            fresh = [n for n, (_, at) in self._campaigns.items() if at >= self._changed_at]
            self.quorum = has_quorum(len(set(fresh) & live) + 1, len(members))
        elif winner is not None:
            self.term = max(self.term, known[winner].term)
        previous, self.master = self.master, winner
        log.info("master: %s → %s (term %d)", previous or "none", winner or "none", self.term)
        await self._on_master(winner, self.term)
        await self._send()

    def _standing(self) -> Standing:
        claims = self.master == self.me
        return Standing(
            self.me,
            self.term,
            self._store.last_term,
            self._store.last_index,
            self.started_at,
            claims=claims,
            quorum=claims and self.quorum,
        )

    async def _send(self) -> None:
        body = Campaign(
            node_id=self.me,
            term=self.term,
            last_index=self._store.last_index,
            last_term=self._store.last_term,
            started_at=self.started_at,
            master=self.master,
            quorum=self.master == self.me and self.quorum,
        )
        await self._transport.publish("election_messages", self._sealer.seal(body))


def _standing(c: Campaign) -> Standing:
    claims = c.master == c.node_id
    return Standing(
        c.node_id, c.term, c.last_term, c.last_index, c.started_at, claims, claims and c.quorum
    )
