"""The replica actor: follows the master's log into the StateStore and keeps it whole.

Entries from the master are applied in order; a gap is repaired by one rate-limited range
request (no request storms, however many entries are missing); on following a new master the
log is reconciled — whatever differs from the master's log, or runs past it, is cut and
re-fetched — so after a partition heals every node holds one log. Every node also answers range
requests from its own journal.
"""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from shoal.net.transport import Transport
from shoal.state.model import State
from shoal.state.store import Compacted, Diverged, StateStore
from shoal.types.events import IndexedEvent
from shoal.types.ids import NodeId
from shoal.types.wire import LogReply, LogRequest

log = logging.getLogger(__name__)

LOG_RPC = "log"


class Replica:
    """Applies the master's entries; repairs gaps; serves the journal; feeds /events watchers."""

    def __init__(
        self,
        store: StateStore,
        transport: Transport,
        *,
        repair_interval_s: float = 0.2,
        request_timeout_s: float = 3.0,
        reconcile_window: int = 1000,
    ) -> None:
        self.store = store
        self._transport = transport
        self._repair_interval = repair_interval_s
        self._timeout = request_timeout_s
        self._window = reconcile_window
        self.master: NodeId | None = None
        self._repair = asyncio.Event()
        self._resync = False  # our log differs from the master's inside our snapshot
        # wait_past's waiters: (past this index, our last index then, resolved to wake it)
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._watchers: set[asyncio.Queue[IndexedEvent | None]] = set()
        # called after entries (or a snapshot: []) changed the state, e.g. to re-check members
        self.listeners: list[Callable[[list[IndexedEvent]], None]] = []
        transport.serve(LOG_RPC, self._serve_log)

    @property
    def state(self) -> State:
        return self.store.state

    # --- entries in ------------------------------------------------------------------------

    def on_entry(self, sender: NodeId, entry: IndexedEvent) -> None:
        """An entry published on global_events; only the followed master's are taken."""
        if sender != self.master:
            log.debug("entry %d from %s, who is not our master: ignored", entry.index, sender)
            return
        try:
            self.applied(self.store.accept(entry))
        except Diverged:
            self._resync = True
        if self._resync or self.store.gap() is not None:
            self._repair.set()

    async def reached(self, index: int) -> None:
        """Until this node's state has applied entry `index` (wrap in a timeout)."""
        while self.store.last_index < index:
            await self.wait_past(self.store.last_index)

    async def wait_past(self, index: int) -> None:
        """Until the state is past entry `index` (at once if it is), or entries up to it changed.

        A condition, not an edge: read `state.index`, look at the state, then wait past that
        index, and a change that lands in between is not missed. Entries at or before `index`
        that replace ours (a new master cut our log) or an installed snapshot also wake it.
        """
        if self.store.last_index > index:
            return
        waiter = (index, self.store.last_index, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            await waiter[2]
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def _wake(self, entries: list[IndexedEvent] | None) -> None:
        """Wake the waiters the state moved past (None: the state was replaced, wake all)."""
        last = self.store.last_index
        first = min((e.index for e in entries), default=last + 1) if entries is not None else 0
        for index, then, future in self._waiters:
            # first <= then: an entry the waiter had seen was replaced
            if (last > index or first <= then) and not future.done():
                future.set_result(None)

    def applied(self, entries: list[IndexedEvent]) -> None:
        """Tell watchers about entries now in the state (the master calls this for its own)."""
        if entries:
            self._wake(entries)
            for listener in list(self.listeners):
                listener(entries)
        for entry in entries:
            for queue in list(self._watchers):
                try:
                    queue.put_nowait(entry)
                except asyncio.QueueFull:  # a watcher that cannot keep up is cut off
                    self._watchers.discard(queue)
                    while not queue.empty():
                        queue.get_nowait()
                    queue.put_nowait(None)

    async def watch(self, maxsize: int = 10_000) -> AsyncIterator[IndexedEvent]:
        """Every entry applied from now on (a slow reader is cut off rather than buffered)."""
        queue: asyncio.Queue[IndexedEvent | None] = asyncio.Queue(maxsize)
        self._watchers.add(queue)
        try:
            while (entry := await queue.get()) is not None:
                yield entry
        finally:
            self._watchers.discard(queue)

    # --- following a master ----------------------------------------------------------------

    async def follow(self, master: NodeId | None) -> None:
        """Switch to a new master (None: none yet) and reconcile our log with its log."""
        self.master = master
        if master is None or master == self._transport.node_id:
            return
        start = max(self.store.first_index, self.store.last_index - self._window + 1, 1)
        reply = await self._ask(master, LogRequest(start=start))
        if reply is None or self.master != master:
            return
        if reply.snapshot_json is not None and not reply.entries:
            self._install(reply)
            return
        mine = {e.index: e for e in self.store.entries(start, self.store.last_index + 1)}
        cut = next((e.index for e in reply.entries if e.index in mine and mine[e.index] != e), None)
        if cut is None and self.store.last_index > reply.last_index:
            cut = reply.last_index + 1  # entries past the master's log are from a deposed master
        try:
            if cut is not None:
                log.warning("log diverged from master %s at index %d: truncating", master, cut)
                self.store.truncate_from(cut)
            self._take(reply.entries)
        except Diverged:
            self._resync = True
        if self._resync or self.store.last_index < reply.last_index:
            self._repair.set()

    async def run(self) -> None:
        """Repair gaps, at most one range request per interval."""
        while True:
            await self._repair.wait()
            self._repair.clear()
            await self._repair_once()
            await asyncio.sleep(self._repair_interval)

    async def _repair_once(self) -> None:
        master = self.master
        if master is None or master == self._transport.node_id:
            return
        gap = self.store.gap()
        start = self.store.last_index + 1
        ask = LogRequest(start=start, end=gap[1] if gap else None, snapshot=self._resync)
        reply = await self._ask(master, ask)
        if reply is None or self.master != master:
            self._repair.set()  # try again after the interval
            return
        try:
            if reply.snapshot_json is not None and not reply.entries:
                self._install(reply)
            else:
                self._take(reply.entries)
        except Diverged:
            self._resync = True
        if self._resync or self.store.gap() is not None or self.store.last_index < reply.last_index:
            self._repair.set()

    def _take(self, entries: tuple[IndexedEvent, ...]) -> None:
        self.applied([a for e in entries for a in self.store.accept(e)])

    def _install(self, reply: LogReply) -> None:
        assert reply.snapshot_json is not None
        state = State.model_validate_json(reply.snapshot_json)
        log.info("installing the master's snapshot at index %d", state.index)
        self.store.install_snapshot(state)
        self._resync = False
        self._wake(None)
        for listener in list(self.listeners):
            listener([])

    async def _ask(self, node: NodeId, req: LogRequest) -> LogReply | None:
        try:
            raw = await self._transport.request(
                node, LOG_RPC, req.model_dump_json().encode(), self._timeout
            )
            return LogReply.model_validate_json(raw)
        except TimeoutError:
            log.info("no log reply from %s in %.1f s", node, self._timeout)
        except Exception as exc:  # a peer's bad reply must not stop the replica
            log.warning("bad log reply from %s: %s", node, exc)
        return None

    # --- serving ---------------------------------------------------------------------------

    async def _serve_log(self, payload: bytes) -> bytes:
        req = LogRequest.model_validate_json(payload)
        last = self.store.last_index
        end = min(req.end if req.end is not None else last + 1, req.start + req.limit, last + 1)
        try:
            if req.snapshot:
                raise Compacted("a snapshot was asked for")
            entries = tuple(self.store.entries(req.start, end)) if req.start <= last else ()
        except Compacted:
            snapshot = self.store.snapshot().model_dump_json()
            return LogReply(last_index=last, snapshot_json=snapshot).model_dump_json().encode()
        return LogReply(entries=entries, last_index=last).model_dump_json().encode()
