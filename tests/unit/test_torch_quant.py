"""The torch engine's weight formats: each computes x @ W.T within its stated error."""

import pytest

torch = pytest.importorskip("torch")

from shoal.engines import native  # noqa: E402
from shoal.engines.torch.engine import TorchEngine  # noqa: E402
from shoal.engines.torch.quant import INT4_GROUP, Blocked, pack  # noqa: E402
from shoal.errors import BadRequest  # noqa: E402

CPU = torch.device("cpu")
# Error of y = x @ W.T relative to max |y|, for weights ~N(0, 1): fp16 rounds at 2^-11, int8 per
# block (or row) at amax / 254, int4 per group of 32 at (max - min) / 30; the block kernels add
# activations as two int8 digits per block of 32 (amax / 254^2, negligible).
TOLERANCE = {"none": 0.0, "fp16": 1e-3, "int8": 0.02, "int4": 0.08}


@pytest.mark.parametrize("quant", list(TOLERANCE))
def test_each_format_computes_the_linear_layer(quant: str) -> None:
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 128, generator=gen), torch.randn(96, generator=gen)
    x = torch.randn(2, 3, 128, generator=gen)  # [B, T, in]: any leading dims
    want = torch.nn.functional.linear(x, weight, bias)
    got = pack(weight, bias, quant, device=CPU, dtype=torch.float32)(x)  # type: ignore[arg-type]
    assert got.shape == want.shape and got.dtype == torch.float32
    error = float((got - want).abs().max() / want.abs().max())
    assert error <= TOLERANCE[quant]


@pytest.mark.parametrize("quant", list(TOLERANCE))
def test_a_row_gets_the_same_result_in_any_batch(quant: str) -> None:
    # To float32 rounding: the kernels block a batch of 1 and of 8 differently.
    gen = torch.Generator().manual_seed(1)
    proj = pack(torch.randn(64, 96, generator=gen), None, quant, device=CPU, dtype=torch.float32)  # type: ignore[arg-type]
    rows = torch.randn(8, 96, generator=gen)
    batched = proj(rows)
    for i in range(8):
        torch.testing.assert_close(proj(rows[i : i + 1])[0], batched[i], rtol=1e-5, atol=1e-4)


def test_int4_holds_a_gguf_q4_1_matrix_without_loss() -> None:
    # Q4_1: each block of 32 is q * d + m with q in 0..15, d and m fp16; a full block uses 0 and 15.
    gen = torch.Generator().manual_seed(2)
    rows, blocks = 48, 4
    q = torch.randint(0, 16, (rows, blocks, INT4_GROUP), generator=gen).float()
    q[..., 0], q[..., 1] = 0, 15
    d = (torch.rand(rows, blocks, 1, generator=gen) * 0.01).half().float()
    m = (torch.randn(rows, blocks, 1, generator=gen) * 0.01).half().float()
    weight = (q * d + m).reshape(rows, blocks * INT4_GROUP)
    proj = pack(weight, None, "int4", device=CPU, dtype=torch.float32)
    assert isinstance(proj, Blocked), "the block kernels should compile on a machine with cc"
    held = torch.from_numpy(proj.blocks.dequantize())
    assert torch.equal(held, weight)


def test_int8_holds_a_gguf_q8_0_matrix_without_loss() -> None:
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(-127, 128, (40, 3, INT4_GROUP), generator=gen).float()
    q[..., 0] = 127  # llama.cpp's quantizer maps each block's largest magnitude to ±127
    d = (torch.rand(40, 3, 1, generator=gen) * 0.01).half().float()
    weight = (q * d).reshape(40, 3 * INT4_GROUP)
    proj = pack(weight, None, "int8", device=CPU, dtype=torch.float32)
    assert isinstance(proj, Blocked)
    assert torch.equal(torch.from_numpy(proj.blocks.dequantize()), weight)


def test_the_block_kernels_compile_for_this_machine() -> None:
    lib = native.library()
    assert lib is not None, "cc failed: see the warning logged by shoal.engines.native"


def test_an_unknown_format_is_refused_with_the_choices() -> None:
    with pytest.raises(BadRequest, match="none, fp16, int8, int4"):
        TorchEngine(device="cpu", quant="int3")
