"""The API's view of the cluster: which instance serves a request, placing one when none runs.

ClusterService implements InferenceService over the replicated state. A request goes to the
least-loaded ready instance of its model; with none, the node asks the master to place one and
waits for its runners (auto-placement can be switched off). Each instance this node talks to
gets one RemotePipeline to its stages and one Scheduler, so requests arriving here are batched
together per instance.
"""

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass

from shoal.cluster import ClusterNode
from shoal.errors import ModelUnavailable
from shoal.inference.pipeline import PipelineBroken
from shoal.inference.remote import RemotePipeline
from shoal.inference.request import GenerationRequest
from shoal.inference.scheduler import RequestStream, Scheduler
from shoal.inference.service import ModelStatus
from shoal.master import Placer
from shoal.models.catalog import Catalog, find_local_weights
from shoal.models.source import open_weights
from shoal.models.tokenizer import Tokenizer
from shoal.net.frames import WireDType
from shoal.placement.place import NoFit, place
from shoal.state.model import InstanceRecord, State
from shoal.types.commands import PlaceModel
from shoal.types.ids import InstanceId, ModelId
from shoal.types.instance import Instance, Policy
from shoal.types.model_card import ModelCard
from shoal.types.model_config import LLAMA_FAMILY
from shoal.types.profile import NodeProfile

log = logging.getLogger(__name__)

SAME_CHAIN_AFTER_S = 3.0  # a broken chain may be retried as is after this (a transient break)


def profiles_of(state: State) -> list[NodeProfile]:
    """Profiles of the nodes that are connected now."""
    return [r.profile for r in state.nodes.values() if r.connected and r.profile is not None]


def why_not_runnable(card: ModelCard) -> str | None:
    """A reason no engine here can run the model at all, or None."""
    if card.architecture not in LLAMA_FAMILY:
        supported = ", ".join(sorted(LLAMA_FAMILY))
        return f"architecture {card.architecture} is not supported yet (supported: {supported})"
    if not any(w.format in ("gguf", "safetensors") for w in card.weights):
        return f"no engine here reads its {card.weights[0].format if card.weights else ''} weights"
    return None


def make_placer(catalog: Catalog) -> Placer:
    """The master's placer: the card from the catalog, the profiles from the state."""

    def placer(command: PlaceModel, state: State) -> Instance | str:
        card = catalog.get(command.model_id)
        if (reason := why_not_runnable(card)) is not None:
            return reason
        usable = [p for p in profiles_of(state) if p.node_id not in command.avoid]
        found = place(
            card,
            usable,
            policy=command.policy,
            overrides=command.layers,
            engine=command.engine,
            instance_id=command.instance_id,
        )
        return found.reason if isinstance(found, NoFit) else found.instance

    return placer


@dataclass
class InstanceHandle:
    """A ready instance as the API uses it (a ModelHandle)."""

    card: ModelCard
    tokenizer: Tokenizer
    instance_id: InstanceId
    scheduler: Scheduler
    pipeline: RemotePipeline
    task: asyncio.Task[None]

    @property
    def context_length(self) -> int:
        return self.card.context_length

    def generate(self, req: GenerationRequest) -> RequestStream:
        return self.scheduler.generate(req)


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
        wire_dtype: WireDType = "float32",
        ready_timeout_s: float = 300.0,
        failover_timeout_s: float = 120.0,
    ) -> None:
        self._failover_timeout = failover_timeout_s
        self._cluster = cluster
        self._catalog = catalog
        self._auto_place = auto_place
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._prefill_chunk = prefill_chunk
        self._wire_dtype = wire_dtype
        self._ready_timeout = ready_timeout_s
        self._handles: dict[InstanceId, InstanceHandle] = {}
        self._tokenizers: dict[ModelId, Tokenizer] = {}
        self._connecting: dict[InstanceId, asyncio.Task[InstanceHandle]] = {}
        self._orphans: list[InstanceHandle] = []  # moved onto an instance another handle serves
        self._statuses: dict[tuple[ModelCard, int], ModelStatus] = {}

    # --- InferenceService -------------------------------------------------------------------

    def cards(self) -> list[ModelCard]:
        return self._catalog.all()

    def card(self, model_id: str) -> ModelCard:
        return self._catalog.get(model_id)

    def active_requests(self) -> int:
        return sum(h.scheduler.load for h in self._handles.values())

    def instance_load(self, instance_id: InstanceId) -> int:
        """Requests this node has running or queued on one instance."""
        handle = self._handles.get(instance_id)
        return handle.scheduler.load if handle else 0

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
        if loading:
            done = sum(getattr(x.status, "done", 0) for r in loading for x in r.runners.values())
            total = sum(r.instance.n_layers for r in loading)
            return ModelStatus("loading", progress=(done, total))
        if failed:
            reasons = [getattr(x.status, "reason", "") for x in failed[0].runners.values()]
            return ModelStatus("failed", next((r for r in reasons if r), "a runner failed"))
        if (reason := why_not_runnable(card)) is not None:
            return ModelStatus("unavailable", reason)
        found = place(card, profiles_of(self._cluster.state), instance_id=InstanceId("preview"))
        if isinstance(found, NoFit):
            return ModelStatus("unavailable", found.reason)
        return ModelStatus("available")

    async def acquire(self, model_id: str) -> InstanceHandle:
        """A ready instance of the model (or the instance itself, when given an instance id)."""
        try:
            pinned = self._cluster.state.instances.get(InstanceId(model_id))
            if pinned is not None:
                return await self._pinned(pinned.instance.instance_id)
            return await self._ready_instance(self._catalog.get(model_id))
        except TimeoutError:
            raise ModelUnavailable(
                f"{model_id} did not become ready within {self._ready_timeout:.0f} s"
            ) from None

    async def _ready_instance(self, card: ModelCard) -> InstanceHandle:
        async with asyncio.timeout(self._ready_timeout):
            while True:
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
                await self._cluster.replica.changed()

    async def _pinned(self, instance_id: InstanceId) -> InstanceHandle:
        async with asyncio.timeout(self._ready_timeout):
            while True:
                record = self._cluster.state.instances.get(instance_id)
                if record is None:
                    raise ModelUnavailable(f"instance {instance_id} is gone")
                if record.ready:
                    card = self._catalog.get(record.instance.model_id)
                    return await self._handle(card, record)
                failed = [r for r in record.runners.values() if r.status.kind == "failed"]
                if failed:
                    raise ModelUnavailable(f"instance {instance_id} failed: {failed[0].status}")
                await self._cluster.replica.changed()

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
        card = self._catalog.get(model_id)
        if (reason := why_not_runnable(card)) is not None:
            raise ModelUnavailable(f"cannot run {card.id}: {reason}")
        instance_id = InstanceId(f"{card.id}-{uuid.uuid4().hex[:8]}")
        command = PlaceModel(
            instance_id=instance_id, model_id=card.id, policy=policy, layers=layers, engine=engine
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
        def load(r: InstanceRecord) -> tuple[int, str]:
            return (self.instance_load(r.instance.instance_id), r.instance.instance_id)

        return min(ready, key=load)

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
        tokenizer = await self._tokenizer(card)
        pipeline = RemotePipeline(record.stage_addrs(), wire_dtype=self._wire_dtype)
        await pipeline.connect()
        iid = record.instance.instance_id
        handle: InstanceHandle

        async def recover(exc: PipelineBroken) -> RemotePipeline:
            return await self._recover(handle, exc)

        scheduler = Scheduler(
            pipeline,
            tokenizer,
            context_length=card.context_length,
            vocab_size=card.vocab_size,
            hidden_size=card.hidden_size,
            max_batch=self._max_batch,
            max_queue=self._max_queue,
            prefill_chunk=self._prefill_chunk,
            recover=recover,
        )
        task = asyncio.create_task(scheduler.run(), name=f"scheduler {iid}")
        handle = InstanceHandle(card, tokenizer, iid, scheduler, pipeline, task)
        self._handles[iid] = handle
        log.info(
            "serving %s through instance %s (%d stages)", card.id, iid, len(record.instance.stages)
        )
        return handle

    async def _recover(self, handle: InstanceHandle, exc: PipelineBroken) -> RemotePipeline:
        """A working pipeline for the handle's model: a re-placed or restarted instance.

        Waits for the state to show a ready instance whose stages differ from the broken chain
        (the master re-places after a lost node; a worker restarts a crashed runner); the same
        chain is tried again only after a grace period, in case the break was transient.
        """
        card, broken = handle.card, handle.pipeline.stage_addrs
        started = time.monotonic()
        placed = False
        try:
            async with asyncio.timeout(self._failover_timeout):
                while True:
                    ready = [r for r in self._instances(card.id) if r.ready]
                    fresh = [r for r in ready if r.stage_addrs() != broken]
                    late = time.monotonic() - started > SAME_CHAIN_AFTER_S
                    for record in fresh or (ready if late else []):
                        pipeline = RemotePipeline(record.stage_addrs(), wire_dtype=self._wire_dtype)
                        try:
                            await pipeline.connect()
                        except PipelineBroken:
                            continue
                        self._rekey(handle, record.instance.instance_id, pipeline)
                        return pipeline
                    if not self._instances(card.id) and not placed:
                        if (why := self.status(card)).status == "unavailable":
                            raise ModelUnavailable(
                                f"{card.id} lost a stage ({exc}) and cannot "
                                f"be re-placed: {why.reason}"
                            )
                        placed = True
                        await self.place(card.id)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):
                            await self._cluster.replica.changed()
        except TimeoutError:
            raise ModelUnavailable(
                f"{card.id} lost a stage ({exc}) and no capacity came back within "
                f"{self._failover_timeout:.0f} s"
            ) from None

    def _rekey(self, handle: InstanceHandle, iid: InstanceId, pipeline: RemotePipeline) -> None:
        """The handle now drives another instance (or the same one, restarted)."""
        if self._handles.get(handle.instance_id) is handle:
            del self._handles[handle.instance_id]
        log.info("instance %s replaced by %s for %s", handle.instance_id, iid, handle.card.id)
        handle.instance_id, handle.pipeline = iid, pipeline
        if iid in self._handles:
            self._orphans.append(handle)  # finishes its requests; new ones go to the other
        else:
            self._handles[iid] = handle

    async def _tokenizer(self, card: ModelCard) -> Tokenizer:
        if (tokenizer := self._tokenizers.get(card.id)) is None:
            found = find_local_weights(card)
            if found is None:
                raise ModelUnavailable(f"this node has no tokenizer for {card.id} (no weights)")
            tokenizer = await asyncio.to_thread(lambda: open_weights(found[1]).tokenizer())
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
                handle = self._handles.pop(iid)
                handle.task.cancel()
                await handle.pipeline.close()
        for handle in [h for h in self._orphans if h.scheduler.load == 0]:
            self._orphans.remove(handle)
            handle.task.cancel()
            await handle.pipeline.close()

    async def close(self) -> None:
        for handle in self._handles.values():
            handle.task.cancel()
            await handle.pipeline.close()
        self._handles.clear()
