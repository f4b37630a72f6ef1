"""TorchEngine: runs one shard of a Llama-family model with torch on CPU, CUDA or MPS."""

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from shoal.engines.adapt import adapt
from shoal.engines.args import ModelArgs
from shoal.engines.base import ProgressFn, StepInput, WeightSource, check_batch
from shoal.engines.cache import CacheStore, cache_dims
from shoal.engines.native import engine as native
from shoal.engines.packed import Packed, dense
from shoal.engines.torch import graphs
from shoal.engines.torch.llama import Block, Context, Model, attention_mask, rope_frequencies
from shoal.engines.torch.models import build_model
from shoal.engines.torch.quant import Quant, check_quant, head_format
from shoal.errors import BadRequest, UnsupportedModel
from shoal.types.ids import RequestId
from shoal.types.shard import Shard

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_device() -> str:
    """cuda if available, else mps if available, else cpu."""
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class TorchEngine:
    """The Engine protocol over the torch model files: weights in `dtype` or `quant`, I/O fp32.

    An int8 or int4 shard on the CPU in float32 runs on the native engine (native/engine.py:
    block weights, fp16 KV cache, one native call a pass) where its kernels compile, and this
    engine passes every call through: torch's own CPU int8/int4 kernels were slower.
    """

    name = "torch"

    def __init__(
        self, device: str | None = None, dtype: str = "float32", quant: str = "none"
    ) -> None:
        if dtype not in DTYPES:
            raise BadRequest(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}", param="dtype")
        self.device = torch.device(device or default_device())
        self.dtype = DTYPES[dtype]
        self.quant: Quant = check_quant(quant)  # the projections' weight format (quant.py)
        self._model: Model | None = None
        self._caches: CacheStore[torch.Tensor] | None = None
        self._native: native.NativeEngine | None = None  # the int8/int4 CPU shard, where it runs
        self._graphs: graphs.DecodeGraphs | None = None  # decode steps on CUDA (graphs.py)

    def load(self, shard: Shard, source: WeightSource, progress: ProgressFn | None = None) -> None:
        """Build the shard's modules without memory, fill them from source, pack each layer."""
        if self._hands_to_native(ModelArgs.from_config(source.config)):
            # torch's rotary frequencies, so the logits are those torch's model file would give
            self._native = native.NativeEngine(
                self.quant,
                torch.get_num_threads(),
                rope=lambda a, long: rope_frequencies(a, long).numpy(),
            )
            self._native.load(shard, source, progress)
            return
        with torch.device("meta"):
            model = build_model(source.config, shard)
        # granite, phi3 as llama (scales rounded for blocks where the projections are blocks)
        blocks = self.quant in ("int8", "int4")
        tensors = adapt(source.config, source.tensors(shard), blocks=blocks)
        expected = dict(model.named_parameters())
        missing = sorted(expected.keys() - tensors.keys())
        unexpected = sorted(tensors.keys() - expected.keys())
        if missing or unexpected:
            raise UnsupportedModel(
                f"weights do not fit {source.config.architecture} shard {shard}: "
                f"missing {missing}, unexpected {unexpected}"
            )
        total = shard.end - shard.start
        if progress is not None:
            progress(0, total)
        for name in expected:
            if not name.startswith("model.layers."):
                self._assign(model, name, tensors[name], expected[name].shape)
        for done, index in enumerate(range(shard.start, shard.end), start=1):
            prefix = f"model.layers.{index}."
            for name in (n for n in expected if n.startswith(prefix)):
                self._assign(model, name, tensors[name], expected[name].shape)
            block = model.model.layers[str(index)]
            assert isinstance(block, Block)
            packed = {  # MLX-packed projections: block weights take them exactly
                n.removeprefix(prefix).removesuffix(".weight"): t
                for n, t in tensors.items()
                if n.startswith(prefix) and isinstance(t, Packed)
            }
            block.pack(self.quant, self.device, self.dtype, packed)  # one layer's floats at a time
            if progress is not None:
                progress(done, total)
        if model.args.tie_word_embeddings and shard.is_whole and self.quant == "none":
            assert model.lm_head is not None and model.model.embed_tokens is not None
            model.lm_head.weight = model.model.embed_tokens.weight  # one copy, not two
        head = tensors.get("lm_head.weight")
        packed_head = head if isinstance(head, Packed) else None
        model.pack_head(head_format(self.quant, self.device), self.device, self.dtype, packed_head)
        self._model = model.to(self.device).eval()  # moves the rope buffer; weights are there
        dims = cache_dims(model.args)  # per key/value head, or deepseek_v3's latent
        dtype, device = self.dtype, self.device
        self._caches = CacheStore(
            shard.end - shard.start,
            dims.heads,
            dims.key_dim,
            lambda shape: torch.zeros(shape, dtype=dtype, device=device),
            value_dim=dims.value_dim,
        )
        # A routed layer picks its experts from the data, which a CUDA graph cannot replay.
        replayable = graphs.enabled(self.device) and model.args.num_experts == 0
        self._graphs = graphs.DecodeGraphs() if replayable else None
        log.info(
            "loaded %s on %s (%s, weights %s)",
            shard,
            self.device,
            str(self.dtype).removeprefix("torch."),
            self.quant,
        )

    def forward(self, batch: Sequence[StepInput], *, all_logits: bool = False) -> list[np.ndarray]:
        """Run each item after its cached prefix; items of equal length run as one batch."""
        if self._native is not None:
            return self._native.forward(batch, all_logits=all_logits)
        model, caches = self._loaded()
        self._check(batch)
        outputs: list[np.ndarray] = [np.empty(0)] * len(batch)
        groups: dict[int, list[int]] = {}
        for i, item in enumerate(batch):
            groups.setdefault(item.length, []).append(i)
        squeeze = model.shard.is_last and not all_logits  # logits [vocab] of the last position
        with torch.inference_mode():
            for t, indices in groups.items():
                items = [batch[i] for i in indices]
                out = self._run(model, caches, items, t, all_logits)  # [B, T or 1, width]
                for i, row in zip(indices, out, strict=True):
                    outputs[i] = row[0] if squeeze else row
        return outputs

    def free(self, request_id: RequestId) -> None:
        """Drop the request's cache; unknown ids are ignored."""
        if self._native is not None:
            self._native.free(request_id)
        if self._caches is not None:
            self._caches.free(request_id)

    def set_threads(self, threads: int) -> None:
        """torch's intra-op threads of the calling thread, and the native kernels' if it runs
        there."""
        torch.set_num_threads(max(1, threads))
        if self._native is not None:
            self._native.set_threads(threads)

    def close(self) -> None:
        """Release every cache and the weights."""
        if self._native is not None:
            self._native.close()
        self._native = None
        self._model = None
        self._caches = None
        self._graphs = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def cache_length(self, request_id: RequestId) -> int:
        """Positions cached for the request (0 if none)."""
        if self._native is not None:
            return self._native.cache_length(request_id)
        return self._caches.length(request_id) if self._caches is not None else 0

    def cached_positions(self) -> int:
        """Positions the caches of every request hold together."""
        if self._native is not None:
            return self._native.cached_positions()
        return self._caches.positions if self._caches is not None else 0

    def fork(self, source: RequestId, target: RequestId, length: int) -> None:
        """target's cache := source's first `length` positions (n choices of one prompt share its
        prefill); ValueError if source holds fewer."""
        if self._native is not None:
            self._native.fork(source, target, length)
            return
        self._loaded()[1].fork(source, target, length)

    def truncate(self, request_id: RequestId, length: int) -> None:
        """Keep only the first `length` positions of the request's cache (what a speculative
        step wrote past its accepted tokens goes); ValueError if it holds fewer."""
        if self._native is not None:
            self._native.truncate(request_id, length)
            return
        self._loaded()[1].truncate(request_id, length)

    def _hands_to_native(self, args: ModelArgs) -> bool:
        """Whether the shard runs on the native engine: int8/int4 on the CPU in float32."""
        cpu = self.device.type == "cpu" and self.dtype == torch.float32
        return cpu and native.runs(self.quant, args)

    def _assign(
        self, model: Model, name: str, tensor: np.ndarray | Packed, shape: torch.Size
    ) -> None:
        """A projection stays a float32 CPU tensor until pack(); the rest goes to the device.
        A packed (MLX) tensor is dequantized to the float32 values it stands for."""
        array = dense(tensor)
        projection = name.endswith(("_proj.weight", "_proj.bias")) or name == "lm_head.weight"
        if projection:
            _assign(model, name, array, shape, torch.device("cpu"), torch.float32)
        else:
            _assign(model, name, array, shape, self.device, self.dtype)

    def _loaded(self) -> tuple[Model, CacheStore[torch.Tensor]]:
        if self._model is None or self._caches is None:
            raise RuntimeError("TorchEngine.forward before load()")
        return self._model, self._caches

    def _check(self, batch: Sequence[StepInput]) -> None:
        """Refuse a batch that cannot run, before any cache changes."""
        model, caches = self._loaded()
        check_batch(
            batch,
            caches.length,
            first=model.shard.is_first,
            hidden_size=model.args.hidden_size,
            vocab_size=model.args.vocab_size,
        )

    def _run(
        self,
        model: Model,
        caches: CacheStore[torch.Tensor],
        items: Sequence[StepInput],
        t: int,
        all_logits: bool,
    ) -> np.ndarray:
        """One batched pass over items of the same length t; commits their caches."""
        first = model.shard.is_first
        stacked = np.stack([item.data for item in items])  # [B, T] or [B, T, hidden]
        x = torch.from_numpy(stacked.astype(np.int64 if first else np.float32))
        x = x.to(self.device) if first else x.to(self.device, self.dtype)
        starts = [item.start for item in items]
        positions = torch.tensor(starts, device=self.device)[:, None] + torch.arange(
            t, device=self.device
        )  # [B, T]
        kv = [caches.get(item.request_id) for item in items]
        for cache in kv:
            cache.reserve(cache.length + t)
        if t == 1 and self._graphs is not None:
            out = self._graphs.step(model, kv, x, positions, all_logits)
        else:
            masks = [attention_mask(s, t, self.device) for s in starts]
            ctx = Context(kv, [m for m, _ in masks], [c for _, c in masks])
            out = model(x, positions, ctx, all_logits=all_logits)  # [B, T or 1, width]
        result = out.float().cpu().numpy()
        for cache in kv:
            cache.advance(t)
        return result


def _assign(
    model: nn.Module,
    name: str,
    array: np.ndarray,
    shape: torch.Size,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """Put one checkpoint array in place of the meta parameter of the same name."""
    if tuple(array.shape) != tuple(shape):
        raise UnsupportedModel(f"{name}: shape {tuple(array.shape)}, expected {tuple(shape)}")
    # A read-only array (a memory map) is copied: torch tensors must be writable.
    tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
    tensor = tensor.to(device=device, dtype=dtype)
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner), leaf, nn.Parameter(tensor, requires_grad=False))
