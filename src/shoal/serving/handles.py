"""An instance as the API uses it: one RemotePipeline to its stages, one Scheduler, its task.

What happens when the chain breaks is not decided here: `open_handle` takes `recover`, which
ClusterService supplies (see failover.py for the decision and service.py for the loop).
"""

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from shoal.inference.metrics import ModelMetrics, RequestMetrics
from shoal.inference.pipeline import PipelineBroken
from shoal.inference.prefix import PrefixIndex
from shoal.inference.remote import RemotePipeline
from shoal.inference.request import GenerationRequest
from shoal.inference.scheduler import RequestStream, Scheduler
from shoal.models.tokenizer import Tokenizer
from shoal.net.frames import WireDType
from shoal.state.model import InstanceRecord
from shoal.types.ids import InstanceId
from shoal.types.model_card import ModelCard


@dataclass
class InstanceHandle:
    """A ready instance as the API uses it (a ModelHandle)."""

    card: ModelCard
    tokenizer: Tokenizer
    instance_id: InstanceId
    scheduler: Scheduler
    pipeline: RemotePipeline
    task: asyncio.Task[None]
    metrics: ModelMetrics | None = None  # what its scheduler counts (the live tok/s too)

    @property
    def tok_s(self) -> float:
        """Tokens a second it generated for this node's requests lately."""
        return self.metrics.tok_s() if self.metrics is not None else 0.0

    @property
    def context_length(self) -> int:
        return self.card.context_length

    def generate(self, req: GenerationRequest) -> RequestStream:
        return self.scheduler.generate(req)

    def move_to(self, instance_id: InstanceId, pipeline: RemotePipeline) -> None:
        """From now on this handle drives another instance (or the same one, restarted)."""
        self.instance_id, self.pipeline = instance_id, pipeline

    async def close(self) -> None:
        self.task.cancel()
        await self.pipeline.close()


# a working pipeline for the handle whose chain broke (PipelineBroken: the break)
Recover = Callable[[InstanceHandle, PipelineBroken], Awaitable[RemotePipeline]]


async def open_handle(
    card: ModelCard,
    tokenizer: Tokenizer,
    record: InstanceRecord,
    recover: Recover,
    *,
    tls: ssl.SSLContext | None,
    wire_dtype: WireDType,
    max_batch: int,
    max_queue: int,
    prefill_chunk: int,
    prefix_entries: int = 0,
    speculate: int = 0,
    metrics: RequestMetrics | None = None,
) -> InstanceHandle:
    """Connect to the record's stages and start a Scheduler over them (PipelineBroken if down)."""
    pipeline = RemotePipeline(record.stage_addrs(), tls=tls, wire_dtype=wire_dtype)
    await pipeline.connect()
    handle: InstanceHandle

    async def on_broken(exc: PipelineBroken) -> RemotePipeline:
        return await recover(handle, exc)

    counts = metrics.model(card.id) if metrics is not None else None
    scheduler = Scheduler(
        pipeline,
        tokenizer,
        context_length=card.context_length,
        vocab_size=card.vocab_size,
        hidden_size=card.hidden_size,
        max_batch=max_batch,
        max_queue=max_queue,
        prefill_chunk=prefill_chunk,
        prefix=PrefixIndex(prefix_entries) if prefix_entries else None,
        speculate=speculate,
        recover=on_broken,
        metrics=counts,
    )
    iid = record.instance.instance_id
    task = asyncio.create_task(scheduler.run(), name=f"scheduler {iid}")
    handle = InstanceHandle(card, tokenizer, iid, scheduler, pipeline, task, counts)
    return handle
