"""What a stage runner accepts from a peer, sans-IO: frame sizes, items against the model, caches.

A data-plane peer is not trusted to be well-behaved: a frame's sizes are checked from its header
before anything is buffered, its items against the model before the engine sees them, and the
request caches it may create are counted and owned by the connection that created them, so that
one client can neither exhaust the runner nor leave caches behind when it goes.
"""

from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from shoal.net.frames import (
    MAX_LOGIT_BIAS,
    MAX_VERIFY,
    DType,
    Frame,
    FrameError,
    FrameReader,
    WireItem,
    decode_mask,
    mask_chars,
)
from shoal.types.ids import RequestId
from shoal.types.model_config import ModelConfig

INT64_BYTES = 8  # the first stage receives token ids
WIDEST_HIDDEN_BYTES = 4  # float32, the widest wire dtype of hidden states
META_BASE_BYTES = 4096
META_ITEM_BYTES = 1024  # an item's rid, positions and sampling in JSON take a few hundred
LOGIT_BIAS_ENTRY_BYTES = 32  # "[151935,-100.0]," with room for a long float


class LimitExceeded(ValueError):
    """A step asks for more than this stage accepts; it fails alone, the runner serves on."""


@dataclass(frozen=True)
class StageLimits:
    """The model's bounds and the runner's caps, as one stage applies them."""

    first: bool
    hidden_size: int
    vocab_size: int
    context_length: int
    max_step_tokens: int = 8192
    max_items: int = 256
    max_live_requests: int = 64
    keep_positions: int = 0  # cache positions kept for prefixes, all kept caches together

    @classmethod
    def of(
        cls,
        model: ModelConfig,
        *,
        first: bool,
        max_step_tokens: int = 8192,
        max_items: int = 256,
        max_live_requests: int = 64,
    ) -> "StageLimits":
        """The limits of a stage of `model` (first: it receives token ids)."""
        return cls(
            first=first,
            hidden_size=model.hidden_size,
            vocab_size=model.vocab_size,
            context_length=model.max_position_embeddings,
            max_step_tokens=max_step_tokens,
            max_items=max_items,
            max_live_requests=max_live_requests,
        )

    @property
    def max_data_bytes(self) -> int:
        """The most data a legitimate FORWARD to this stage carries."""
        row = INT64_BYTES if self.first else self.hidden_size * WIDEST_HIDDEN_BYTES
        return self.max_step_tokens * row

    @property
    def max_meta_bytes(self) -> int:
        """Every item with a full mask and logit_bias, plus every token id of the step once
        (penalties carry them)."""
        item = (
            META_ITEM_BYTES + mask_chars(self.vocab_size) + MAX_LOGIT_BIAS * LOGIT_BIAS_ENTRY_BYTES
        )
        token = len(str(self.vocab_size)) + 1
        return META_BASE_BYTES + self.max_items * item + self.max_step_tokens * token

    def reader(self) -> FrameReader:
        """A FrameReader that refuses, from the header, any frame larger than these limits."""
        return FrameReader(max_meta_bytes=self.max_meta_bytes, max_data_bytes=self.max_data_bytes)

    def check(self, frame: Frame) -> None:
        """Raise LimitExceeded unless every item of the FORWARD fits the model and the caps."""
        items = frame.items
        if len(items) > self.max_items:
            raise LimitExceeded(f"{len(items)} items in one step (limit {self.max_items})")
        rows = sum(item.length for item in items)
        if rows > self.max_step_tokens:
            raise LimitExceeded(f"{rows} tokens in one step (limit {self.max_step_tokens})")
        for item in items:
            if item.start + item.length > self.context_length:
                raise LimitExceeded(
                    f"request {item.rid}: positions [{item.start}, {item.start + item.length}) "
                    f"run past the context length {self.context_length}"
                )
            if item.verify and item.length > MAX_VERIFY:  # its logits come out at every position
                raise LimitExceeded(
                    f"request {item.rid}: a verify step of {item.length} positions "
                    f"(limit {MAX_VERIFY})"
                )
            self._check_sampling(item)
        if self.first:
            if frame.dtype != DType.INT64:
                raise LimitExceeded(
                    f"the first stage takes int64 token ids, got {frame.dtype.name}"
                )
            ids = frame.array()
            if ids.min() < 0 or ids.max() >= self.vocab_size:
                bad = int(ids[(ids < 0) | (ids >= self.vocab_size)][0])
                raise LimitExceeded(f"token id {bad} outside the vocabulary [0, {self.vocab_size})")
        elif frame.dtype == DType.INT64:
            raise LimitExceeded("this stage takes hidden states, got token ids")
        elif (width := len(frame.data) // (rows * _itemsize(frame.dtype))) != self.hidden_size:
            raise LimitExceeded(f"hidden states {width} wide, the model's are {self.hidden_size}")

    def _check_sampling(self, item: WireItem) -> None:
        """Masks, penalty tokens and logit_bias ids fit the vocabulary."""
        vocab = self.vocab_size
        if item.mask is not None:
            try:
                words = decode_mask(item.mask).shape[0]
            except FrameError as exc:
                raise LimitExceeded(f"request {item.rid}: {exc}") from None
            if words > -(-vocab // 32):
                raise LimitExceeded(f"request {item.rid}: a mask of {words} words for {vocab}")
        if item.tokens and len(item.tokens) != item.length:
            raise LimitExceeded(
                f"request {item.rid}: {len(item.tokens)} penalty tokens, not {item.length}"
            )
        bias = item.sampling.logit_bias if item.sampling is not None else ()
        ids = [*item.tokens, *(t for t, _ in bias)]
        if ids and not 0 <= min(ids) <= max(ids) < vocab:
            raise LimitExceeded(f"request {item.rid}: a token id outside [0, {vocab})")


def _itemsize(dtype: DType) -> int:
    return 4 if dtype == DType.FLOAT32 else 2


class LiveRequests:
    """Which connection owns each live request cache on this stage; at most `cap` of them.

    The owner is the connection whose FORWARD last touched the request: a client that reconnects
    and continues a request takes it over, so the old connection's close does not free it.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._owner: dict[RequestId, Hashable] = {}

    def __len__(self) -> int:
        return len(self._owner)

    def admit(self, owner: Hashable, rids: Iterable[RequestId]) -> list[RequestId]:
        """Give owner the requests; the ones new here. LimitExceeded (nothing changed) past cap."""
        rids = list(rids)
        new = [rid for rid in dict.fromkeys(rids) if rid not in self._owner]
        if len(self._owner) + len(new) > self.cap:
            raise LimitExceeded(
                f"too many live requests ({len(self._owner)} cached, {len(new)} new; "
                f"limit {self.cap}): free some first"
            )
        for rid in rids:
            self._owner[rid] = owner
        return new

    def forget(self, rid: RequestId) -> None:
        """The request's cache was freed."""
        self._owner.pop(rid, None)

    def release(self, owner: Hashable, rids: Iterable[RequestId] | None = None) -> list[RequestId]:
        """Forget and return the requests owner still owns (of rids, or all of them)."""
        candidates = list(self._owner) if rids is None else rids
        mine = [rid for rid in candidates if self._owner.get(rid) is owner]
        for rid in mine:
            del self._owner[rid]
        return mine
