"""The control-plane transport, as the rest of shoal sees it.

Two implementations: `ZenohTransport` (zenoh in peer mode) and `MemoryTransport` (one process,
for tests and `--transport memory`). Both deliver to handlers ON THE EVENT LOOP, never block the
sender, and never deliver a node's own publications back to it.
"""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from shoal.types.ids import NodeId

Topic = Literal["global_events", "local_events", "commands", "election_messages"]
TOPICS: tuple[Topic, ...] = ("global_events", "local_events", "commands", "election_messages")

MessageHandler = Callable[[bytes], None]  # raw payload; decoding is the caller's job
QueryHandler = Callable[[bytes], Awaitable[bytes]]  # request payload → reply payload


@dataclass(frozen=True)
class PeerEvent:
    """connection_messages: a peer's liveliness token appeared (up) or went away (down)."""

    node_id: NodeId
    up: bool


PeerHandler = Callable[[PeerEvent], None]


class Refused(Exception):
    """A request the serving side will not answer (unsigned, or not from a member)."""


class DuplicateNodeId(Exception):
    """Another live node already uses this node id (e.g. a copied data dir)."""


class Transport(Protocol):
    """Pub/sub on the four topics, membership from liveliness, request/reply for gap repair."""

    @property
    def node_id(self) -> NodeId: ...

    async def start(self) -> None:
        """Connect, refuse a duplicate id (DuplicateNodeId), declare our liveliness token."""
        ...

    async def publish(self, topic: Topic, payload: bytes) -> None:
        """Reliable (congestion control BLOCK, express) delivery to every other live node."""
        ...

    def subscribe(self, topic: Topic, handler: MessageHandler) -> None:
        """Call handler on the event loop for every payload others publish on topic."""
        ...

    def on_peer(self, handler: PeerHandler) -> None:
        """Call handler on the event loop for each peer up/down; existing peers come as up."""
        ...

    def peers(self) -> frozenset[NodeId]:
        """The other nodes whose liveliness tokens are alive now."""
        ...

    def serve(self, name: str, handler: QueryHandler) -> None:
        """Answer requests sent to this node under `name` (e.g. "log")."""
        ...

    async def request(
        self,
        node: NodeId,
        name: str,
        payload: bytes,
        timeout: float,  # noqa: ASYNC109 - a per-request deadline is part of the contract
    ) -> bytes:
        """Ask one node; raises TimeoutError when no reply comes in time."""
        ...

    async def close(self) -> None:
        """Withdraw the liveliness token (peers see us leave at once) and disconnect."""
        ...
