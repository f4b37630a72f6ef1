"""Models served by this node alone: load on demand, one scheduler per loaded model.

The single-node InferenceService. Loading runs on a worker thread and reports progress;
concurrent requests for a model being loaded wait for the same load.
"""

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from shoal.engines.base import Engine
from shoal.engines.registry import create_engine
from shoal.errors import ModelUnavailable, ShoalError
from shoal.inference.pipeline import LocalPipeline
from shoal.inference.request import GenerationEvent, GenerationRequest
from shoal.inference.scheduler import Scheduler
from shoal.inference.service import ModelStatus
from shoal.models.catalog import Catalog, find_local_weights
from shoal.models.source import open_weights
from shoal.models.tokenizer import Tokenizer
from shoal.types.ids import ModelId
from shoal.types.model_card import ModelCard
from shoal.types.model_config import LLAMA_FAMILY
from shoal.types.runner import Failed, Loading, Ready, RunnerStatus
from shoal.types.shard import Shard

log = logging.getLogger(__name__)

ProgressHook = Callable[[ModelId, int, int], None]

# Bits per weight on disk, to estimate the float32 size an engine expands the weights to.
_BITS = {
    "4bit": 4.5,
    "8bit": 8.5,
    "fp16": 16,
    "bf16": 16,
    "fp32": 32,
    "Q4_0": 4.5,
    "Q4_1": 5,
    "Q4_K": 4.5,
    "Q4_K_M": 4.8,
    "Q5_K_M": 5.7,
    "Q6_K": 6.6,
    "Q8_0": 8.5,
    "F16": 16,
    "F32": 32,
}
HEADROOM_BYTES = 512 * 2**20


def resident_bytes(card: ModelCard, context: int) -> int:
    """Memory the torch engine needs for the whole model in float32 plus one full context."""
    weights = card.storage_bytes * 32 / _BITS.get(card.quantization, 16)
    return int(weights) + card.kv_bytes_per_token * 2 * context + HEADROOM_BYTES


@dataclass
class LoadedModel:
    """A model loaded here: the ModelHandle the API generates with."""

    card: ModelCard
    tokenizer: Tokenizer
    context_length: int
    scheduler: Scheduler
    pipeline: LocalPipeline
    task: asyncio.Task[None] = field(repr=False)

    def generate(self, req: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        return self.scheduler.generate(req)


class LocalModels:
    """InferenceService for one node: every model runs whole, in this process."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        engine: str = "torch",
        device: str | None = None,
        max_batch: int = 8,
        auto_load: bool = True,
        on_progress: ProgressHook | None = None,
    ) -> None:
        self._catalog = catalog
        self._engine_name = engine
        self._device = device
        self._max_batch = max_batch
        self._auto_load = auto_load
        self._on_progress = on_progress
        self._loaded: dict[ModelId, LoadedModel] = {}
        self._loading: dict[ModelId, asyncio.Task[LoadedModel]] = {}
        self._states: dict[ModelId, RunnerStatus] = {}
        self._weights: dict[ModelId, tuple[str, Path] | None] = {}

    # --- InferenceService ---------------------------------------------------------------------

    def cards(self) -> list[ModelCard]:
        return self._catalog.all()

    def card(self, model_id: str) -> ModelCard:
        return self._catalog.get(model_id)

    def status(self, card: ModelCard) -> ModelStatus:
        match self._states.get(card.id):
            case Ready():
                return ModelStatus("ready")
            case Loading(done=done, total=total):
                return ModelStatus("loading", progress=(done, total))
            case Failed(reason=failure):
                return ModelStatus("failed", failure)
        why_not = self._why_not(card)
        return ModelStatus("unavailable", why_not) if why_not else ModelStatus("available")

    def active_requests(self) -> int:
        return sum(loaded.scheduler.load for loaded in self._loaded.values())

    async def acquire(self, model_id: str) -> LoadedModel:
        card = self._catalog.get(model_id)
        if (loaded := self._loaded.get(card.id)) is not None:
            return loaded
        if not self._auto_load and card.id not in self._loading:
            raise ModelUnavailable(
                f"model {card.id} is not loaded on this node and loading on request is off"
            )
        return await self.load(card.id)

    # --- loading -------------------------------------------------------------------------------

    async def load(self, model_id: str) -> LoadedModel:
        """Load a model (once, however many callers wait) and start its scheduler."""
        card = self._catalog.get(model_id)
        if (loaded := self._loaded.get(card.id)) is not None:
            return loaded
        task = self._loading.get(card.id)
        if task is None:
            task = asyncio.create_task(self._load(card), name=f"load {card.id}")
            self._loading[card.id] = task
            task.add_done_callback(lambda _: self._loading.pop(card.id, None))
        return await asyncio.shield(task)

    async def _load(self, card: ModelCard) -> LoadedModel:
        if (reason := self._why_not(card)) is not None:
            self._states[card.id] = Failed(reason=reason)
            raise ModelUnavailable(f"cannot run {card.id} here: {reason}")
        self._states[card.id] = Loading(done=0, total=card.layers)
        log.info("loading %s with the %s engine", card.id, self._engine_name)
        try:
            engine, tokenizer = await asyncio.to_thread(self._load_blocking, card)
        except ShoalError as exc:
            self._states[card.id] = Failed(reason=str(exc))
            raise ModelUnavailable(f"cannot load {card.id}: {exc}") from exc
        except Exception as exc:  # a broken file or engine must not take the node down
            log.exception("loading %s failed", card.id)
            self._states[card.id] = Failed(reason=f"{type(exc).__name__}: {exc}")
            raise ModelUnavailable(f"cannot load {card.id}: {type(exc).__name__}: {exc}") from exc
        pipeline = LocalPipeline([engine])
        scheduler = Scheduler(
            pipeline, tokenizer, context_length=card.context_length, max_batch=self._max_batch
        )
        task = asyncio.create_task(scheduler.run(), name=f"scheduler {card.id}")
        loaded = LoadedModel(card, tokenizer, card.context_length, scheduler, pipeline, task)
        self._loaded[card.id] = loaded
        self._states[card.id] = Ready()
        log.info("model %s is ready", card.id)
        return loaded

    def _load_blocking(self, card: ModelCard) -> tuple[Engine, Tokenizer]:
        found = self._local_weights(card)
        assert found is not None  # _why_not checked it
        source = open_weights(found[1])
        tokenizer = source.tokenizer()
        options = {"device": self._device} if self._device else {}
        engine = create_engine(self._engine_name, **options)

        def progress(done: int, total: int) -> None:
            self._states[card.id] = Loading(done=done, total=total)
            if self._on_progress is not None:
                self._on_progress(card.id, done, total)

        shard = Shard.whole(card.id, source.config.num_hidden_layers)
        engine.load(shard, source, progress)
        return engine, tokenizer

    def _local_weights(self, card: ModelCard) -> tuple[str, Path] | None:
        """Where the card's weights are here; looked up once per card (it touches the disk)."""
        if card.id not in self._weights:
            self._weights[card.id] = find_local_weights(card)
        return self._weights[card.id]

    def _why_not(self, card: ModelCard) -> str | None:
        """Why this node cannot run the model now, or None if it can."""
        if card.architecture not in LLAMA_FAMILY:
            return (
                f"architecture {card.architecture} is not supported by the {self._engine_name} "
                f"engine (supported: {', '.join(sorted(LLAMA_FAMILY))})"
            )
        found = self._local_weights(card)
        if found is None:
            where = ", ".join(f"{w.format} {getattr(w, 'repo', '')}".strip() for w in card.weights)
            return f"weights are not on this node (known locations: {where or 'none'})"
        if found[0] not in ("gguf", "safetensors"):
            return f"the {self._engine_name} engine cannot read {found[0]} weights"
        need = resident_bytes(card, min(card.context_length, 8192))
        available = psutil.virtual_memory().available
        if need > available:
            return f"needs about {need / 2**30:.1f} GiB of memory, {available / 2**30:.1f} GiB free"
        return None

    async def close(self) -> None:
        """Stop every scheduler and release every engine."""
        for task in self._loading.values():
            task.cancel()
        for loaded in self._loaded.values():
            loaded.task.cancel()
            await loaded.pipeline.close()
        self._loaded.clear()
