"""The GGUF weight types the engine runs as stored (Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, BF16, besides
Q4_0 / Q8_0 / F16 / F32): dequantization bit for bit against gguf-py's reference, the activation
quantizer of the K types against llama.cpp's algorithm in NumPy, every product against a float64 NumPy
reference on random blocks and ragged shapes, and every ISA path against the scalar one bit for bit,
with 8-bit activations (each type's partner: Q8_0 or Q8_K) and with float activations."""

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from qora._core import _cpu
from qora.dtypes import QK, QK_K, WEIGHT_TYPES
from qora.engine import ISA_NAMES

FEATS = _cpu.cpu_features()
ISAS = [i for i, n in enumerate(ISA_NAMES) if n in FEATS["cpu_supports"] and n in FEATS["compiled"]]
SCALAR = ISA_NAMES.index("scalar")
BLOCK_TYPES = [n for n, t in WEIGHT_TYPES.items() if t.quantized]
NEW_TYPES = ["q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"]


def rng():
    return np.random.default_rng()  # fresh inputs every run


def random_blocks(r, dtype, rows, cols):
    """Random bytes in the type's block layout with finite f16 scales (and minimums) of a model's size."""
    t = WEIGHT_TYPES[dtype]
    if not t.quantized:
        if dtype == "bf16":
            return (r.standard_normal((rows, cols)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return r.standard_normal((rows, cols)).astype(t.numpy)
    nb = rows * cols // t.block
    raw = r.integers(0, 256, size=(nb, t.block_bytes), dtype=np.uint8)
    for k, off in enumerate(t.scales):
        mag = 0.002 if t.block == QK_K else 0.02  # K types: d times a 6-bit (or int8) sub-scale
        v = (r.random(nb) * mag + mag / 20) * (1 if k == 0 else -r.integers(0, 2, nb) * 2 + 1)
        raw[:, off : off + 2] = v.astype("<f2").view(np.uint8).reshape(nb, 2)
    return raw.reshape(rows, -1)


def reference_values(raw, dtype, rows, cols):
    """gguf-py's dequantization of the stored bytes (float32)."""
    if dtype in ("f32", "f16"):
        return raw.astype(np.float32)
    flat = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    return gguf_dequantize(flat, GGMLQuantizationType[WEIGHT_TYPES[dtype].gguf]).reshape(rows, cols)


def widths(dtype):
    b = WEIGHT_TYPES[dtype].block
    if b == 1:
        return [1, 7, 33, 100, 576]
    if b == QK:
        return [32, 96, 160, 576, 1568]
    return [256, 768, 1536, 2304]


@pytest.mark.parametrize("dtype", [*BLOCK_TYPES, "bf16", "f16", "f32"])
def test_dequant_row_is_gguf_bit_for_bit(dtype):
    r = rng()
    for cols in widths(dtype):
        rows = 5
        raw = random_blocks(r, dtype, rows, cols)
        want = reference_values(raw, dtype, rows, cols)
        for i in range(rows):
            got = _cpu.dequant_row(raw, dtype, rows, cols, i)
            np.testing.assert_array_equal(got.view(np.uint32), want[i].view(np.uint32), err_msg=f"{dtype} {cols}")


def ref_quantize_q8k(x):
    """llama.cpp's quantize_row_q8_K_ref in NumPy float32: (d, q, bsums) per 256."""
    xb = x.reshape(-1, QK_K).astype(np.float32)
    i = np.abs(xb).argmax(axis=1)
    vmax = xb[np.arange(len(xb)), i]
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(vmax != 0, np.float32(-127.0) / vmax, np.float32(0)).astype(np.float32)
        q = np.minimum(np.rint(xb * iscale[:, None]), 127).astype(np.int8)
        d = np.where(vmax != 0, np.float32(1.0) / iscale, np.float32(0)).astype(np.float32)
    return d, q, q.reshape(-1, 16, 16).astype(np.int32).sum(axis=2)


def parse_q8k(raw):
    b = raw.reshape(-1, 292)
    return b[:, :4].copy().view("<f4").reshape(-1), b[:, 4:260].view(np.int8), b[:, 260:].copy().view("<i2")


@pytest.mark.parametrize("n", [256, 512, 2304])
def test_quantize_q8k_is_llama_cpps(n):
    x = rng().standard_normal(n).astype(np.float32) * 3
    x[:256] = 0.0  # an all-zero block: d = 0, q = 0
    rd, rq, rs = ref_quantize_q8k(x)
    for isa in ISAS:  # every path's quantizer (AVX-512 has its own loop)
        d, q, s = parse_q8k(_cpu.quantize_q8k(x, isa))
        np.testing.assert_array_equal(d, rd, err_msg=ISA_NAMES[isa])
        np.testing.assert_array_equal(q, rq, err_msg=ISA_NAMES[isa])
        np.testing.assert_array_equal(s, rs, err_msg=ISA_NAMES[isa])


def test_quantize_q8k_edges_the_same_on_every_path():
    """The largest magnitude twice with both signs (the first one sets the scale's sign), values that scale
    to exact halves (ties to even), tiny and huge blocks, a lone nonzero element: the same bytes."""
    r = rng()
    blocks = [r.standard_normal(256).astype(np.float32) for _ in range(6)]
    blocks[0][[7, 200]] = [-5.0, 5.0]
    blocks[1][[3, 100]] = [5.0, -5.0]
    blocks[2] = (np.arange(256, dtype=np.float32) - 127.0) / 2.0  # many exact halves after scaling
    blocks[3] *= np.float32(1e-30)
    blocks[4] *= np.float32(1e30)
    blocks[5] = np.zeros(256, np.float32)
    blocks[5][255] = -0.75
    x = np.concatenate(blocks)
    want = _cpu.quantize_q8k(x, SCALAR)
    rd, rq, rs = ref_quantize_q8k(x)
    d, q, s = parse_q8k(want)
    np.testing.assert_array_equal(d, rd)
    np.testing.assert_array_equal(q, rq)
    for isa in ISAS:
        np.testing.assert_array_equal(_cpu.quantize_q8k(x, isa), want, err_msg=ISA_NAMES[isa])


def effective_inputs(dtype, x):
    """The activations an 8-bit product multiplies by: Q8_0 (32-element types) or Q8_K (K types), as the
    C quantizers round them (their rounding is tested on its own above and in test_kernels)."""
    rows = []
    for row in x:
        if WEIGHT_TYPES[dtype].block == QK_K:
            d, q, _ = parse_q8k(_cpu.quantize_q8k(row))
            rows.append((q.astype(np.float64) * d[:, None]).reshape(-1))
        else:
            b = _cpu.quantize_q8(row, SCALAR).reshape(-1, 34)
            d = b[:, :2].copy().view("<f2").astype(np.float64)
            rows.append((b[:, 2:].view(np.int8) * d).reshape(-1))
    return np.stack(rows)


SHAPES = [(1, 1), (3, 1), (5, 2), (13, 3), (33, 2)]  # (rows, blocks per row)


@pytest.mark.parametrize("act_f32", [False, True], ids=["q8-acts", "f32-acts"])
@pytest.mark.parametrize("dtype", [*NEW_TYPES, "q4", "q8", "bf16"])
@pytest.mark.parametrize("n", [1, 2, 4, 5, 9, 17])
def test_matmul_against_numpy_and_every_path_bit_for_bit(dtype, n, act_f32):
    """Every tile shape (1-4 rows x 1-4 tokens) and the ragged edges, each ISA path equal to the scalar one,
    in the file's layout and with the interleaved copy the engine makes at load (Q4_0 x8, the x8 layouts of
    kquants_repack.h: groups of 8 rows, the rest in the file's layout)."""
    r = rng()
    block = max(WEIGHT_TYPES[dtype].block, QK)
    for rows, nb in SHAPES + ([(130, 9)] if block == QK else [(130, 4)]):
        cols = block * nb
        raw = random_blocks(r, dtype, rows, cols)
        w = reference_values(raw, dtype, rows, cols).astype(np.float64)
        x = r.standard_normal((n, cols)).astype(np.float32)
        xe = x.astype(np.float64) if act_f32 or not WEIGHT_TYPES[dtype].quantized else effective_inputs(dtype, x)
        ref = xe @ w.T
        scale = np.abs(x).astype(np.float64) @ np.abs(w).T + 1e-6
        outs = {
            (isa, rp): _cpu.matmul(raw, dtype, rows, cols, x, isa, 2, rp, act_f32) for isa in ISAS for rp in (False, True)
        }
        base = outs[SCALAR, False]
        err = np.abs(base - ref) / scale
        assert err.max() < 1e-5, (dtype, rows, cols, err.max())
        for (isa, rp), y in outs.items():
            np.testing.assert_array_equal(y, base, err_msg=f"{ISA_NAMES[isa]} repack={rp} {dtype} {rows}x{cols} n={n}")


@pytest.mark.parametrize("dtype", [*NEW_TYPES, "q4", "q8"])
def test_float_activation_tokens_together_equal_one_at_a_time(dtype):
    """Several tokens against float activations (each row dequantized once, then the float dot per
    token) give each token's single-token product bit for bit, on every path: a batched server step
    answers what one request alone would."""
    r = rng()
    block = max(WEIGHT_TYPES[dtype].block, QK)
    for rows, nb in [(5, 2), (13, 3), (130, 4)]:
        cols = block * nb
        raw = random_blocks(r, dtype, rows, cols)
        x = r.standard_normal((37, cols)).astype(np.float32)
        for isa in ISAS:
            one = np.stack([_cpu.matvec(raw, dtype, rows, cols, x[t], isa, 1, True) for t in range(len(x))])
            for n in (2, 5, 16, 17, 37):
                y = _cpu.matmul(raw, dtype, rows, cols, x[:n], isa, 2, False, True)
                np.testing.assert_array_equal(y, one[:n], err_msg=f"{ISA_NAMES[isa]} {dtype} {rows}x{cols} n={n}")


@pytest.mark.parametrize("dtype", NEW_TYPES)
def test_8bit_activations_cost_what_the_partner_rounding_costs(dtype):
    """Against the float product: the error is the activation rounding's, nothing more."""
    r = rng()
    block = WEIGHT_TYPES[dtype].block
    rows, cols = 64, 4 * max(block, 256)
    raw = random_blocks(r, dtype, rows, cols)
    w = reference_values(raw, dtype, rows, cols).astype(np.float64)
    x = r.standard_normal((3, cols)).astype(np.float32)
    y = _cpu.matmul(raw, dtype, rows, cols, x, ISAS[-1], 2)
    scale = np.abs(x).astype(np.float64) @ np.abs(w).T
    assert (np.abs(y - x.astype(np.float64) @ w.T) / scale).max() < 2e-2


@pytest.mark.parametrize("act_f32", [False, True], ids=["q8-acts", "f32-acts"])
@pytest.mark.parametrize(
    "types", [("q4_k", "q6_k"), ("q4_k", "q5_0"), ("q5_1", "q8"), ("q4", "q4_k"), ("q8", "q5_k"), ("q6_k", "q4")]
)
def test_swiglu_of_two_types(types, act_f32):
    """Gate and up of different types (a Q4_K_M file's mix): both activation formats prepared at once, in
    any mix of the file's layout and the interleaved ones."""
    r = rng()
    rows, cols, n = 37, 512, 5
    gate_raw, up_raw = (random_blocks(r, t, rows, cols) for t in types)
    x = r.standard_normal((n, cols)).astype(np.float32)
    outs = {}
    for isa in ISAS:
        for layouts in [(False, False), (True, True), (True, False), (False, True)]:
            g = _cpu.Matrix(gate_raw, types[0], rows, cols, layouts[0], 2)
            u = _cpu.Matrix(up_raw, types[1], rows, cols, layouts[1], 2)
            outs[isa, layouts] = _cpu.swiglu_prepared(g, u, x, isa, 2, act_f32)
    outs[SCALAR] = outs[SCALAR, (False, False)]
    gw, uw = (
        reference_values(raw, t, rows, cols).astype(np.float64)
        for raw, t in zip((gate_raw, up_raw), types, strict=True)
    )
    xg = x.astype(np.float64) if act_f32 else effective_inputs(types[0], x)
    xu = x.astype(np.float64) if act_f32 else effective_inputs(types[1], x)
    g, u = xg @ gw.T, xu @ uw.T
    ref = g / (1 + np.exp(-g)) * u
    assert np.abs(outs[SCALAR] - ref).max() <= 1e-4 * np.abs(ref).max()
    for key, y in outs.items():
        np.testing.assert_array_equal(y, outs[SCALAR], err_msg=str(key))


@pytest.mark.parametrize("dtype", NEW_TYPES)
def test_rows_that_are_not_whole_blocks_are_refused(dtype):
    block = WEIGHT_TYPES[dtype].block
    with pytest.raises(ValueError, match=f"multiple of {block}"):
        _cpu.Matrix(np.zeros(100, np.uint8), dtype, 1, block + QK // 2)


# ------------------------------------------------------------------ writing the types (qora/quant.py)


def rel_rmse(dtype, x):
    from qora import quant

    raw = quant.quantize(x, dtype)
    back = reference_values(raw, dtype, *x.shape)
    return float(np.sqrt(((back - x) ** 2).mean() / (x**2).mean())), raw


def test_quantizers_round_trip_through_gguf_py():
    """q4_k / q6_k (llama.cpp's make_qkx2 / make_qx searches in NumPy) and the 32-element types (gguf-py's
    reference): gguf-py decodes the bytes, and the error ranks as the bits do."""
    r = np.random.default_rng(5)
    x = r.standard_normal((64, 1024)).astype(np.float32) * np.float32(0.05)
    x[3, 100] = 2.0  # an outlier
    x[5, :256] = 0.0  # an all-zero super-block
    x[6, 256:512] = 0.25  # a constant one
    err = {}
    for dtype in ("q4", "q4_1", "q5_0", "q5_1", "q4_k", "q6_k", "q8"):
        err[dtype], raw = rel_rmse(dtype, x)
        assert raw.shape == (64, 1024 // WEIGHT_TYPES[dtype].block * WEIGHT_TYPES[dtype].block_bytes)
        back = reference_values(raw, dtype, *x.shape)
        assert np.isfinite(back).all() and (back[5, :256] == 0).all(), dtype
        np.testing.assert_allclose(back[6, 256:512], 0.25, rtol=0.02, atol=0)
    assert err["q8"] < err["q6_k"] < err["q5_1"] < err["q4_k"] < err["q4"], err
    assert err["q4_k"] < 0.1 and err["q6_k"] < 0.025, err


def test_q4_k_m_recipe():
    from qora.quant import recipe_type

    n = 16  # llama.cpp's use_more_bits: layers 0, 1, 4, 7, 10, 13, 14, 15 of 16
    more = [i for i in range(n) if recipe_type(f"layers.{i}.wv", "q4_k", (256, 2048), n) == "q6_k"]
    assert more == [0, 1, 4, 7, 10, 13, 14, 15]
    assert [recipe_type(f"layers.{i}.w_down", "q4_k", (2048, 8192), n) for i in (0, 2)] == ["q6_k", "q4_k"]
    assert recipe_type("layers.2.wq", "q4_k", (2048, 2048), n) == "q4_k"
    assert recipe_type("output", "q4_k", (1000, 2048), n) == "q6_k"
    assert recipe_type("tok_embeddings", "q4_k", (1000, 2048), n) == "q4_k"
    assert recipe_type("tok_embeddings.tied", "q4_k", (1000, 2048), n) == "q6_k"
    # rows that are not whole super-blocks fall back as llama.cpp's do (SmolLM2-135M's 576)
    assert recipe_type("layers.2.wq", "q4_k", (576, 576), n) == "q5_0"
    assert recipe_type("output", "q4_k", (1000, 576), n) == "q8"
    assert recipe_type("layers.2.wq", "q8", (576, 576), n) == "q8"


def test_a_model_converted_as_q4_k_runs_close_to_its_float_forward(tiny_model, monkeypatch):
    """qora convert --quant q4_k on a tiny checkpoint (rows of 64: the recipe's fallbacks q5_0 / q8),
    run with float activations against the float64 forward over the stored weights."""
    from reference import ReferenceModel

    from qora.engine.cpu import CpuEngine
    from qora.format import read_qora

    monkeypatch.setenv("QORA_KV", "f32")
    tokens = [1, 5, 9, 200, 33]
    with read_qora(tiny_model("tiny-llama", "q4_k")) as f:
        types = {i["dtype"] for i in f.tensor_info.values()}
        assert {"q5_0", "q8"} <= types
        eng = CpuEngine(f, n_threads=2, max_seq_len=16, precision="f32")
        got = eng.forward(tokens, 0, all_logits=True)
        eng.close()
        ref = ReferenceModel(f, quantize_activations=False).forward(tokens)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4
