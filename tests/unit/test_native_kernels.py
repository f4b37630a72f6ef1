"""shoal.engines.native: block formats, their products, and the one-call decode step.

Each check runs on the build for this CPU (AVX2 here) and on the plain-C build that CPUs without
AVX2 get, and the two must agree.
"""

import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.engines import native

BUILDS = {"simd": False, "portable": True}


@pytest.fixture(params=list(BUILDS))
def lib(request: pytest.FixtureRequest) -> native.Library:
    built = native.library(portable=BUILDS[request.param])
    assert built is not None, "the kernels must compile where a C compiler exists"
    return built


def gguf_like(kind: native.Kind, n: int, k: int, seed: int = 0) -> np.ndarray:
    """A matrix a GGUF Q8_0 / Q4_1 block holds exactly: fp16 scales, full-range values."""
    rng = np.random.default_rng(seed)
    blocks = (n, k // 32, 32)
    if kind == "q8":
        q = rng.integers(-127, 128, blocks).astype(np.float32)
        q[..., 0] = 127
        d = (rng.random((*blocks[:2], 1)) * 0.02).astype(np.float16).astype(np.float32)
        return (q * d).reshape(n, k)
    q = rng.integers(0, 16, blocks).astype(np.float32)
    q[..., 0], q[..., 1] = 0, 15
    d = (rng.random((*blocks[:2], 1)) * 0.02).astype(np.float16).astype(np.float32)
    m = (rng.standard_normal((*blocks[:2], 1)) * 0.05).astype(np.float16).astype(np.float32)
    return (q * d + m).reshape(n, k)


@pytest.mark.parametrize("kind", ["q8", "q4"])
@pytest.mark.parametrize("n", [8, 61, 96])  # 61: q4's last group of 8 rows is padded
def test_a_gguf_block_matrix_is_held_exactly(lib: native.Library, kind: str, n: int) -> None:
    weight = gguf_like(kind, n, 96)  # type: ignore[arg-type]
    blocks = native.BlockWeights.quantize(lib, weight, kind, threads=2)  # type: ignore[arg-type]
    np.testing.assert_array_equal(blocks.dequantize(), weight)


@pytest.mark.parametrize("kind", ["q8", "q4"])
def test_the_product_is_within_the_activation_rounding_bound(
    lib: native.Library, kind: str
) -> None:
    # Activations are two int8 digits per block of 32: each off by at most amax / (254 * 254).
    rng = np.random.default_rng(1)
    n, k = 45, 128
    weight = rng.standard_normal((n, k)).astype(np.float32)
    blocks = native.BlockWeights.quantize(lib, weight, kind, threads=2)  # type: ignore[arg-type]
    held = blocks.dequantize()
    x = rng.standard_normal((11, k)).astype(np.float32) * np.linspace(0.1, 10, k, dtype=np.float32)
    step = np.abs(x.reshape(11, k // 32, 32)).max(-1) / (127 * 254) / 2  # [rows, blocks]
    bound = np.repeat(step, 32, axis=1) @ np.abs(held).T  # [rows, n]
    error = np.abs(blocks.matmul(x, threads=2) - x @ held.T)
    assert (error <= bound * 1.01 + 1e-4).all()
    assert error.max() > 0  # activations really were rounded: the bound is not vacuous


@pytest.mark.parametrize("kind", ["q8", "q4"])
def test_a_row_gets_the_same_bits_in_any_batch(lib: native.Library, kind: str) -> None:
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((40, 64)).astype(np.float32)
    blocks = native.BlockWeights.quantize(lib, weight, kind, threads=2)  # type: ignore[arg-type]
    x = rng.standard_normal((19, 64)).astype(np.float32)  # tiles of 8, 8 and 3 rows
    batched = blocks.matmul(x, threads=2)
    for i in range(19):
        np.testing.assert_array_equal(blocks.matmul(x[i : i + 1], threads=1)[0], batched[i])


@pytest.mark.parametrize("kind", ["q8", "q4"])
def test_the_portable_build_computes_what_the_simd_build_does(kind: str) -> None:
    simd, portable = native.library(), native.library(portable=True)
    assert simd is not None and portable is not None
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((33, 160)).astype(np.float32)
    a = native.BlockWeights.quantize(simd, weight, kind)  # type: ignore[arg-type]
    b = native.BlockWeights.quantize(portable, weight, kind)  # type: ignore[arg-type]
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.scales, b.scales)
    x = rng.standard_normal((5, 160)).astype(np.float32)
    np.testing.assert_allclose(a.matmul(x), b.matmul(x), rtol=1e-5, atol=1e-4)


def test_an_input_width_that_is_not_whole_blocks_is_refused(lib: native.Library) -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        native.BlockWeights.quantize(lib, np.zeros((4, 40), np.float32), "q8")


# ---- a forward pass ------------------------------------------------------------------------------

HIDDEN, HEADS, KV, HEAD_DIM, INTER, LAYERS = 64, 4, 2, 16, 96, 2


class Tiny:
    """Random layers for Decoder, with caches [layers, KV, capacity, D] per item."""

    def __init__(self, lib: native.Library, *, bias: bool = False, qk_norm: bool = False) -> None:
        rng = np.random.default_rng(4)
        width = (HEADS + 2 * KV) * HEAD_DIM

        def blocks(n: int, k: int) -> native.BlockWeights:
            w = (rng.standard_normal((n, k)) * k**-0.5).astype(np.float32)
            return native.BlockWeights.quantize(lib, w, "q4", threads=2)

        def vector(size: int, around: float) -> np.ndarray:
            return (around + 0.1 * rng.standard_normal(size)).astype(np.float32)

        layers = [
            native.DecoderLayer(
                blocks(width, HIDDEN),
                blocks(HIDDEN, HEADS * HEAD_DIM),
                blocks(2 * INTER, HIDDEN),
                blocks(HIDDEN, INTER),
                vector(HIDDEN, 1.0),
                vector(HIDDEN, 1.0),
                vector(width, 0.0) if bias else None,
                vector(HEAD_DIM, 1.0) if qk_norm else None,
                vector(HEAD_DIM, 1.0) if qk_norm else None,
            )
            for _ in range(LAYERS)
        ]
        self.layers, self.inv_freq = layers, (0.3 ** np.arange(HEAD_DIM // 2)).astype(np.float32)
        self.decoder = native.Decoder(
            lib,
            hidden=HIDDEN,
            heads=HEADS,
            kv_heads=KV,
            head_dim=HEAD_DIM,
            inter=INTER,
            eps=1e-5,
            inv_freq=self.inv_freq,
            layers=layers,
        )
        self.rng = rng

    def caches(self, items: int, capacity: int = 32) -> tuple[np.ndarray, np.ndarray]:
        shape = (items, LAYERS, KV, capacity, HEAD_DIM)
        k = self.rng.standard_normal(shape).astype(native.Decoder.CACHE_DTYPE)
        return k, self.rng.standard_normal(shape).astype(native.Decoder.CACHE_DTYPE)

    def hidden(self, rows: int) -> np.ndarray:
        return self.rng.standard_normal((rows, HIDDEN)).astype(np.float32)

    def forward(
        self, h: np.ndarray, k: np.ndarray, v: np.ndarray, rows: list[tuple[int, int]]
    ) -> np.ndarray:
        """h [rows, hidden] after every layer, row r being (item, position); k, v [items,
        layers, KV, capacity, D] are written in place."""
        out = np.array(h, np.float32, order="C")
        items = k.shape[0]
        self.decoder.forward(
            out.ctypes.data,
            np.array([i for i, _ in rows], np.int64),
            np.array([p for _, p in rows], np.int64),
            np.array([k[i].ctypes.data for i in range(items)], np.uint64),
            np.array([v[i].ctypes.data for i in range(items)], np.uint64),
            np.full(items, k.shape[3], np.int64),
            2,
        )
        return out


@pytest.mark.parametrize("variant", [{}, {"bias": True}, {"qk_norm": True}])
def test_items_of_a_batch_get_what_they_get_alone(
    lib: native.Library, variant: dict[str, bool]
) -> None:
    tiny = Tiny(lib, **variant)
    h = tiny.hidden(3)
    k, v = tiny.caches(3)
    positions = [0, 7, 20]  # each item attends over its own prefix length
    k_alone, v_alone = k.copy(), v.copy()
    together = tiny.forward(h, k, v, list(enumerate(positions)))
    for b, pos in enumerate(positions):
        alone = tiny.forward(h[b : b + 1], k_alone[b : b + 1], v_alone[b : b + 1], [(0, pos)])
        np.testing.assert_array_equal(alone[0], together[b])
    np.testing.assert_array_equal(k, k_alone)  # the same keys and values were written
    np.testing.assert_array_equal(v, v_alone)


def test_a_prompt_gives_the_bits_that_decoding_it_row_by_row_gives(lib: native.Library) -> None:
    # What failover relies on: replaying a request's tokens as one prompt rebuilds exactly the
    # cache and the hidden states it had, so greedy decoding continues with the same tokens.
    tiny = Tiny(lib, qk_norm=True)
    h = tiny.hidden(6)
    k, v = tiny.caches(1)
    k_steps, v_steps = k.copy(), v.copy()
    prompt = tiny.forward(h, k, v, [(0, p) for p in range(6)])
    steps = np.concatenate(
        [tiny.forward(h[p : p + 1], k_steps, v_steps, [(0, p)]) for p in range(6)]
    )
    np.testing.assert_array_equal(prompt, steps)
    np.testing.assert_array_equal(k[:, :, :, :6], k_steps[:, :, :, :6])
    np.testing.assert_array_equal(v[:, :, :, :6], v_steps[:, :, :, :6])


def reference(tiny: Tiny, h: np.ndarray) -> np.ndarray:
    """A prompt h [T, hidden] at positions 0.. through Tiny's layers in float64 numpy: the
    dequantized weights, exact activations, keys and values rounded to the cache's fp16."""

    def norm(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * weight

    def rotate(x: np.ndarray) -> np.ndarray:  # [T, heads, D], the halves layout
        angle = np.arange(len(x))[:, None] * tiny.inv_freq.astype(np.float64)  # [T, D / 2]
        cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
        a, b = x[..., : HEAD_DIM // 2], x[..., HEAD_DIM // 2 :]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    t, group = len(h), HEADS // KV
    x = h.astype(np.float64)
    causal = np.tril(np.ones((t, t), bool))
    for layer in tiny.layers:
        qkv = norm(x, layer.attn_norm) @ layer.qkv.dequantize().T.astype(np.float64)
        q, k, v = np.split(qkv.reshape(t, HEADS + 2 * KV, HEAD_DIM), [HEADS, HEADS + KV], axis=1)
        q, k = rotate(q), rotate(k).astype(np.float16).astype(np.float64)
        v = v.astype(np.float16).astype(np.float64)
        out = np.empty((t, HEADS, HEAD_DIM))
        for head in range(HEADS):
            scores = q[:, head] @ k[:, head // group].T / np.sqrt(HEAD_DIM)  # [T, T]
            scores = np.where(causal, scores, -np.inf)
            p = np.exp(scores - scores.max(-1, keepdims=True))
            out[:, head] = (p / p.sum(-1, keepdims=True)) @ v[:, head // group]
        x = x + out.reshape(t, -1) @ layer.o.dequantize().T.astype(np.float64)
        assert layer.gate_up is not None and layer.down is not None  # dense layers
        gate, up = np.split(norm(x, layer.mlp_norm) @ layer.gate_up.dequantize().T, 2, axis=-1)
        x = x + (gate / (1 + np.exp(-gate)) * up) @ layer.down.dequantize().T.astype(np.float64)
    return x


@pytest.mark.parametrize("length", [300, 1000])
def test_a_long_prompt_matches_float_arithmetic(lib: native.Library, length: int) -> None:
    # Attention runs in pieces of 128 cached positions, merged per head; 1000 rows make more
    # pieces than one pass holds (4096), so they run in several passes.
    tiny = Tiny(lib)
    h = tiny.hidden(length)
    k, v = tiny.caches(1, capacity=length)
    got = tiny.forward(h, k, v, [(0, p) for p in range(length)])
    want = reference(tiny, h)
    # 15-bit activations: each product within ~1e-4 of exact, relative to its inputs' size
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-4 * np.abs(want).max())
    assert np.abs(got - want).mean() < 2e-4 * np.abs(want).mean()


def test_a_long_prompt_gives_the_bits_of_decoding_it_row_by_row(lib: native.Library) -> None:
    tiny = Tiny(lib)
    h = tiny.hidden(260)
    k, v = tiny.caches(1, capacity=260)
    k_steps, v_steps = k.copy(), v.copy()
    prompt = tiny.forward(h, k, v, [(0, p) for p in range(260)])
    steps = [tiny.forward(h[p : p + 1], k_steps, v_steps, [(0, p)]) for p in range(260)]
    np.testing.assert_array_equal(prompt, np.concatenate(steps))


def test_a_pass_writes_its_positions_and_leaves_the_rest_of_the_cache(
    lib: native.Library,
) -> None:
    tiny = Tiny(lib)
    k, v = tiny.caches(2)
    before_k, before_v = k.copy(), v.copy()
    out = tiny.forward(tiny.hidden(3), k, v, [(0, 5), (1, 2), (1, 3)])
    assert np.isfinite(out).all()
    for item, written in ((0, {5}), (1, {2, 3})):
        changed = (k[item] != before_k[item]).any(axis=(0, 1, 3))  # [capacity]
        assert changed.tolist() == [i in written for i in range(k.shape[3])]
        assert ((v[item] != before_v[item]).any(axis=(0, 1, 3)) == changed).all()


def test_the_portable_pass_computes_what_the_simd_one_does() -> None:
    simd, portable = native.library(), native.library(portable=True)
    assert simd is not None and portable is not None
    a, b = Tiny(simd, qk_norm=True), Tiny(portable, qk_norm=True)
    h = a.hidden(2)
    ka, va = a.caches(2)
    kb, vb = ka.copy(), va.copy()
    rows = [(0, 3), (1, 30)]
    np.testing.assert_allclose(
        a.forward(h, ka, va, rows), b.forward(h, kb, vb, rows), rtol=1e-3, atol=1e-3
    )


def test_a_position_past_the_cache_or_an_unknown_item_is_refused(lib: native.Library) -> None:
    tiny = Tiny(lib)
    k, v = tiny.caches(1, capacity=4)
    with pytest.raises(ValueError, match="no room"):
        tiny.forward(tiny.hidden(1), k, v, [(0, 4)])
    with pytest.raises(ValueError, match="no cache"):
        tiny.forward(tiny.hidden(1), k, v, [(1, 0)])


# ---- building ----------------------------------------------------------------------------------


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", **env},
        timeout=120,
    )


def test_the_kernels_can_be_turned_off() -> None:
    done = run_python("from shoal.engines import native; print(native.library())", SHOAL_NATIVE="0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None"


def test_a_compiler_that_fails_leaves_the_kernels_off_with_one_warning(tmp_path: Path) -> None:
    code = (
        "import logging; logging.basicConfig(level=logging.WARNING);"
        "from shoal.engines import native; print(native.library())"
    )
    done = run_python(code, CC="/bin/false", XDG_CACHE_HOME=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None"
    warnings = [line for line in done.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "did not compile" in warnings[0]


def test_kernels_are_compiled_once_and_cached(tmp_path: Path) -> None:
    code = "from shoal.engines import native; print(native.library().path)"
    first = run_python(code, XDG_CACHE_HOME=str(tmp_path))
    assert first.returncode == 0, first.stderr
    built = Path(first.stdout.strip())
    assert built.is_relative_to(tmp_path / "shoal" / "kernels")
    stamp = built.stat().st_mtime_ns
    second = run_python(code, XDG_CACHE_HOME=str(tmp_path))
    assert second.returncode == 0, second.stderr
    assert Path(second.stdout.strip()) == built and built.stat().st_mtime_ns == stamp
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # no temporary left


# ---- routed experts (qwen3_moe) ------------------------------------------------------------------

EXPERTS, TOP, MOE_INTER = 32, 4, 64


def routed_decoder(lib: native.Library, norm: bool) -> tuple[native.Decoder, list]:
    """A decoder of LAYERS routed layers whose attention adds nothing (o is zeros), so each layer
    is h + experts(RMSNorm(h)) alone; and its layers."""
    rng = np.random.default_rng(9)
    width = (HEADS + 2 * KV) * HEAD_DIM

    def blocks(n: int, k: int, scale: float = 1.0) -> native.BlockWeights:
        w = (rng.standard_normal((n, k)) * scale * k**-0.5).astype(np.float32)
        return native.BlockWeights.quantize(lib, w, "q4", threads=2)

    layers = [
        native.DecoderLayer(
            blocks(width, HIDDEN),
            blocks(HIDDEN, HEADS * HEAD_DIM, scale=0.0),
            None,
            None,
            np.ones(HIDDEN, np.float32),
            (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32),
            experts=native.RoutedExperts(
                router=rng.standard_normal((EXPERTS, HIDDEN)).astype(np.float32),
                gate_up=[blocks(2 * MOE_INTER, HIDDEN) for _ in range(EXPERTS)],
                down=[blocks(HIDDEN, MOE_INTER) for _ in range(EXPERTS)],
                top_k=TOP,
                norm_topk_prob=norm,
            ),
        )
        for _ in range(LAYERS)
    ]
    inv_freq = (0.3 ** np.arange(HEAD_DIM // 2)).astype(np.float32)
    decoder = native.Decoder(
        lib, hidden=HIDDEN, heads=HEADS, kv_heads=KV, head_dim=HEAD_DIM, inter=INTER, eps=1e-5,
        inv_freq=inv_freq, layers=layers, moe_inter=MOE_INTER,
    )  # fmt: skip
    return decoder, layers


def routed_pass(decoder: native.Decoder, h: np.ndarray) -> np.ndarray:
    """h [rows, hidden] after the decoder, each row its own item at position 0."""
    out = np.array(h, np.float32, order="C")
    rows = len(h)
    k = np.zeros((rows, LAYERS, KV, 1, HEAD_DIM), native.Decoder.CACHE_DTYPE)
    v = np.zeros_like(k)
    decoder.forward(
        out.ctypes.data, np.arange(rows, dtype=np.int64), np.zeros(rows, np.int64),
        np.array([c.ctypes.data for c in k], np.uint64),
        np.array([c.ctypes.data for c in v], np.uint64), np.ones(rows, np.int64), 2,
    )  # fmt: skip
    return out


def routed_reference(layers: list, h: np.ndarray, top: int, norm: bool) -> np.ndarray:
    """routed_decoder's layers in numpy: moe.route_softmax over the router, each chosen expert
    by the same block products row by row (BlockWeights.matmul)."""
    from shoal.engines.numpy.moe import route_softmax

    for layer in layers:
        x = h / np.sqrt((h * h).mean(-1, keepdims=True) + 1e-5) * layer.mlp_norm
        idx, weights = route_softmax(x @ layer.experts.router.T, top, norm)  # [rows, top]
        out = np.zeros_like(h)
        for r in range(len(x)):
            for e, w in zip(idx[r], weights[r], strict=True):
                gate, up = np.split(layer.experts.gate_up[e].matmul(x[r : r + 1], 2), 2, axis=-1)
                act = gate / (1 + np.exp(-gate)) * up  # [1, MOE_INTER]
                out[r] += w * layer.experts.down[e].matmul(act, 2)[0]
        h = h + out
    return h


@pytest.mark.parametrize("norm", [True, False])
def test_routed_experts_equal_softmax_routing_over_the_block_products(
    lib: native.Library, norm: bool
) -> None:
    """32 experts, top 4: the router's choice and weights as moe.route_softmax, each expert by
    the same block products from Python; a row's bits the same in any batch."""
    decoder, layers = routed_decoder(lib, norm)
    h = np.random.default_rng(3).standard_normal((19, HIDDEN)).astype(np.float32)
    got, want = routed_pass(decoder, h), routed_reference(layers, h, TOP, norm)
    # measured 3.0e-4 over values ~4, either build: float orders (RMSNorm, router, SiLU) move a
    # few 15-bit activation roundings; routing each row to one expert fewer moves it by 0.17
    assert np.abs(got - want).max() < 1e-3
    assert np.abs(routed_reference(layers, h, TOP - 1, norm) - want).max() > 1e-1
    for r in (0, 7, 18):
        np.testing.assert_array_equal(routed_pass(decoder, h[r : r + 1])[0], got[r])


def test_a_routed_layer_that_does_not_fit_is_refused(lib: native.Library) -> None:
    _, layers = routed_decoder(lib, True)
    inv_freq = np.ones(HEAD_DIM // 2, np.float32)
    kwargs: dict[str, Any] = dict(hidden=HIDDEN, heads=HEADS, kv_heads=KV, head_dim=HEAD_DIM,
                                  inter=INTER, eps=1e-5, inv_freq=inv_freq)  # fmt: skip
    layer = layers[0]
    assert layer.experts is not None
    with pytest.raises(ValueError, match="experts of width 0"):
        native.Decoder(lib, layers=[layer], **kwargs)
    wide = native.RoutedExperts(layer.experts.router, layer.experts.gate_up,
                                layer.experts.down, EXPERTS + 1, True)  # fmt: skip
    with pytest.raises(ValueError, match="top 33 of 32"):
        native.Decoder(lib, layers=[replace(layer, experts=wide)], moe_inter=MOE_INTER, **kwargs)
    with pytest.raises(ValueError, match="gate_up is None"):
        native.Decoder(lib, layers=[replace(layer, experts=None)], moe_inter=MOE_INTER, **kwargs)
