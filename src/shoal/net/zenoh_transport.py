"""The control plane over zenoh (peer mode): pub/sub topics, liveliness membership, request/reply.

Key space, all under `shoal/<cluster>/`: `<topic>` for the four topics, `nodes/<node_id>` for
liveliness tokens, `rpc/<node_id>/<name>` for requests. zenoh runs callbacks on its own threads:
they only copy the sample and hand it to the event loop (`call_soon_threadsafe`). Calls that can
block (open, close, put under congestion, reply, get) run on one sender thread, which also keeps
publications in the order they were made, and never on the loop.

With credentials (what every node runs with), links are zenoh's TLS with mutual authentication:
`tls/host:port` endpoints only, our node certificate on both sides of a link, and the peer's
checked against the cluster CA, so a process without a member's certificate cannot open a
session with us, read or publish. Host names are not checked: nodes are known by certificate.
"""

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import zenoh
from zenoh.handlers import Callback

from shoal.net.credentials import Credentials
from shoal.net.transport import (
    TOPICS,
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

CONNECT_RETRY_INIT_MS = 250  # a static peer started later is reached within ~2 s
CONNECT_RETRY_MAX_MS = 2000
DUPLICATE_CHECK_S = 1.0  # how long start() asks whether our own token is already alive


def zenoh_config(
    *,
    listen: list[str],
    connect: list[str],
    multicast: bool = False,
    gossip: bool = True,
    lease_ms: int = 2000,
    multicast_interface: str | None = None,
    tls: Credentials | None = None,
) -> zenoh.Config:
    """Peer-mode zenoh config: static peers retried forever, the given lease, scouting as asked;
    with credentials, mutual TLS on every link (and only tls/ endpoints)."""
    retry = {"period_init_ms": CONNECT_RETRY_INIT_MS, "period_max_ms": CONNECT_RETRY_MAX_MS}
    settings: dict[str, Any] = {
        "mode": "peer",
        "listen/endpoints": listen,
        "listen/exit_on_failure": True,  # a taken control port is a startup error
        "connect/endpoints": connect,
        # Static peers that are down are retried in the background, forever: open() does not
        # fail, and a peer started (or restarted) later is still reached.
        "connect/timeout_ms": -1,
        "connect/exit_on_failure": False,
        "connect/retry": retry | {"period_increase_factor": 2},
        "scouting/multicast/enabled": multicast,
        "scouting/multicast/listen": multicast,
        "scouting/gossip/enabled": gossip,  # a node that knows one peer learns the others
        # A peer silent for a lease is dropped, its liveliness tokens with it; 4 keep-alives
        # per lease tolerate a lost one (zenoh's own ratio).
        "transport/link/tx/lease": lease_ms,
        "transport/link/tx/keep_alive": 4,
    }
    if multicast_interface is not None:
        settings["scouting/multicast/interface"] = multicast_interface
    if tls is not None:
        plain = [e for e in [*listen, *connect] if not e.startswith("tls/")]
        if plain:
            raise ValueError(f"with TLS every endpoint must be tls/HOST:PORT, not {plain}")
        files = tls.paths
        settings |= {
            "transport/link/tls/root_ca_certificate": str(files.ca_cert),
            "transport/link/tls/listen_private_key": str(files.node_key),
            "transport/link/tls/listen_certificate": str(files.node_cert),
            "transport/link/tls/connect_private_key": str(files.node_key),
            "transport/link/tls/connect_certificate": str(files.node_cert),
            "transport/link/tls/enable_mtls": True,
            "transport/link/tls/verify_name_on_connect": False,  # known by certificate, not name
        }
    config = zenoh.Config()
    for key, value in settings.items():
        config.insert_json5(key, json.dumps(value))
    return config


class ZenohTransport:
    """Transport over one zenoh session in peer mode."""

    def __init__(
        self,
        identity_node_id: NodeId,
        cluster: str,
        *,
        listen: list[str],
        connect: list[str],
        multicast: bool = False,
        gossip: bool = True,
        lease_ms: int = 2000,
        multicast_interface: str | None = None,
        tls: Credentials | None = None,
    ) -> None:
        if not cluster or any(c in cluster for c in "/*$?#"):
            raise ValueError(f"cluster name {cluster!r} must be one key chunk (no / * $ ? #)")
        self._node_id = identity_node_id
        self._cluster = cluster
        self._prefix = f"shoal/{cluster}"
        self._config = functools.partial(
            zenoh_config,
            listen=listen,
            connect=connect,
            multicast=multicast,
            gossip=gossip,
            lease_ms=lease_ms,
            multicast_interface=multicast_interface,
            tls=tls,
        )
        self._config()  # a bad endpoint or setting fails here, not at start()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: zenoh.Session | None = None
        self._entities: list[Any] = []  # subscribers, queryable, token: undeclared on close
        self._publishers: dict[Topic, zenoh.Publisher] = {}
        self._subs: dict[Topic, list[MessageHandler]] = {t: [] for t in TOPICS}
        self._peer_handlers: list[PeerHandler] = []
        self._servers: dict[str, QueryHandler] = {}
        self._peers: set[NodeId] = set()
        self._answering: set[asyncio.Task[None]] = set()
        # One sender thread: blocking zenoh calls stay off the loop, publications stay ordered.
        self._tx = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"zenoh-tx-{cluster}")
        self._closed = False

    @property
    def node_id(self) -> NodeId:
        """This node's id."""
        return self._node_id

    def _key(self, *parts: str) -> str:
        return "/".join((self._prefix, *parts))

    async def start(self) -> None:
        """Open the session, refuse a duplicate id, subscribe, then declare our token."""
        if self._loop is not None:
            raise RuntimeError(f"transport of {self._node_id} already started")
        self._loop = asyncio.get_running_loop()
        try:
            self._session = await self._run(zenoh.open, self._config())
            await self._refuse_duplicate(self._session)
            self._declare(self._session)
        except BaseException:
            await self.close()
            raise

    async def _refuse_duplicate(self, session: zenoh.Session) -> None:
        """DuplicateNodeId if a live token already holds our key."""
        key = self._key("nodes", self._node_id)

        def alive() -> bool:
            return any(
                r.ok is not None for r in session.liveliness().get(key, timeout=DUPLICATE_CHECK_S)
            )

        if await self._run(alive):
            raise DuplicateNodeId(
                f"another node with id {self._node_id} is already running in cluster "
                f"{self._cluster!r}; a copied data dir? remove identity.key from the data dir "
                "of one of them"
            )

    def _declare(self, session: zenoh.Session) -> None:
        """Publishers and subscribers first, so that once peers see our token we hear them."""
        remote = zenoh.Locality.REMOTE
        for topic in TOPICS:
            self._publishers[topic] = session.declare_publisher(
                self._key(topic),
                congestion_control=zenoh.CongestionControl.BLOCK,  # the default drops
                express=True,  # no batching delay: control messages are small and urgent
                allowed_destination=remote,
            )
            sub = session.declare_subscriber(
                self._key(topic),
                Callback(functools.partial(self._on_sample, topic)),
                allowed_origin=remote,  # no echo of our own publications
            )
            self._entities.append(sub)
        self._entities.append(
            session.declare_queryable(
                self._key("rpc", self._node_id, "*"), Callback(self._on_query)
            )
        )
        liveliness = session.liveliness()
        self._entities.append(
            liveliness.declare_subscriber(
                self._key("nodes", "*"), Callback(self._on_liveliness), history=True
            )
        )
        self._entities.append(liveliness.declare_token(self._key("nodes", self._node_id)))

    async def publish(self, topic: Topic, payload: bytes) -> None:
        """Queue payload for the sender thread (congestion control BLOCK, express), in order."""
        publisher = self._publishers.get(topic)
        if publisher is None or self._closed:
            raise RuntimeError(f"transport of {self._node_id} is not running")
        self._send(publisher.put, payload)

    def subscribe(self, topic: Topic, handler: MessageHandler) -> None:
        """Call handler on the loop for each payload others publish on topic."""
        self._subs[topic].append(handler)

    def on_peer(self, handler: PeerHandler) -> None:
        """Call handler for each peer up/down; peers already up are reported now."""
        self._peer_handlers.append(handler)
        if self._loop is not None:
            for peer in sorted(self._peers):
                self._loop.call_soon(handler, PeerEvent(node_id=peer, up=True))

    def peers(self) -> frozenset[NodeId]:
        """The other nodes whose liveliness tokens are alive now."""
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
        """Ask one node; TimeoutError if no reply comes in time (or it has none to give)."""
        session = self._session
        if session is None or self._closed:
            raise RuntimeError(f"transport of {self._node_id} is not running")
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[bytes] = loop.create_future()

        def settle(result: bytes | None, error: str | None) -> None:
            if answer.done():
                return
            if result is not None:
                answer.set_result(result)
            else:
                answer.set_exception(TimeoutError(error))

        def on_reply(reply: zenoh.Reply) -> None:  # zenoh thread
            if reply.ok is not None:
                self._to_loop(settle, reply.ok.payload.to_bytes(), None)
            elif reply.err is not None:
                error = reply.err.payload.to_string()
                self._to_loop(settle, None, f"{node} failed to serve {name!r}: {error}")

        def on_done() -> None:  # zenoh thread: the query is over
            self._to_loop(settle, None, f"no reply from {node} to {name!r}")

        def failed(error: BaseException) -> None:
            self._to_loop(settle, None, f"asking {node} for {name!r} failed: {error}")

        get = functools.partial(
            session.get,
            self._key("rpc", node, name),
            Callback(on_reply, on_done, indirect=False),  # tiny callbacks: no thread per get
            payload=payload,
            timeout=timeout,
            consolidation=zenoh.ConsolidationMode.NONE,  # hand the reply over at once
            congestion_control=zenoh.CongestionControl.BLOCK,  # replies inherit it
        )
        self._send(get, on_error=failed)
        async with asyncio.timeout(timeout):
            return await answer

    async def close(self) -> None:
        """Withdraw our token (peers see us leave at once), then close the session."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._answering):
            task.cancel()
        session, entities = self._session, self._entities
        self._entities, self._publishers = [], {}

        def shutdown() -> None:
            for entity in reversed(entities):  # the token first
                entity.undeclare()
            if session is not None:
                session.close()

        try:
            if self._loop is not None:
                await self._run(shutdown)
        finally:
            await asyncio.to_thread(self._tx.shutdown, wait=True)

    # -- glue between zenoh's threads and the loop --

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking zenoh call on the sender thread and wait for its result."""
        return await asyncio.get_running_loop().run_in_executor(self._tx, fn, *args)

    def _send(
        self,
        fn: Callable[..., Any],
        *args: Any,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        """Run fn on the sender thread, in call order, without waiting for it."""

        def done(future: Future[Any]) -> None:  # sender thread
            error = future.exception()
            if error is None:
                return
            if on_error is not None:
                on_error(error)
            elif self._closed:
                log.debug("%s after close: %s", getattr(fn, "__name__", fn), error)
            else:
                log.warning("zenoh %s failed: %s", getattr(fn, "__name__", fn), error)

        try:
            self._tx.submit(fn, *args).add_done_callback(done)
        except RuntimeError:  # the sender thread is gone: we are closed
            log.debug("%s after close: dropped", getattr(fn, "__name__", fn))

    def _to_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """From a zenoh thread: schedule fn on the loop; dropped if the loop is gone."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed under us: shutting down
            loop.call_soon_threadsafe(fn, *args)

    def _on_sample(self, topic: Topic, sample: zenoh.Sample) -> None:  # zenoh thread
        self._to_loop(self._dispatch, topic, sample.payload.to_bytes())

    def _dispatch(self, topic: Topic, payload: bytes) -> None:
        if self._closed:
            return
        for handler in list(self._subs[topic]):
            try:
                handler(payload)
            except Exception:
                log.exception("%s handler on %s failed", topic, self._node_id)

    def _on_liveliness(self, sample: zenoh.Sample) -> None:  # zenoh thread
        node = NodeId(str(sample.key_expr).rsplit("/", 1)[-1])
        self._to_loop(self._peer_change, node, sample.kind == zenoh.SampleKind.PUT)

    def _peer_change(self, node: NodeId, up: bool) -> None:
        if self._closed or node == self._node_id or up == (node in self._peers):
            return  # our own token, or nothing new (repeated ups are dropped)
        if up:
            self._peers.add(node)
        else:
            self._peers.discard(node)
        log.debug("%s sees peer %s %s", self._node_id, node, "up" if up else "down")
        event = PeerEvent(node_id=node, up=up)
        for handler in list(self._peer_handlers):
            try:
                handler(event)
            except Exception:
                log.exception("peer handler on %s failed", self._node_id)

    def _on_query(self, query: zenoh.Query) -> None:  # zenoh thread
        name = str(query.key_expr).rsplit("/", 1)[-1]
        payload = query.payload.to_bytes() if query.payload is not None else b""
        self._to_loop(self._start_answer, query, name, payload)

    def _start_answer(self, query: zenoh.Query, name: str, payload: bytes) -> None:
        if self._closed:
            return
        task = asyncio.get_running_loop().create_task(self._answer(query, name, payload))
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def _answer(self, query: zenoh.Query, name: str, payload: bytes) -> None:
        """Run the handler for name and send its reply (or an error) back."""
        handler = self._servers.get(name)
        try:
            if handler is None:
                raise LookupError(f"{self._node_id} serves no {name!r}")
            reply = await handler(payload)
        except Refused as exc:
            log.debug("refused %r: %s", name, exc)
            self._send(_finish, query, None, "refused")
        except Exception as exc:
            if handler is not None:
                log.warning("serving %r failed: %s", name, exc, exc_info=True)
            self._send(_finish, query, None, str(exc))
        else:
            self._send(_finish, query, reply, None)


def _finish(query: zenoh.Query, reply: bytes | None, error: str | None) -> None:
    """Send the reply or the error, then end the query (its final message)."""
    try:
        if reply is not None:
            query.reply(query.key_expr, reply)
        else:
            query.reply_err(error or "failed")
    finally:
        query.drop()
