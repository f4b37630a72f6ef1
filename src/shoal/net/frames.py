"""The data-plane wire format between an API node and the stage runners, sans-IO.

A frame is a fixed little-endian header, a small JSON meta and raw data bytes:

    magic "SHDP" | version u8 | kind u8 | dtype u8 | flags u8 | session u64 | step u64
    | meta length u32 | data length u64 | meta (UTF-8 JSON) | data

FORWARD data is the batch's token ids (int64 [sum T]) or hidden states ([sum T, hidden], float32
by default, float16/bfloat16 on request) concatenated along the token axis in item order. The
format is engine-neutral: any engine on any machine can read what any other one wrote.

The meta of a FORWARD says, per item, how the last stage samples (WireSampling), and may carry a
constraint's mask, the token ids a penalty counts, and the request whose cache to copy first;
a RESULT's, the sampled tokens and, when asked, their logprobs.
"""

import base64
import binascii
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Literal

import numpy as np
from pydantic import Field, ValidationError

from shoal.errors import ShoalError
from shoal.types.ids import RequestId
from shoal.types.message import Message

MAGIC = b"SHDP"
VERSION = 2  # 2: penalties, logit_bias, min_p, logprobs, masks and forks in the meta
HEADER = struct.Struct("<4sBBBBQQIQ")  # 36 bytes
MAX_META_BYTES = 1 << 20
# The default for readers that trust their peer; a stage runner sets a cap from its model
# (worker/limits.py) so that a header cannot make it buffer gigabytes.
MAX_DATA_BYTES = 1 << 32

FLAG_STAGE_LOST = 1  # on ERROR: a stage could not reach the next one (meta.stage says which)


class Kind(IntEnum):
    """What a frame is for."""

    HELLO = 1
    FORWARD = 2
    RESULT = 3
    FREE = 4
    ERROR = 5


class DType(IntEnum):
    """How the data bytes are encoded; NONE for frames without data."""

    NONE = 0
    INT64 = 1
    FLOAT32 = 2
    FLOAT16 = 3
    BFLOAT16 = 4


WireDType = Literal["float32", "float16", "bfloat16"]
HIDDEN_DTYPES: dict[str, DType] = {
    "float32": DType.FLOAT32,
    "float16": DType.FLOAT16,
    "bfloat16": DType.BFLOAT16,
}
_ITEMSIZE = {DType.NONE: 1, DType.INT64: 8, DType.FLOAT32: 4, DType.FLOAT16: 2, DType.BFLOAT16: 2}


class FrameError(ShoalError):
    """Bytes that are not a frame this side understands; the connection must be closed."""


MAX_LOGIT_BIAS = 300  # entries of one request's logit_bias
MAX_LOGPROBS = 20  # top logprobs of one token
# positions of one speculative verify step (the last token and its drafts): each gives a row of
# logits, so the last stage's answer stays small
MAX_VERIFY = 17


class WireSampling(Message):
    """What the last stage needs to pick a token (stops and lengths stay with the caller)."""

    temperature: float
    top_p: float
    top_k: int
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    logit_bias: tuple[tuple[int, float], ...] = Field(default=(), max_length=MAX_LOGIT_BIAS)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)


class WireItem(Message):
    """One request's slice of a FORWARD: `length` rows of the data, starting at `start`.

    fork: first make this request's cache a copy of the first `start` positions of fork's.
    mask: the tokens the last stage may sample (base64 of little-endian uint32 bitmask words).
    tokens, prompt_len: for penalties, the item's token ids and its prompt's length.
    """

    rid: RequestId
    start: int = Field(ge=0)
    length: int = Field(gt=0)
    sampling: WireSampling | None = None
    fork: RequestId | None = None
    mask: str | None = None
    tokens: tuple[int, ...] = ()
    prompt_len: int | None = Field(default=None, ge=0)
    verify: bool = False  # the last stage answers the greedy token at every position
    rewind: bool = False  # first drop what the caches hold from `start` on


def encode_mask(mask: np.ndarray) -> str:
    """A uint32 bitmask as the meta carries it."""
    return base64.b64encode(mask.astype("<u4", copy=False).tobytes()).decode("ascii")


def decode_mask(text: str) -> np.ndarray:
    """The uint32 bitmask of encode_mask's text; FrameError when it is not one."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FrameError("a mask that is not base64") from None
    if len(raw) % 4:
        raise FrameError(f"a mask of {len(raw)} B is not whole uint32 words")
    return np.frombuffer(raw, dtype="<u4")


def mask_chars(vocab_size: int) -> int:
    """The base64 length of a full mask for a vocabulary."""
    return 4 * -(-4 * -(-vocab_size // 32) // 3)


class WireLogprob(Message):
    """The sampled token's raw logprob and the top ones' (ids and logprobs, most likely first)."""

    logprob: float
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


class HelloMeta(Message):
    """First frame each way: who is talking, in which protocol version."""

    protocol: int
    role: Literal["client", "listener", "stage"]


class ForwardMeta(Message):
    """The batch's items, in data order."""

    items: tuple[WireItem, ...] = Field(min_length=1)


class ResultMeta(Message):
    """One sampled token per item; None where no token was asked for. Logprobs, when any item
    asked for them, one per item (None where not asked)."""

    tokens: tuple[int | None, ...]
    logprobs: tuple[WireLogprob | None, ...] = ()
    # verify items: the greedy tokens at the positions after the first, per item (() for others)
    following: tuple[tuple[int, ...], ...] = ()


class FreeMeta(Message):
    """Drop this request's cache (and sampler) on every stage; keep: hold the cache for later
    requests to start from (prefix caching: inference/prefix.py), as long as the stage's budget
    allows."""

    rid: RequestId
    keep: bool = False


class ErrorMeta(Message):
    """Why a step failed; `stage` names the unreachable stage when FLAG_STAGE_LOST is set."""

    message: str
    stage: str | None = None


Meta = HelloMeta | ForwardMeta | ResultMeta | FreeMeta | ErrorMeta
_META: dict[Kind, type[Message]] = {
    Kind.HELLO: HelloMeta,
    Kind.FORWARD: ForwardMeta,
    Kind.RESULT: ResultMeta,
    Kind.FREE: FreeMeta,
    Kind.ERROR: ErrorMeta,
}


@dataclass(frozen=True)
class Frame:
    """One decoded frame; `meta` is the model of its kind."""

    kind: Kind
    meta: Meta
    session: int = 0
    step: int = 0
    dtype: DType = DType.NONE
    data: bytes = b""
    flags: int = 0

    @property
    def items(self) -> tuple[WireItem, ...]:
        """The items of a FORWARD frame."""
        if not isinstance(self.meta, ForwardMeta):
            raise FrameError(f"a {self.kind.name} frame has no items")
        return self.meta.items

    def array(self) -> np.ndarray:
        """The data: int64 [sum T] or float32 [sum T, hidden] (a read-only view when possible)."""
        rows = sum(item.length for item in self.items)
        flat = _decode_data(self.data, self.dtype)
        return flat if self.dtype == DType.INT64 else flat.reshape(rows, -1)

    def arrays(self) -> list[np.ndarray]:
        """The data split per item: [T] token ids or [T, hidden] hidden states each."""
        if len(self.items) == 1:
            return [self.array()]
        bounds = np.cumsum([item.length for item in self.items])[:-1]
        return np.split(self.array(), bounds)


# ---- building frames ----


def hello(session: int, role: Literal["client", "listener", "stage"]) -> Frame:
    """The handshake frame; a listener's session says which results it wants."""
    return Frame(Kind.HELLO, HelloMeta(protocol=VERSION, role=role), session=session)


def forward(
    session: int,
    step: int,
    items: Sequence[WireItem],
    data: np.ndarray,
    wire_dtype: WireDType = "float32",
) -> Frame:
    """A batch: int token ids [sum T] travel as int64, hidden states [sum T, h] as wire_dtype."""
    if data.dtype.kind in "iu":
        dtype, raw = DType.INT64, data.astype("<i8", copy=False).tobytes()
    else:
        dtype = HIDDEN_DTYPES[wire_dtype]
        raw = _encode_floats(data, dtype)
    return Frame(Kind.FORWARD, ForwardMeta(items=tuple(items)), session, step, dtype, raw)


def result(
    session: int,
    step: int,
    tokens: Sequence[int | None],
    logprobs: Sequence[WireLogprob | None] = (),
    following: Sequence[tuple[int, ...]] = (),
) -> Frame:
    """The sampled tokens of one step (and their logprobs, if asked; a verify item's greedy
    tokens after the first), in item order."""
    meta = ResultMeta(tokens=tuple(tokens), logprobs=tuple(logprobs), following=tuple(following))
    return Frame(Kind.RESULT, meta, session, step)


def free(session: int, rid: RequestId, keep: bool = False) -> Frame:
    """Free one request on every stage (keep: hold its cache as a prefix for later ones)."""
    return Frame(Kind.FREE, FreeMeta(rid=rid, keep=keep), session)


def error(session: int, step: int, message: str, *, lost_stage: str | None = None) -> Frame:
    """A failed step; with lost_stage, the stage at that address is unreachable."""
    flags = FLAG_STAGE_LOST if lost_stage is not None else 0
    meta = ErrorMeta(message=message, stage=lost_stage)
    return Frame(Kind.ERROR, meta, session, step, flags=flags)


def parse_addr(addr: str) -> tuple[str, int]:
    """("host", port) of "host:port" or "[v6 host]:port"."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"bad data-plane address {addr!r}; expected host:port")
    return host.removeprefix("[").removesuffix("]"), int(port)


def format_addr(host: str, port: int) -> str:
    """The address "host:port", with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---- bytes ----


def encode(frame: Frame) -> bytes:
    """Header + meta + data, ready for one write()."""
    meta = frame.meta.model_dump_json().encode("utf-8")
    header = HEADER.pack(
        MAGIC,
        VERSION,
        frame.kind,
        frame.dtype,
        frame.flags,
        frame.session,
        frame.step,
        len(meta),
        len(frame.data),
    )
    return b"".join((header, meta, frame.data))


class FrameReader:
    """Bytes in, whole frames out, however the stream is cut. After a FrameError, stop feeding.

    Sizes are checked from the header, before any of the meta or data is buffered.
    """

    def __init__(
        self, max_meta_bytes: int = MAX_META_BYTES, max_data_bytes: int = MAX_DATA_BYTES
    ) -> None:
        self.max_meta_bytes = max_meta_bytes
        self.max_data_bytes = max_data_bytes
        self._buffer = bytearray()
        self._header: tuple[Kind, DType, int, int, int, int, int] | None = None

    def feed(self, chunk: bytes) -> list[Frame]:
        """Every frame completed by chunk, in order."""
        self._buffer += chunk
        frames: list[Frame] = []
        while True:
            if self._header is None:
                if len(self._buffer) < HEADER.size:
                    return frames
                self._header = self._parse_header(bytes(self._buffer[: HEADER.size]))
                del self._buffer[: HEADER.size]
            kind, dtype, flags, session, step, meta_len, data_len = self._header
            if len(self._buffer) < meta_len + data_len:
                return frames
            meta = bytes(self._buffer[:meta_len])
            data = bytes(self._buffer[meta_len : meta_len + data_len])
            del self._buffer[: meta_len + data_len]
            self._header = None
            frames.append(_build(kind, dtype, flags, session, step, meta, data))

    @property
    def partial(self) -> bool:
        """Whether part of a frame has arrived and the rest has not."""
        return self._header is not None or bool(self._buffer)

    def _parse_header(self, raw: bytes) -> tuple[Kind, DType, int, int, int, int, int]:
        magic, version, kind, dtype, flags, session, step, meta_len, data_len = HEADER.unpack(raw)
        if magic != MAGIC:
            raise FrameError(f"bad magic {magic!r}: not a shoal data-plane stream")
        if version != VERSION:
            raise FrameError(f"peer speaks data-plane protocol v{version}, this side v{VERSION}")
        try:
            kind, dtype = Kind(kind), DType(dtype)
        except ValueError:
            raise FrameError(f"unknown frame kind {kind} or dtype {dtype}") from None
        if meta_len > self.max_meta_bytes or data_len > self.max_data_bytes:
            raise FrameError(
                f"oversized frame: meta {meta_len} B (limit {self.max_meta_bytes}), "
                f"data {data_len} B (limit {self.max_data_bytes})"
            )
        if kind != Kind.FORWARD and data_len:
            raise FrameError(f"a {kind.name} frame carries no data, got {data_len} B")
        if kind == Kind.FORWARD and (dtype == DType.NONE or data_len % _ITEMSIZE[dtype]):
            raise FrameError(f"FORWARD data of {data_len} B are not whole {dtype.name} values")
        return kind, dtype, flags, session, step, meta_len, data_len


def _build(
    kind: Kind, dtype: DType, flags: int, session: int, step: int, meta: bytes, data: bytes
) -> Frame:
    """A frame from its parts, checked: the meta fits the kind and the data fits the items."""
    try:
        parsed = _META[kind].model_validate_json(meta)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise FrameError(f"bad {kind.name} meta: {first['loc']}: {first['msg']}") from None
    assert isinstance(parsed, Meta)
    frame = Frame(kind, parsed, session, step, dtype, data, flags)
    if kind == Kind.FORWARD:
        rows = sum(item.length for item in frame.items)
        values, rest = divmod(len(data), _ITEMSIZE[dtype])
        per_row, odd = divmod(values, rows)
        if dtype == DType.NONE or rest or odd or (dtype == DType.INT64 and per_row != 1):
            raise FrameError(f"FORWARD data of {len(data)} B ({dtype.name}) do not fit {rows} rows")
    elif data:
        raise FrameError(f"a {kind.name} frame carries no data, got {len(data)} B")
    return frame


def _encode_floats(array: np.ndarray, dtype: DType) -> bytes:
    """Little-endian bytes of a float array in the wire dtype."""
    if dtype == DType.FLOAT32:
        return array.astype("<f4", copy=False).tobytes()
    if dtype == DType.FLOAT16:
        return array.astype("<f2").tobytes()
    bits = array.astype("<f4", copy=False).view("<u4")
    # round to nearest even on the 16 bits dropped; NaN stays a (quiet) NaN
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> 16
    packed = np.where(np.isnan(array), np.uint32(0x7FC0), rounded).astype("<u2")
    return packed.tobytes()


def _decode_data(data: bytes, dtype: DType) -> np.ndarray:
    """A flat int64 or float32 array of the data bytes."""
    if dtype == DType.INT64:
        return np.frombuffer(data, dtype="<i8")
    if dtype == DType.FLOAT32:
        return np.frombuffer(data, dtype="<f4")
    if dtype == DType.FLOAT16:
        return np.frombuffer(data, dtype="<f2").astype(np.float32)
    if dtype == DType.BFLOAT16:
        return (np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    raise FrameError("a frame without data has no array")
