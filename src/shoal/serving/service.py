"""The API's view of the cluster: which instance serves a request, placing one when none runs.

ClusterService implements InferenceService over the replicated state. A request goes to the
least-loaded ready instance of its model; with none, the node asks the master to place one and
waits for its runners (auto-placement can be switched off). Each instance this node talks to
gets one InstanceHandle (handles.py), so requests arriving here are batched together per
instance; when a handle's chain breaks, `_recover` drives failover.py's decision until another
chain answers. Every wait is for the state to pass the index it was read at, so no change is
missed between reading the state and waiting.
"""

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from shoal.cluster import ClusterNode
from shoal.errors import ModelNotFound, ModelUnavailable
from shoal.inference.metrics import InstanceLoad, RequestMetrics
from shoal.inference.pipeline import PipelineBroken
from shoal.inference.remote import RemotePipeline
from shoal.inference.service import ModelStatus
from shoal.models.catalog import Catalog, find_local_weights
from shoal.models.source import open_weights
from shoal.models.tokenizer import Tokenizer
from shoal.net.frames import WireDType
from shoal.placer import why_not_runnable, why_unplaceable
from shoal.serving.failover import GiveUp, Place, Use, Wait, next_chain
from shoal.serving.handles import InstanceHandle, open_handle
from shoal.state.model import InstanceRecord
from shoal.types.commands import PlaceModel
from shoal.types.ids import InstanceId, ModelId, new_instance_id
from shoal.types.instance import Instance, Policy
from shoal.types.model_card import ModelCard
from shoal.types.runner import Downloading, Loading

log = logging.getLogger(__name__)

RETRY_REFUSED_S = 1.0  # every ready chain refused a connection: try again after this at most

# A card for an id no catalog knows: a Hugging Face repo id (`org/name`), made from its
# config.json (models/hub_card.py); raises ModelNotFound with one line.
ResolveCard = Callable[[str], Awaitable[ModelCard]]
# Where this node has (or fetches) the config and tokenizer files of a model.
TokenizerFiles = Callable[[ModelCard], Awaitable[Path]]


async def _local_files(card: ModelCard) -> Path:
    found = find_local_weights(card)
    if found is None:
        raise ModelUnavailable(f"this node has no tokenizer for {card.id} (no weights)")
    return found[1]


def least_loaded(
    ready: list[InstanceRecord], load: Callable[[InstanceId], int], turn: int
) -> InstanceRecord:
    """The instance with the fewest requests; among equals, the turn-th (by id). A burst of
    requests all sees the same loads (each counts only once its prompt reaches the scheduler),
    so ties going to one id sent a burst to one instance while the others idled."""
    loads = {r.instance.instance_id: load(r.instance.instance_id) for r in ready}
    least = min(loads.values())
    tied = sorted((r for r in ready if loads[r.instance.instance_id] == least), key=_by_id)
    return tied[turn % len(tied)]


def _by_id(record: InstanceRecord) -> str:
    return record.instance.instance_id


class ClusterService:
    """InferenceService for a node of a cluster."""

    def __init__(
        self,
        cluster: ClusterNode,
        catalog: Catalog,
        *,
        auto_place: bool = True,
        max_batch: int = 8,
        max_queue: int = 64,
        prefill_chunk: int = 256,
        prefix_entries: int = 0,  # kept caches an instance's scheduler starts prompts from
        speculate: int = 0,  # draft tokens a greedy decode step verifies
        wire_dtype: WireDType = "float32",
        tls: ssl.SSLContext | None = None,  # the data plane's client context (RemotePipeline)
        ready_timeout_s: float = 300.0,
        failover_timeout_s: float = 120.0,
        resolve: ResolveCard | None = None,
        tokenizer_files: TokenizerFiles = _local_files,
        metrics: RequestMetrics | None = None,  # what every instance's Scheduler updates
    ) -> None:
        self._metrics = metrics
        self._resolve = resolve
        self._tokenizer_files = tokenizer_files
        self._failover_timeout = failover_timeout_s
        self._cluster = cluster
        self._catalog = catalog
        self._auto_place = auto_place
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._prefill_chunk = prefill_chunk
        self._prefix_entries = prefix_entries
        self._speculate = speculate
        self._wire_dtype = wire_dtype
        self._tls = tls
        self._ready_timeout = ready_timeout_s
        self._handles: dict[InstanceId, InstanceHandle] = {}
        self._turn = 0  # requests routed: ties between instances go round in turn
        self._tokenizers: dict[ModelId, Tokenizer] = {}
        self._connecting: dict[InstanceId, asyncio.Task[InstanceHandle]] = {}
        self._orphans: list[InstanceHandle] = []  # moved onto an instance another handle serves
        self._statuses: dict[tuple[ModelCard, int], ModelStatus] = {}

    # --- InferenceService -------------------------------------------------------------------

    def cards(self) -> list[ModelCard]:
        return self._catalog.all()

    def card(self, model_id: str) -> ModelCard:
        """The catalog's card, or the card an instance of the model was placed with."""
        try:
            return self._catalog.get(model_id)
        except ModelNotFound:
            for record in self._cluster.state.instances.values():
                if record.instance.card is not None and record.instance.model_id == model_id:
                    self._catalog.add(record.instance.card)
                    return record.instance.card
            raise

    async def resolve(self, model_id: str) -> ModelCard:
        """`card`, or for a Hugging Face repo id (`org/name`) a card made from the repo."""
        try:
            return self.card(model_id)
        except ModelNotFound:
            if self._resolve is None or model_id.count("/") != 1:
                raise
        card = await self._resolve(model_id)
        self._catalog.add(card)
        return card

    def active_requests(self) -> int:
        return sum(h.scheduler.load for h in self._handles.values())

    def instance_load(self, instance_id: InstanceId) -> int:
        """Requests this node has running or queued on one instance."""
        handle = self._handles.get(instance_id)
        return handle.scheduler.load if handle else 0

    def loads(self) -> list[InstanceLoad]:
        """The requests running and waiting on every instance this node drives now."""
        return [
            InstanceLoad(
                h.card.id, h.instance_id, h.scheduler.running, h.scheduler.waiting, h.tok_s
            )
            for h in [*self._handles.values(), *self._orphans]
        ]

    def status(self, card: ModelCard) -> ModelStatus:
        """Ready / loading / failed from the instances; else whether placement would fit it.

        A pure function of the card and the replicated state, remembered per state index: the
        model list is read far more often than the state changes.
        """
        key = (card, self._cluster.state.index)
        if (known := self._statuses.get(key)) is None:
            if len(self._statuses) > 4 * len(self._catalog.all()):
                self._statuses.clear()
            known = self._statuses[key] = self._status(card)
        return known

    def _status(self, card: ModelCard) -> ModelStatus:
        records = self._instances(card.id)
        if any(r.ready for r in records):
            return ModelStatus("ready")
        failed = [r for r in records if any(x.status.kind == "failed" for x in r.runners.values())]
        loading = [r for r in records if r not in failed]
        statuses = [x.status for r in loading for x in r.runners.values()]
        downloading = [x for x in statuses if isinstance(x, Downloading)]
        if downloading:
            done, total = sum(x.done for x in downloading), sum(x.total for x in downloading)
            return ModelStatus("downloading", progress=(done, total))
        if loading:
            done = sum(x.done for x in statuses if isinstance(x, Loading))
            total = sum(r.instance.n_layers for r in loading)
            return ModelStatus("loading", progress=(done, total))
        if failed:
            reasons = [getattr(x.status, "reason", "") for x in failed[0].runners.values()]
            return ModelStatus("failed", next((r for r in reasons if r), "a runner failed"))
        if (reason := why_unplaceable(card, self._cluster.state)) is not None:
            return ModelStatus("unavailable", reason)
        return ModelStatus("available")

    async def acquire(self, model_id: str) -> InstanceHandle:
        """A ready instance of the model (or the instance itself, when given an instance id)."""
        try:
            pinned = self._cluster.state.instances.get(InstanceId(model_id))
            if pinned is not None:
                return await self._pinned(pinned.instance.instance_id)
            return await self._ready_instance(await self.resolve(model_id))
        except TimeoutError:
            raise ModelUnavailable(
                f"{model_id} did not become ready within {self._ready_timeout:.0f} s"
            ) from None

    async def _ready_instance(self, card: ModelCard) -> InstanceHandle:
        async with asyncio.timeout(self._ready_timeout):
            while True:
                seen = self._cluster.state.index
                ready = [r for r in self._instances(card.id) if r.ready]
                if ready:
                    return await self._handle(card, self._least_loaded(ready))
                if not self._instances(card.id):
                    if not self._auto_place:
                        raise ModelUnavailable(
                            f"no instance of {card.id} runs in the cluster "
                            "and placing on request is off"
                        )
                    await self.place(card.id)
                failure = self.status(card)
                if failure.status == "failed":
                    raise ModelUnavailable(f"cannot run {card.id}: {failure.reason}")
                await self._cluster.replica.wait_past(seen)

    async def _pinned(self, instance_id: InstanceId) -> InstanceHandle:
        async with asyncio.timeout(self._ready_timeout):
            while True:
                seen = self._cluster.state.index
                record = self._cluster.state.instances.get(instance_id)
                if record is None:
                    raise ModelUnavailable(f"instance {instance_id} is gone")
                if record.ready:
                    card = record.instance.card or self.card(record.instance.model_id)
                    return await self._handle(card, record)
                failed = [r for r in record.runners.values() if r.status.kind == "failed"]
                if failed:
                    raise ModelUnavailable(f"instance {instance_id} failed: {failed[0].status}")
                await self._cluster.replica.wait_past(seen)

    # --- placing -----------------------------------------------------------------------------

    async def place(
        self,
        model_id: str,
        *,
        policy: Policy = "latency",
        layers: str | None = None,
        engine: str | None = None,
    ) -> Instance:
        """Ask the master to place an instance; returns it once this node's state has it."""
        card = await self.resolve(model_id)
        if (reason := why_not_runnable(card)) is not None:
            raise ModelUnavailable(f"cannot run {card.id}: {reason}")
        instance_id = new_instance_id(card.id)
        command = PlaceModel(
            instance_id=instance_id,
            model_id=card.id,
            policy=policy,
            layers=layers,
            engine=engine,
            card=card,  # every worker loads by the card this node placed it with
        )
        result = await self._cluster.command(command)
        if not result.ok:
            raise ModelUnavailable(f"cannot place {card.id}: {result.message}")
        return self._cluster.state.instances[instance_id].instance

    # --- handles -----------------------------------------------------------------------------

    def _instances(self, model_id: ModelId) -> list[InstanceRecord]:
        return [
            r for r in self._cluster.state.instances.values() if r.instance.model_id == model_id
        ]

    def _least_loaded(self, ready: list[InstanceRecord]) -> InstanceRecord:
        self._turn += 1
        return least_loaded(ready, self.instance_load, self._turn)

    async def _handle(self, card: ModelCard, record: InstanceRecord) -> InstanceHandle:
        iid = record.instance.instance_id
        if (handle := self._handles.get(iid)) is not None:
            return handle
        task = self._connecting.get(iid)
        if task is None:
            task = asyncio.create_task(self._connect(card, record))
            self._connecting[iid] = task
            task.add_done_callback(lambda _: self._connecting.pop(iid, None))
        return await asyncio.shield(task)

    async def _connect(self, card: ModelCard, record: InstanceRecord) -> InstanceHandle:
        handle = await open_handle(
            card,
            await self._tokenizer(card),
            record,
            self._recover,
            tls=self._tls,
            wire_dtype=self._wire_dtype,
            max_batch=self._max_batch,
            max_queue=self._max_queue,
            prefill_chunk=self._prefill_chunk,
            prefix_entries=self._prefix_entries,
            speculate=self._speculate,
            metrics=self._metrics,
        )
        self._handles[handle.instance_id] = handle
        log.info(
            "serving %s through instance %s (%d stages)",
            card.id,
            handle.instance_id,
            len(record.instance.stages),
        )
        return handle

    async def _recover(self, handle: InstanceHandle, exc: PipelineBroken) -> RemotePipeline:
        """A working pipeline for the handle's model: a re-placed or restarted instance.

        Asks failover.next_chain what to do after every state change (and when its wait runs
        out), until a chain connects, the model cannot come back, or the failover timeout.
        """
        card, broken = handle.card, handle.pipeline.stage_addrs
        started = time.monotonic()
        placed = False
        try:
            async with asyncio.timeout(self._failover_timeout):
                while True:
                    state = self._cluster.state
                    elapsed = time.monotonic() - started
                    match next_chain(state, card, broken, elapsed, placed=placed):
                        case Use(records):
                            for record in records:
                                pipeline = RemotePipeline(
                                    record.stage_addrs(), tls=self._tls, wire_dtype=self._wire_dtype
                                )
                                try:
                                    await pipeline.connect()
                                except PipelineBroken:
                                    continue
                                self._rekey(handle, record.instance.instance_id, pipeline)
                                return pipeline
                            await self._wait_past(state.index, RETRY_REFUSED_S)
                        case Place():
                            placed = True
                            await self.place(card.id)
                        case GiveUp(reason):
                            raise ModelUnavailable(f"{card.id} lost a stage ({exc}) and {reason}")
                        case Wait(at_most_s):
                            await self._wait_past(state.index, at_most_s)
        except TimeoutError:
            raise ModelUnavailable(
                f"{card.id} lost a stage ({exc}) and no capacity came back within "
                f"{self._failover_timeout:.0f} s"
            ) from None

    async def _wait_past(self, index: int, at_most_s: float | None) -> None:
        """Until the state is past `index`, or at_most_s passed (None: no cap)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(at_most_s):
                await self._cluster.replica.wait_past(index)

    def _rekey(self, handle: InstanceHandle, iid: InstanceId, pipeline: RemotePipeline) -> None:
        """The handle now drives another instance (or the same one, restarted)."""
        if self._handles.get(handle.instance_id) is handle:
            del self._handles[handle.instance_id]
        log.info("instance %s replaced by %s for %s", handle.instance_id, iid, handle.card.id)
        handle.move_to(iid, pipeline)
        if iid in self._handles:
            self._orphans.append(handle)  # finishes its requests; new ones go to the other
        else:
            self._handles[iid] = handle

    async def _tokenizer(self, card: ModelCard) -> Tokenizer:
        if (tokenizer := self._tokenizers.get(card.id)) is None:
            path = await self._tokenizer_files(card)
            tokenizer = await asyncio.to_thread(lambda: open_weights(path).tokenizer())
            self._tokenizers[card.id] = tokenizer
        return tokenizer

    async def prune(self) -> None:
        """Drop handles of instances that are gone; abort the chains the state says are broken.

        A stage on a host that hung or lost its cable never closes its connection: the state
        (liveliness → NodeLost → re-placement) is what tells the API node to fail over.
        """
        state = self._cluster.state
        for handle in [*self._handles.values(), *self._orphans]:
            record = state.instances.get(handle.instance_id)
            if record is None or (
                record.ready and record.stage_addrs() != handle.pipeline.stage_addrs
            ):
                handle.pipeline.abort("the cluster re-placed or restarted a stage")
        for iid in [i for i in self._handles if i not in state.instances]:
            if self._handles[iid].scheduler.load == 0:  # busy ones are failing over
                await self._handles.pop(iid).close()
        for handle in [h for h in self._orphans if h.scheduler.load == 0]:
            self._orphans.remove(handle)
            await handle.close()

    async def close(self) -> None:
        for handle in self._handles.values():
            await handle.close()
        self._handles.clear()
