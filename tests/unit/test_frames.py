"""The data-plane frame format: round trips of every kind and dtype, streaming, refusals."""

import json
import struct

import numpy as np
import pytest

from shoal.net import frames
from shoal.net.frames import HEADER, DType, Frame, FrameError, FrameReader, Kind, WireItem
from shoal.types.ids import RequestId

GREEDY = frames.WireSampling(temperature=0.0, top_p=1.0, top_k=0, seed=None)
ITEMS = (
    WireItem(rid=RequestId("a"), start=0, length=3, sampling=None),
    WireItem(rid=RequestId("b"), start=7, length=1, sampling=GREEDY),
)
HIDDEN = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)


def roundtrip(frame: Frame) -> Frame:
    (back,) = FrameReader().feed(frames.encode(frame))
    return back


@pytest.mark.parametrize(
    "frame",
    [
        frames.hello(2**64 - 1, "listener"),
        frames.hello(0, "client"),
        frames.result(5, 9, [None, 17]),
        frames.free(5, RequestId("req-1")),
        frames.error(5, 9, "engine fell over"),
        frames.error(5, 9, "unreachable", lost_stage="10.0.0.2:7000"),
        frames.forward(5, 9, ITEMS, np.array([1, 2, 3, 4])),
    ],
    ids=lambda f: f.kind.name,
)
def test_every_kind_round_trips(frame: Frame) -> None:
    assert roundtrip(frame) == frame


def test_token_ids_travel_as_int64() -> None:
    frame = roundtrip(frames.forward(1, 2, ITEMS, np.array([5, 6, 7, 8], dtype=np.int32)))
    assert frame.dtype == DType.INT64
    np.testing.assert_array_equal(frame.array(), [5, 6, 7, 8])
    first, second = frame.arrays()
    np.testing.assert_array_equal(first, [5, 6, 7])
    np.testing.assert_array_equal(second, [8])
    assert frame.items == ITEMS


@pytest.mark.parametrize(
    ("wire", "dtype", "rtol"),
    [
        ("float32", DType.FLOAT32, 0),
        ("float16", DType.FLOAT16, 1e-3),
        ("bfloat16", DType.BFLOAT16, 8e-3),
    ],
)
def test_hidden_states_in_every_wire_dtype(
    wire: frames.WireDType, dtype: DType, rtol: float
) -> None:
    frame = roundtrip(frames.forward(1, 2, ITEMS, HIDDEN, wire))
    assert frame.dtype == dtype
    assert len(frame.data) == HIDDEN.size * (4 if wire == "float32" else 2)
    out = frame.array()
    assert out.dtype == np.float32 and out.shape == HIDDEN.shape
    np.testing.assert_allclose(out, HIDDEN, rtol=rtol, atol=0)
    assert [a.shape for a in frame.arrays()] == [(3, 8), (1, 8)]


def test_bfloat16_rounds_to_nearest_even_and_keeps_specials() -> None:
    values = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, np.inf, -np.inf, np.nan, -0.0])
    items = (WireItem(rid=RequestId("a"), start=0, length=7),)
    out = roundtrip(frames.forward(0, 0, items, values[:, None], "bfloat16")).array()[:, 0]
    # 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0)
    np.testing.assert_array_equal(out[:5], [1.0, 1.0, 1.0 + 2**-6, np.inf, -np.inf])
    assert np.isnan(out[5]) and out[6] == 0 and np.signbit(out[6])


def test_header_layout_is_fixed_little_endian() -> None:
    frame = frames.result(0x0102030405060708, 3, [1])
    raw = frames.encode(frame)
    assert HEADER.size == 36
    magic, version, kind, dtype, flags, session, step, meta_len, data_len = HEADER.unpack(raw[:36])
    assert (magic, version, kind, dtype, flags) == (
        b"SHDP",
        frames.VERSION,
        Kind.RESULT,
        DType.NONE,
        0,
    )
    assert (session, step, data_len) == (0x0102030405060708, 3, 0)
    assert raw[8:16] == bytes([8, 7, 6, 5, 4, 3, 2, 1])
    assert json.loads(raw[36 : 36 + meta_len]) == {"tokens": [1], "logprobs": [], "following": []}


def test_incremental_feeding_byte_by_byte() -> None:
    sent = [
        frames.hello(1, "client"),
        frames.forward(1, 1, ITEMS, HIDDEN),
        frames.free(1, RequestId("a")),
        frames.result(1, 1, [None, 3]),
    ]
    stream = b"".join(frames.encode(f) for f in sent)
    reader = FrameReader()
    got: list[Frame] = []
    for i in range(len(stream)):
        got += reader.feed(stream[i : i + 1])
    assert got == sent
    assert FrameReader().feed(stream) == sent  # and all at once


def header(**overrides: int | bytes) -> bytes:
    fields: dict[str, int | bytes] = {
        "magic": b"SHDP",
        "version": frames.VERSION,
        "kind": Kind.FREE,
        "dtype": 0,
        "flags": 0,
        "session": 0,
        "step": 0,
        "meta": 0,
        "data": 0,
    }
    fields.update(overrides)
    return HEADER.pack(*fields.values())


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (header(magic=b"HTTP"), "magic"),
        (header(version=frames.VERSION + 1), f"v{frames.VERSION + 1}"),
        (header(kind=99), "kind"),
        (header(dtype=42), "dtype"),
        (header(meta=(1 << 20) + 1), "oversized"),
        (header(data=(1 << 32) + 1), "oversized"),
        (header(meta=2) + b"{}", "FREE meta"),
        (header(kind=Kind.RESULT, meta=14, data=1) + b'{"tokens":[1]}x', "no data"),
        (header(kind=Kind.FORWARD, dtype=DType.INT64, meta=12, data=8) + b'{"items":[]}x', "items"),
    ],
    ids=["magic", "version", "kind", "dtype", "meta-size", "data-size", "meta", "data", "empty"],
)
def test_bad_frames_are_refused(raw: bytes, match: str) -> None:
    with pytest.raises(FrameError, match=match):
        FrameReader().feed(raw + b"\0" * 16)


def test_forward_data_must_fit_the_items() -> None:
    good = frames.encode(frames.forward(0, 0, ITEMS, HIDDEN))
    meta_len = struct.unpack_from("<I", good, 24)[0]
    cut = bytearray(good[:-4])
    struct.pack_into("<Q", cut, 28, len(cut) - 36 - meta_len)
    with pytest.raises(FrameError, match="do not fit 4 rows"):
        FrameReader().feed(bytes(cut))


def test_reader_limits_are_parameters() -> None:
    with pytest.raises(FrameError, match="oversized"):
        FrameReader(max_data_bytes=64).feed(frames.encode(frames.forward(0, 0, ITEMS, HIDDEN)))


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (header(kind=Kind.FORWARD, dtype=DType.INT64, meta=40, data=4 << 30), "data 4294967296 B"),
        (header(kind=Kind.FORWARD, dtype=DType.INT64, meta=(64 << 10) + 1, data=8), "meta 65537"),
        (header(kind=Kind.FREE, meta=20, data=1 << 20), "FREE frame carries no data"),
        (header(kind=Kind.FORWARD, dtype=DType.NONE, meta=40, data=8), "not whole NONE"),
        (header(kind=Kind.FORWARD, dtype=DType.FLOAT32, meta=40, data=6), "not whole FLOAT32"),
    ],
    ids=["4GiB-data", "big-meta", "data-on-free", "no-dtype", "odd-bytes"],
)
def test_headers_are_refused_before_their_body_arrives(raw: bytes, match: str) -> None:
    reader = FrameReader(max_meta_bytes=64 << 10, max_data_bytes=1 << 20)
    with pytest.raises(FrameError, match=match):
        reader.feed(raw)  # the header alone: nothing of the body is awaited or buffered


def test_a_frame_of_exactly_the_limits_is_read() -> None:
    frame = frames.forward(0, 0, ITEMS, HIDDEN)
    raw = frames.encode(frame)
    meta_len = struct.unpack_from("<I", raw, 24)[0]
    reader = FrameReader(max_meta_bytes=meta_len, max_data_bytes=HIDDEN.nbytes)
    assert reader.feed(raw) == [frame]


def test_partial_says_when_a_frame_is_midway() -> None:
    raw = frames.encode(frames.forward(0, 0, ITEMS, HIDDEN))
    reader = FrameReader()
    assert not reader.partial
    assert reader.feed(raw[:10]) == [] and reader.partial  # part of the header
    assert reader.feed(raw[10:40]) == [] and reader.partial  # header parsed, body to come
    assert len(reader.feed(raw[40:])) == 1 and not reader.partial


def test_items_only_on_forward() -> None:
    with pytest.raises(FrameError, match="no items"):
        _ = frames.hello(0, "client").items


@pytest.mark.parametrize(
    ("addr", "parsed"),
    [("127.0.0.1:5000", ("127.0.0.1", 5000)), ("[::1]:80", ("::1", 80))],
)
def test_addresses(addr: str, parsed: tuple[str, int]) -> None:
    assert frames.parse_addr(addr) == parsed
    assert frames.format_addr(*parsed) == addr
    with pytest.raises(ValueError, match="host:port"):
        frames.parse_addr("nohost")
