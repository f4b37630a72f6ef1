"""The trust boundary over a Transport: members only, signed requests and replies.

`Trust` says whom this node takes messages from: the members in the replicated state, plus the
members it was told of when it joined (its seed, until its log catches up), minus every revoked
node. `Guard` wraps a Transport so that the actors above it only ever see members: peers that are
not trusted members never come up (and a member that is removed goes down), and every request
and reply travels in a signed `Rpc` envelope — a request from a non-member is refused, a reply
not signed by the node asked is dropped. Topic messages are signed by `Sealer` and checked by
`Decoder` on their way to the Dispatcher.
"""

import base64
import binascii
import logging
import secrets
from collections.abc import Callable, Iterable

from shoal.net.codec import Decoder, Sealer
from shoal.net.transport import (
    MessageHandler,
    PeerEvent,
    PeerHandler,
    QueryHandler,
    Refused,
    Topic,
    Transport,
)
from shoal.state.model import State
from shoal.types.ids import NodeId
from shoal.types.wire import MAX_RPC_BYTES, Rpc

log = logging.getLogger(__name__)


class Trust:
    """Whether a node's messages are taken: a member (replicated, or seed) and never revoked."""

    def __init__(self, seed: Iterable[NodeId], state: Callable[[], State]) -> None:
        self.seed = frozenset(seed)
        self._state = state
        self._vouched: set[NodeId] = set()  # certified here; the log will admit them

    def vouch(self, node_id: NodeId) -> None:
        """This node (the CA holder) just certified node_id: trust it before the log says so."""
        self._vouched.add(node_id)

    def __call__(self, node_id: NodeId) -> bool:
        state = self._state()
        if node_id in state.revoked:
            return False
        return node_id in state.members or node_id in self.seed or node_id in self._vouched


class Guard:
    """A Transport that shows only trusted peers and signs and checks every request and reply."""

    def __init__(self, inner: Transport, sealer: Sealer, decoder: Decoder, trusts: Trust) -> None:
        self._inner = inner
        self._sealer = sealer
        self._decoder = decoder
        self._trusts = trusts
        self._handlers: list[PeerHandler] = []
        self._up: set[NodeId] = set()  # trusted peers reported up
        self._ignored: set[NodeId] = set()  # untrusted peers already logged
        inner.on_peer(self._on_inner_peer)

    @property
    def node_id(self) -> NodeId:
        return self._inner.node_id

    @property
    def trust(self) -> Trust:
        return self._trusts

    async def start(self) -> None:
        await self._inner.start()

    async def publish(self, topic: Topic, payload: bytes) -> None:
        await self._inner.publish(topic, payload)

    def subscribe(self, topic: Topic, handler: MessageHandler) -> None:
        self._inner.subscribe(topic, handler)

    async def close(self) -> None:
        await self._inner.close()

    # --- peers: members only ---------------------------------------------------------------

    def on_peer(self, handler: PeerHandler) -> None:
        self._handlers.append(handler)
        for peer in sorted(self._up):
            handler(PeerEvent(node_id=peer, up=True))

    def peers(self) -> frozenset[NodeId]:
        return frozenset(p for p in self._inner.peers() if self._trusts(p))

    def refresh(self) -> None:
        """Membership changed: report removed members down and newly admitted live peers up."""
        live = self._inner.peers()
        for peer in sorted(self._up):
            if not self._trusts(peer):
                log.warning("peer %s is no longer a member: dropping it", peer)
                self._report(PeerEvent(node_id=peer, up=False))
        for peer in sorted(live - self._up):
            if self._trusts(peer):
                self._report(PeerEvent(node_id=peer, up=True))

    def _on_inner_peer(self, change: PeerEvent) -> None:
        if not change.up:
            if change.node_id in self._up:
                self._report(change)
            return
        if self._trusts(change.node_id):
            self._report(change)
        elif change.node_id not in self._ignored:
            self._ignored.add(change.node_id)
            # a node admitted after our log was read, or a holder of a certificate who is none
            log.info("peer %s is up but not a member (yet): ignored", change.node_id)

    def _report(self, change: PeerEvent) -> None:
        if change.up == (change.node_id in self._up):
            return
        if change.up:
            self._up.add(change.node_id)
        else:
            self._up.discard(change.node_id)
        for handler in list(self._handlers):
            try:
                handler(change)
            except Exception:
                log.exception("peer handler on %s failed", self.node_id)

    # --- requests: signed both ways --------------------------------------------------------

    def serve(self, name: str, handler: QueryHandler) -> None:
        async def answer(payload: bytes) -> bytes:
            envelope = self._decoder.decode(payload)
            body = envelope.body if envelope is not None else None
            if not isinstance(body, Rpc) or body.reply or body.name != name:
                raise Refused(f"refused a {name!r} request")
            reply = await handler(_unpack(body.data))
            return self._sealer.seal(
                Rpc(name=name, nonce=body.nonce, reply=True, data=_pack(reply))
            )

        self._inner.serve(name, answer)

    async def request(
        self,
        node: NodeId,
        name: str,
        payload: bytes,
        timeout: float,  # noqa: ASYNC109 - the Transport contract takes a timeout
    ) -> bytes:
        """Ask one node; TimeoutError also when the reply is not that node's, signed."""
        nonce = secrets.token_hex(16)
        request = self._sealer.seal(Rpc(name=name, nonce=nonce, data=_pack(payload)))
        raw = await self._inner.request(node, name, request, timeout)
        envelope = self._decoder.decode(raw, MAX_RPC_BYTES)
        body = envelope.body if envelope is not None else None
        if (
            envelope is None
            or envelope.sender != node
            or not isinstance(body, Rpc)
            or not body.reply
            or body.nonce != nonce
            or body.name != name
        ):
            raise TimeoutError(f"no valid {name!r} reply from {node}")
        return _unpack(body.data)


def _pack(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unpack(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Refused("an rpc payload that is not base64") from exc
