"""The in-memory twin of the zenoh transport: N nodes in one process, for tests and demos.

A `MemoryNetwork` is the wire: each started `MemoryTransport` registers with it, and a publish is
posted to every other live, reachable node's inbox, drained on the event loop. Test hooks on the
network cut it (`partition`/`heal`), crash a node (`kill`) and add latency (`delay_s`); peers see
each change as PeerEvents, as they would see liveliness tokens come and go over zenoh.
"""

import asyncio
import functools
import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterable

from shoal.net.transport import (
    DuplicateNodeId,
    MessageHandler,
    PeerEvent,
    PeerHandler,
    QueryHandler,
    Refused,
    Topic,
)
from shoal.types.ids import NodeId

log = logging.getLogger(__name__)


class MemoryNetwork:
    """The shared medium of one in-memory cluster; no globals, so clusters do not mix."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s  # injected one-way latency of every delivery
        self._live: dict[NodeId, MemoryTransport] = {}
        self._cut: set[frozenset[NodeId]] = set()  # pairs that cannot reach each other

    def reachable(self, a: NodeId, b: NodeId) -> bool:
        """Whether a and b are both live and not partitioned from each other."""
        return (
            a in self._live and b in self._live and (a == b or frozenset((a, b)) not in self._cut)
        )

    def partition(self, group_a: Iterable[NodeId], group_b: Iterable[NodeId]) -> None:
        """Cut every link between group_a and group_b; each side sees the other go down."""
        pairs = {frozenset((a, b)) for a, b in itertools.product(group_a, group_b) if a != b}
        for pair in pairs - self._cut:
            self._cut.add(pair)
            self._announce_pair(pair, up=False)

    def heal(self) -> None:
        """Undo every partition; nodes that can see each other again come up."""
        cut, self._cut = self._cut, set()
        for pair in cut:
            self._announce_pair(pair, up=True)

    def kill(self, node_id: NodeId) -> None:
        """Crash a node: its peers see it down and it receives nothing more."""
        node = self._live.get(node_id)
        if node is not None:
            node._dead = True
            self._leave(node)

    def _announce_pair(self, pair: frozenset[NodeId], up: bool) -> None:
        a, b = tuple(pair)
        if a in self._live and b in self._live:
            self._live[a]._post_peer(b, up)
            self._live[b]._post_peer(a, up)

    def _join(self, node: "MemoryTransport") -> None:
        if node.node_id in self._live:
            raise DuplicateNodeId(
                f"another node with id {node.node_id} is already running in this memory network"
            )
        self._live[node.node_id] = node
        for other in self._others(node.node_id):
            other._post_peer(node.node_id, up=True)
            node._post_peer(other.node_id, up=True)

    def _leave(self, node: "MemoryTransport") -> None:
        if self._live.get(node.node_id) is not node:
            return
        others = list(self._others(node.node_id))
        del self._live[node.node_id]
        for other in others:
            other._post_peer(node.node_id, up=False)

    def _others(self, node_id: NodeId) -> Iterable["MemoryTransport"]:
        """Live nodes node_id can reach, itself excluded."""
        return [n for i, n in self._live.items() if i != node_id and self.reachable(node_id, i)]


class MemoryTransport:
    """One node's Transport over a MemoryNetwork."""

    def __init__(self, network: MemoryNetwork, node_id: NodeId) -> None:
        self._network = network
        self._node_id = node_id
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subs: dict[Topic, list[MessageHandler]] = {}
        self._peer_handlers: list[PeerHandler] = []
        self._servers: dict[str, QueryHandler] = {}
        self._peers: set[NodeId] = set()
        self._inbox: deque[tuple[float, Callable[[], None]]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._started = False
        self._closed = False
        self._dead = False  # killed by the network: as if the process crashed

    @property
    def node_id(self) -> NodeId:
        """This node's id."""
        return self._node_id

    @property
    def _live(self) -> bool:
        return self._started and not self._closed and not self._dead

    async def start(self) -> None:
        """Join the network; DuplicateNodeId if a live node already has this id."""
        if self._started:
            raise RuntimeError(f"transport of {self._node_id} already started")
        self._loop = asyncio.get_running_loop()
        self._started = True
        try:
            self._network._join(self)
        except DuplicateNodeId:
            self._started = False
            raise

    async def publish(self, topic: Topic, payload: bytes) -> None:
        """Post payload to every other live node this one can reach."""
        if not self._started or self._closed:
            raise RuntimeError(f"transport of {self._node_id} is not running")
        if self._dead:
            return  # a crashed node sends nothing
        for other in self._network._others(self._node_id):
            other._post(functools.partial(other._deliver, topic, payload))

    def subscribe(self, topic: Topic, handler: MessageHandler) -> None:
        """Call handler on the loop for each payload others publish on topic."""
        self._subs.setdefault(topic, []).append(handler)

    def on_peer(self, handler: PeerHandler) -> None:
        """Call handler for each peer up/down; peers already up are reported now."""
        self._peer_handlers.append(handler)
        if self._loop is not None:
            for peer in sorted(self._peers):
                self._loop.call_soon(handler, PeerEvent(node_id=peer, up=True))

    def peers(self) -> frozenset[NodeId]:
        """The other nodes this one currently sees alive."""
        return frozenset(self._peers)

    def serve(self, name: str, handler: QueryHandler) -> None:
        """Answer requests sent to this node under name."""
        self._servers[name] = handler

    async def request(
        self,
        node: NodeId,
        name: str,
        payload: bytes,
        timeout: float,  # noqa: ASYNC109 - the Transport contract takes a timeout
    ) -> bytes:
        """Ask one node; TimeoutError if it is unreachable, has no such service, or fails."""
        network = self._network
        async with asyncio.timeout(timeout):
            await asyncio.sleep(network.delay_s)
            target = network._live.get(node)
            handler = target._servers.get(name) if target is not None else None
            if target is None or handler is None or not network.reachable(self._node_id, node):
                raise TimeoutError(f"no node {node} serving {name!r} is reachable")
            try:
                reply = await handler(payload)
            except Refused as exc:
                raise TimeoutError(f"{node} refused {name!r}") from exc
            except Exception as exc:
                log.warning("%s failed to serve %r: %s", node, name, exc, exc_info=True)
                raise TimeoutError(f"{node} failed to serve {name!r}: {exc}") from exc
            await asyncio.sleep(network.delay_s)
            if not network.reachable(self._node_id, node):
                raise TimeoutError(f"{node} went away before replying to {name!r}")
            return reply

    async def close(self) -> None:
        """Leave the network: peers see this node go down at once."""
        if self._closed:
            return
        self._closed = True
        self._network._leave(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._inbox.clear()

    # -- delivery: one FIFO inbox per node, drained on its loop after the network's delay --

    def _post(self, fn: Callable[[], None]) -> None:
        """Queue fn to run on this node's loop after the network delay, in posting order."""
        if self._loop is None or not self._live:
            return
        self._inbox.append((self._loop.time() + self._network.delay_s, fn))
        if self._timer is None:
            self._arm()

    def _arm(self) -> None:
        assert self._loop is not None
        self._timer = self._loop.call_at(self._inbox[0][0], self._drain)

    def _drain(self) -> None:
        assert self._loop is not None
        self._timer = None
        now = self._loop.time()
        first = True  # the head is due: its timer just fired
        while self._inbox and (first or self._inbox[0][0] <= now) and self._live:
            first = False
            _, fn = self._inbox.popleft()
            fn()  # handlers' errors are caught and logged inside
        if self._inbox and self._live:
            self._arm()

    def _deliver(self, topic: Topic, payload: bytes) -> None:
        for handler in list(self._subs.get(topic, ())):
            try:
                handler(payload)
            except Exception:
                log.exception("%s handler on %s failed", topic, self._node_id)

    def _post_peer(self, peer: NodeId, up: bool) -> None:
        self._post(lambda: self._peer_change(peer, up))

    def _peer_change(self, peer: NodeId, up: bool) -> None:
        if up == (peer in self._peers):
            return  # already known: no repeated up (or down)
        if up:
            self._peers.add(peer)
        else:
            self._peers.discard(peer)
        event = PeerEvent(node_id=peer, up=up)
        for handler in list(self._peer_handlers):
            try:
                handler(event)
            except Exception:
                log.exception("peer handler on %s failed", self._node_id)
