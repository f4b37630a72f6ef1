"""Round trips to every connected peer, measured in the background and carried in the profile.

Every `interval_s` the node pings each connected peer a few times over the control plane
(`ClusterNode.ping`) and keeps the median; the profiler puts the latest figures in its profile,
so every node's links are in the replicated state: the dashboard draws them and placement costs
a hop from them (one way = half the round trip). A peer that answers none of its pings has no
link until it does.
"""

import asyncio
import logging
import statistics
from collections.abc import Awaitable, Callable, Iterable

from shoal.types.ids import NodeId
from shoal.types.profile import Link, NodeProfile

log = logging.getLogger(__name__)

Ping = Callable[[NodeId, int], Awaitable[tuple[list[float], int]]]  # (rtts in ms, lost)
PINGS = 3
INTERVAL_S = 5.0
# a round trip must move by this much, and double (or halve), to count as changed: the profile
# is replicated state, and loopback or LAN jitter must not make a log entry every interval
NOISE_MS = 2.0


class LinkMonitor:
    """The latest round trip to each connected peer."""

    def __init__(self, ping: Ping, peers: Callable[[], Iterable[NodeId]]) -> None:
        self._ping = ping
        self._peers = peers
        self._rtt: dict[NodeId, float] = {}

    def links(self) -> tuple[Link, ...]:
        """The latest figures, by peer id."""
        return tuple(Link(peer=p, rtt_ms=round(ms, 3)) for p, ms in sorted(self._rtt.items()))

    async def measure(self) -> None:
        """One round of pings to every connected peer, all at once."""
        peers = sorted(set(self._peers()))

        async def one(peer: NodeId) -> tuple[NodeId, float | None]:
            try:
                rtts, _ = await self._ping(peer, PINGS)
            except Exception as e:  # a peer that vanished mid-ping: no figure this round
                log.debug("ping %s failed: %s", peer, e)
                return peer, None
            return peer, statistics.median(rtts) if rtts else None

        results = await asyncio.gather(*(one(p) for p in peers))
        self._rtt = {peer: ms for peer, ms in results if ms is not None}

    async def run(self, interval_s: float = INTERVAL_S) -> None:
        """Measure every interval_s until cancelled."""
        while True:
            await self.measure()
            await asyncio.sleep(interval_s)


def links_moved(old: tuple[Link, ...], new: tuple[Link, ...]) -> bool:
    """Whether the peers differ, or a round trip moved past the noise (2 ms, and twice)."""
    before = {link.peer: link.rtt_ms for link in old}
    after = {link.peer: link.rtt_ms for link in new}
    if before.keys() != after.keys():
        return True
    return any(abs(after[p] - ms) > max(NOISE_MS, min(ms, after[p])) for p, ms in before.items())


def hop_seconds(profiles: Iterable[NodeProfile]) -> dict[tuple[NodeId, NodeId], float]:
    """Placement's links from the profiles: one way = half the measured round trip."""
    return {(p.node_id, link.peer): link.rtt_ms / 2000 for p in profiles for link in p.links}
