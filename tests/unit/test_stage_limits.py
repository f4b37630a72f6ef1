"""What a stage accepts from a peer: frame caps from the model, item checks, live-cache owners."""

from typing import Any

import numpy as np
import pytest

from shoal.net import frames
from shoal.net.frames import Frame, FrameError, WireItem
from shoal.types.ids import RequestId
from shoal.types.model_config import ModelConfig
from shoal.worker.limits import LimitExceeded, LiveRequests, StageLimits

MODEL = ModelConfig(
    architecture="llama",
    num_hidden_layers=4,
    hidden_size=16,
    intermediate_size=32,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=100,
    max_position_embeddings=64,
)
FIRST = StageLimits.of(MODEL, first=True, max_step_tokens=32, max_items=4, max_live_requests=3)
LATER = StageLimits.of(MODEL, first=False, max_step_tokens=32, max_items=4)


def item(rid: str, start: int, length: int) -> WireItem:
    return WireItem(rid=RequestId(rid), start=start, length=length)


def ids(*spans: tuple[str, int, int], value: int = 1) -> Frame:
    rows = sum(length for _, _, length in spans)
    return frames.forward(1, 1, [item(*s) for s in spans], np.full(rows, value))


def hidden(*spans: tuple[str, int, int], width: int = 16) -> Frame:
    rows = sum(length for _, _, length in spans)
    return frames.forward(1, 1, [item(*s) for s in spans], np.zeros((rows, width), np.float32))


def test_the_data_cap_follows_what_the_stage_can_receive() -> None:
    assert FIRST.max_data_bytes == 32 * 8  # int64 token ids
    assert LATER.max_data_bytes == 32 * 16 * 4  # float32 hidden states, the widest wire dtype
    reader = LATER.reader()
    assert (reader.max_data_bytes, reader.max_meta_bytes) == (2048, LATER.max_meta_bytes)


def test_a_whole_step_at_the_caps_is_read_and_accepted() -> None:
    frame = hidden(("a", 0, 8), ("b", 0, 8), ("c", 0, 8), ("d", 56, 8))  # 4 items, 32 rows
    (back,) = LATER.reader().feed(frames.encode(frame))
    LATER.check(back)
    FIRST.check(ids(("a", 0, 32), value=99))


def test_a_frame_past_the_data_cap_is_refused_by_the_reader() -> None:
    with pytest.raises(FrameError, match="oversized"):
        FIRST.reader().feed(frames.encode(ids(("a", 0, 33))))


@pytest.mark.parametrize(
    ("limits", "frame", "match"),
    [
        (FIRST, ids(("a", 0, 1), ("b", 0, 1), ("c", 0, 1), ("d", 0, 1), ("e", 0, 1)), "5 items"),
        (FIRST, ids(("a", 0, 20), ("b", 0, 13)), "33 tokens"),
        (FIRST, ids(("a", 60, 5)), r"\[60, 65\) run past the context length 64"),
        (FIRST, ids(("a", 0, 2), value=100), r"token id 100 outside the vocabulary \[0, 100\)"),
        (FIRST, ids(("a", 0, 2), value=-1), "token id -1"),
        (FIRST, hidden(("a", 0, 2)), "int64 token ids, got FLOAT32"),
        (LATER, ids(("a", 0, 2)), "takes hidden states"),
        (LATER, hidden(("a", 0, 2), width=8), "8 wide, the model's are 16"),
        (LATER, frames.forward(1, 1, [item("a", 0, 2)], np.zeros((2, 32)), "float16"), "32 wide"),
    ],
    ids=["items", "tokens", "context", "vocab", "negative", "floats", "ids", "width", "width16"],
)
def test_bad_items_are_refused(limits: StageLimits, frame: Frame, match: str) -> None:
    with pytest.raises(LimitExceeded, match=match):
        limits.check(frame)


def test_live_requests_are_capped_and_a_refusal_changes_nothing() -> None:
    live, a, b = LiveRequests(3), object(), object()
    assert live.admit(a, [RequestId("x"), RequestId("y")]) == ["x", "y"]
    assert live.admit(a, [RequestId("x")]) == []  # continuing is not new
    with pytest.raises(LimitExceeded, match="too many live requests"):
        live.admit(b, [RequestId("z"), RequestId("w")])
    assert len(live) == 2
    assert live.admit(b, [RequestId("z")]) == ["z"]
    live.forget(RequestId("z"))
    assert len(live) == 2


def test_a_connection_that_takes_a_request_over_keeps_it_when_the_old_one_closes() -> None:
    live, old, new = LiveRequests(8), object(), object()
    live.admit(old, [RequestId("x"), RequestId("y")])
    live.admit(new, [RequestId("x")])  # a client reconnected and continued x
    assert live.release(old) == ["y"]
    assert live.release(old) == []
    assert live.release(new, [RequestId("x"), RequestId("q")]) == ["x"]
    assert len(live) == 0


# ---- sampling fields: masks, penalty tokens, logit_bias ----


def sampled(**fields: Any) -> Frame:
    wire = frames.WireSampling(
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        **fields.pop("sampling", {}),
    )
    one = WireItem(rid=RequestId("a"), start=0, length=2, sampling=wire, **fields)
    return frames.forward(1, 1, [one], np.array([1, 2]))


def test_every_item_at_its_largest_sampling_fields_fits_the_meta_cap() -> None:
    full = frames.encode_mask(np.full(4, 0xFFFFFFFF, np.uint32))  # ceil(100 / 32) words
    bias: Any = {"logit_bias": tuple((99, -100.123456789) for _ in range(frames.MAX_LOGIT_BIAS))}
    items = [
        WireItem(
            rid=RequestId(f"request-{i:040d}"),
            start=0,
            length=8,
            sampling=frames.WireSampling(
                temperature=1.0, top_p=1.0, top_k=0, seed=2**63 - 1, logprobs=20, **bias
            ),
            fork=RequestId(f"request-{i:040d}.127"),
            mask=full,
            tokens=(99,) * 8,
            prompt_len=63,
        )
        for i in range(4)
    ]
    frame = frames.forward(1, 1, items, np.full(32, 99))
    (back,) = FIRST.reader().feed(frames.encode(frame))
    FIRST.check(back)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"mask": frames.encode_mask(np.zeros(5, np.uint32))}, "mask of 5 words"),
        ({"mask": "not base64!"}, "base64"),
        ({"tokens": (1, 2, 3)}, "3 penalty tokens"),
        ({"tokens": (1, 100)}, "outside"),
        ({"sampling": {"logit_bias": ((100, 1.0),)}}, "outside"),
    ],
)
def test_sampling_fields_outside_the_model_fail_the_step(
    fields: dict[str, object], match: str
) -> None:
    with pytest.raises(LimitExceeded, match=match):
        FIRST.check(sampled(**fields))


def test_a_frame_past_the_meta_cap_is_refused_by_the_reader() -> None:
    huge = frames.encode_mask(np.zeros(LATER.max_meta_bytes // 4, np.uint32))
    frame = frames.forward(
        1,
        1,
        [WireItem(rid=RequestId("a"), start=0, length=1, mask=huge)],
        np.zeros((1, 16), np.float32),
    )
    with pytest.raises(FrameError, match="oversized"):
        LATER.reader().feed(frames.encode(frame))
