"""Every C kernel against a NumPy reference, on every ISA path this CPU runs,
fresh random inputs, odd and ragged sizes and the real SmolLM3-3B shapes."""

import numpy as np
import pytest

from qora._core import _cpu
from qora.engine import DECODE_WALKS, ISA_NAMES

FEATS = _cpu.cpu_features()
ISAS = [i for i, n in enumerate(ISA_NAMES) if n in FEATS["cpu_supports"] and n in FEATS["compiled"]]
isa_param = pytest.mark.parametrize("isa", ISAS, ids=[ISA_NAMES[i] for i in ISAS])

# (rows, cols): odd row counts and the real 3B projections (q, k/v, o, gate/up, down)
QSHAPES = [
    (1, 32),
    (3, 64),
    (31, 96),
    (33, 128),
    (127, 160),
    (129, 256),
    (2048, 2048),
    (512, 2048),
    (11008, 2048),
    (2048, 11008),
]
FSHAPES = [(1, 1), (3, 7), (31, 33), (33, 100), (129, 257), (512, 2048)]


def rng():
    return np.random.default_rng()  # fresh inputs every run


def random_q4(r, rows, cols):
    """Random Q4 blocks as raw bytes + their float values (NumPy reference dequantization)."""
    nb = cols // 32
    d = (r.random((rows, nb)) * 0.02 + 0.001).astype(np.float16)
    qs = r.integers(0, 256, size=(rows, nb, 16), dtype=np.uint8)
    raw = np.concatenate([d.reshape(rows, nb, 1).view(np.uint8).reshape(rows, nb, 2), qs], axis=2)
    lo = (qs & 0x0F).astype(np.float32) - 8
    hi = (qs >> 4).astype(np.float32) - 8
    vals = np.concatenate([lo, hi], axis=2) * d.astype(np.float32)[:, :, None]
    return raw.reshape(rows, nb * 18), vals.reshape(rows, cols)


def random_q8(r, rows, cols):
    nb = cols // 32
    d = (r.random((rows, nb)) * 0.02 + 0.001).astype(np.float16)
    qs = r.integers(-127, 128, size=(rows, nb, 32)).astype(np.int8)
    raw = np.concatenate([d.reshape(rows, nb, 1).view(np.uint8).reshape(rows, nb, 2), qs.view(np.uint8)], axis=2)
    vals = qs.astype(np.float32) * d.astype(np.float32)[:, :, None]
    return raw.reshape(rows, nb * 34), vals.reshape(rows, cols)


def ref_quantize_q8(x):
    """NumPy reference of the activation quantizer: d = amax/127, round half to even."""
    xb = x.reshape(-1, 32).astype(np.float32)
    amax = np.abs(xb).max(axis=1)
    d = (amax / np.float32(127)).astype(np.float16)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(xb * inv[:, None]).astype(np.int8)
    return d, q


def q8_values(d, q):
    return (q.astype(np.float32) * d.astype(np.float32)[:, None]).reshape(-1)


@isa_param
@pytest.mark.parametrize("n", [32, 64, 96, 2048, 11008])
def test_quantize_q8(isa, n):
    x = rng().standard_normal(n).astype(np.float32) * 3
    x[:32] = 0.0  # an all-zero block must give d = 0 and q = 0
    raw = _cpu.quantize_q8(x, isa).reshape(-1, 34)
    d = raw[:, :2].copy().view(np.float16).reshape(-1)
    q = raw[:, 2:].view(np.int8)
    rd, rq = ref_quantize_q8(x)
    np.testing.assert_array_equal(d, rd)
    assert np.abs(q.astype(int) - rq.astype(int)).max() <= 1  # a tie may round either way after FMA contraction
    assert (q[0] == 0).all() and d[0] == 0


@isa_param
@pytest.mark.parametrize("dtype", ["q4", "q8"])
@pytest.mark.parametrize("shape", QSHAPES, ids=[f"{r}x{c}" for r, c in QSHAPES])
def test_matvec_quantized(isa, dtype, shape):
    r = rng()
    rows, cols = shape
    raw, w = (random_q4 if dtype == "q4" else random_q8)(r, rows, cols)
    x = r.standard_normal(cols).astype(np.float32)
    y = _cpu.matvec(raw, dtype, rows, cols, x, isa, 2)
    ref = w.astype(np.float64) @ q8_values(*ref_quantize_q8(x)).astype(np.float64)
    scale = np.abs(w).astype(np.float64) @ np.abs(x).astype(np.float64) + 1e-6
    assert np.all(np.abs(y - ref) / scale < 1e-4), np.max(np.abs(y - ref) / scale)
    # and the end-to-end error against the float product stays within what Q8 activations cost
    assert np.all(np.abs(y - w @ x) / scale < 2e-2)


@isa_param
@pytest.mark.parametrize("dtype", ["f16", "f32"])
@pytest.mark.parametrize("shape", FSHAPES, ids=[f"{r}x{c}" for r, c in FSHAPES])
def test_matvec_float(isa, dtype, shape):
    r = rng()
    rows, cols = shape
    w = r.standard_normal((rows, cols)).astype(np.float16 if dtype == "f16" else np.float32)
    x = r.standard_normal(cols).astype(np.float32)
    y = _cpu.matvec(w, dtype, rows, cols, x, isa, 2)
    ref = w.astype(np.float64) @ x.astype(np.float64)
    scale = np.abs(w.astype(np.float64)) @ np.abs(x) + 1e-6
    assert np.all(np.abs(y - ref) / scale < 1e-5)


def random_weights(r, dtype, rows, cols):
    """(stored weights, their float values) for any dtype."""
    if dtype == "q4":
        return random_q4(r, rows, cols)
    if dtype == "q8":
        return random_q8(r, rows, cols)
    w = r.standard_normal((rows, cols)).astype(np.float16 if dtype == "f16" else np.float32)
    return w, w.astype(np.float32)


def effective_inputs(dtype, x):
    """What the kernel multiplies by: Q8-rounded activations for the integer paths."""
    if dtype in ("q4", "q8"):
        return np.stack([q8_values(*ref_quantize_q8(row)) for row in x])
    return x


# weight layouts: every dtype row by row, and Q4 repacked into 8 interleaved rows
LAYOUTS = pytest.mark.parametrize(
    "dtype,repack",
    [("q4", False), ("q4", True), ("q8", False), ("f16", False), ("f32", False)],
    ids=["q4", "q4x8", "q8", "f16", "f32"],
)


@isa_param
@LAYOUTS
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 9, 16, 17, 33])
@pytest.mark.parametrize("shape", [(1, 32), (5, 64), (13, 96), (33, 96), (41, 64), (48, 224), (130, 2048)])
def test_matmul_tiles(isa, dtype, repack, n, shape):
    """Every tile shape (1-4 rows x 1-4 tokens, and 8 interleaved Q4 rows) and the ragged edges of both."""
    r = rng()
    rows, cols = shape
    raw, w = random_weights(r, dtype, rows, cols)
    x = r.standard_normal((n, cols)).astype(np.float32)
    y = _cpu.matmul(raw, dtype, rows, cols, x, isa, 2, repack)
    xe = effective_inputs(dtype, x).astype(np.float64)
    ref = xe @ w.T.astype(np.float64)
    scale = np.abs(xe) @ np.abs(w.T).astype(np.float64) + 1e-6
    assert y.shape == (n, rows)
    assert np.all(np.abs(y - ref) / scale < 1e-4)


AVX512 = ISA_NAMES.index("avx512") if "avx512" in ISA_NAMES else -1  # -1: an aarch64 build
AMX_MODES = ["emulate"] + (["hw"] if FEATS["flags"]["amx_tile"] and FEATS["flags"]["amx_int8"] else [])


@pytest.fixture(params=AMX_MODES)
def amx(request):
    """The AMX prefill kernel (software model everywhere, the hardware where present); off again after."""
    if AVX512 not in ISAS:
        pytest.skip("the AMX kernel runs on the AVX-512 path, which this CPU lacks")
    mode = _cpu.set_amx(request.param)
    if mode != request.param:
        _cpu.set_amx("off")
        pytest.skip(f"AMX {request.param} not available here (got {mode})")
    yield mode
    _cpu.set_amx("off")


@pytest.mark.parametrize("n", [15, 16, 17, 32, 40])
@pytest.mark.parametrize("shape", [(16, 32), (41, 64), (33, 96), (130, 2048), (48, 3200)])
def test_matmul_amx(amx, n, shape):
    """Full 16-token tiles go through the AMX kernel (odd and even block counts), the rest as before."""
    r = rng()
    rows, cols = shape
    raw, w = random_weights(r, "q4", rows, cols)
    x = r.standard_normal((n, cols)).astype(np.float32)
    y = _cpu.matmul(raw, "q4", rows, cols, x, AVX512, 2, True)
    xe = effective_inputs("q4", x).astype(np.float64)
    ref = xe @ w.T.astype(np.float64)
    scale = np.abs(xe) @ np.abs(w.T).astype(np.float64) + 1e-6
    assert np.all(np.abs(y - ref) / scale < 1e-4)
    _cpu.set_amx("off")
    assert np.allclose(y, _cpu.matmul(raw, "q4", rows, cols, x, AVX512, 2, True), rtol=1e-5, atol=1e-5)


def test_swiglu_amx(amx):
    r = rng()
    rows, cols, n = 80, 256, 16
    (rg, g), (ru, u) = random_weights(r, "q4", rows, cols), random_weights(r, "q4", rows, cols)
    x = r.standard_normal((n, cols)).astype(np.float32)
    h = _cpu.swiglu(rg, ru, "q4", rows, cols, x, AVX512, 2, True)
    xv = effective_inputs("q4", x).astype(np.float64)
    gv, uv = xv @ g.T.astype(np.float64), xv @ u.T.astype(np.float64)
    ref = gv / (1 + np.exp(-gv)) * uv
    scale = (np.abs(xv) @ np.abs(g.T)) * (np.abs(xv) @ np.abs(u.T)) + 1e-6
    assert np.all(np.abs(h - ref) / scale < 1e-4)


@isa_param
@LAYOUTS
@pytest.mark.parametrize("n", [1, 3, 6])
@pytest.mark.parametrize("shape", [(1, 32), (24, 64), (33, 64), (129, 96), (1376, 2048)])
def test_swiglu(isa, dtype, repack, n, shape):
    r = rng()
    rows, cols = shape
    (rg, g), (ru, u) = random_weights(r, dtype, rows, cols), random_weights(r, dtype, rows, cols)
    x = (r.standard_normal((n, cols)) * (1.0 if dtype in ("q4", "q8") else 0.2)).astype(np.float32)
    h = _cpu.swiglu(rg, ru, dtype, rows, cols, x, isa, 2, repack)
    xv = effective_inputs(dtype, x).astype(np.float64)
    gv, uv = xv @ g.T.astype(np.float64), xv @ u.T.astype(np.float64)
    ref = gv / (1 + np.exp(-gv)) * uv
    scale = (np.abs(xv) @ np.abs(g.T)) * (np.abs(xv) @ np.abs(u.T)) + 1e-6
    assert np.all(np.abs(h - ref) / scale < 1e-4)


@isa_param
@pytest.mark.parametrize("n", [1, 7, 64, 576, 2048, 2049])
def test_rmsnorm(isa, n):
    r = rng()
    x = r.standard_normal(n).astype(np.float32) * 5
    w = r.standard_normal(n).astype(np.float32)
    out = _cpu.rmsnorm(x, w, 1e-6, isa)
    xd = x.astype(np.float64)
    ref = w * (xd / np.sqrt(np.mean(xd * xd) + 1e-6))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def ref_rope(v, n_heads, head_dim, pos, inv_freq, scale):
    v = v.reshape(n_heads, head_dim).astype(np.float64)
    half = head_dim // 2
    ang = (np.float32(pos) * inv_freq).astype(np.float64)
    c, s = np.cos(ang) * scale, np.sin(ang) * scale
    x0, x1 = v[:, :half], v[:, half:]
    return np.concatenate([x0 * c - x1 * s, x1 * c + x0 * s], axis=1).reshape(-1)


@pytest.mark.parametrize("n_heads,head_dim,pos", [(1, 2, 0), (4, 16, 5), (16, 128, 1000), (4, 128, 65535)])
def test_rope(n_heads, head_dim, pos):
    r = rng()
    v = r.standard_normal(n_heads * head_dim).astype(np.float32)
    inv = (1.0 / (5e6 ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))).astype(np.float32)
    out = _cpu.rope(v, n_heads, head_dim, pos, inv, 1.0)
    np.testing.assert_allclose(out, ref_rope(v, n_heads, head_dim, pos, inv, 1.0), rtol=1e-4, atol=1e-4)
    out2 = _cpu.rope(v, n_heads, head_dim, pos, inv, 1.0693)  # YaRN scales cos and sin
    np.testing.assert_allclose(out2, ref_rope(v, n_heads, head_dim, pos, inv, 1.0693), rtol=1e-4, atol=1e-4)


def ref_attention(q, kc, vc, n_heads, n_kv, hd):
    group = n_heads // n_kv
    out = np.zeros((n_heads, hd))
    for h in range(n_heads):
        g = h // group
        k = kc[:, g * hd : (g + 1) * hd].astype(np.float64)
        v = vc[:, g * hd : (g + 1) * hd].astype(np.float64)
        s = k @ q[h * hd : (h + 1) * hd] / np.sqrt(hd)
        p = np.exp(s - s.max())
        out[h] = (p / p.sum()) @ v
    return out.reshape(-1)


@isa_param
@pytest.mark.parametrize(
    "n_heads,n_kv,hd,n_pos",
    [
        (1, 1, 8, 1),
        (4, 2, 16, 7),
        (16, 4, 128, 33),
        (9, 3, 64, 129),
        (16, 4, 128, 300),
        (6, 2, 256, 16),
        (12, 2, 128, 1),
    ],
)
@pytest.mark.parametrize("kv_f16", [True, False], ids=["kv16", "kv32"])
def test_attention(isa, n_heads, n_kv, hd, n_pos, kv_f16):
    r = rng()
    q = r.standard_normal(n_heads * hd).astype(np.float32)
    kc = r.standard_normal((n_pos, n_kv * hd)).astype(np.float32)
    vc = r.standard_normal((n_pos, n_kv * hd)).astype(np.float32)
    out = _cpu.attention(q, kc, vc, n_heads, n_kv, hd, isa, 2, kv_f16)
    if kv_f16:  # the reference sees the same rounded K and V as the f16 cache holds
        kc, vc = kc.astype(np.float16).astype(np.float32), vc.astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(out, ref_attention(q, kc, vc, n_heads, n_kv, hd), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", ["q4", "q8", "f16", "f32"])
def test_dequant_row(dtype):
    r = rng()
    rows, cols = 37, 96
    if dtype == "q4":
        raw, w = random_q4(r, rows, cols)
    elif dtype == "q8":
        raw, w = random_q8(r, rows, cols)
    else:
        raw = r.standard_normal((rows, cols)).astype(np.float16 if dtype == "f16" else np.float32)
        w = raw.astype(np.float32)
    for row in (0, 17, rows - 1):
        np.testing.assert_array_equal(_cpu.dequant_row(raw, dtype, rows, cols, row), w[row])
    with pytest.raises(IndexError):
        _cpu.dequant_row(raw, dtype, rows, cols, rows)


def test_wrappers_reject_bad_sizes():
    x = np.zeros(64, np.float32)
    with pytest.raises(ValueError):
        _cpu.matvec(np.zeros(10, np.uint8), "q4", 1, 64, x, 0)  # too few bytes
    with pytest.raises(ValueError):
        _cpu.matvec(np.zeros(2 * 36, np.uint8), "q4", 2, 64, np.zeros(32, np.float32), 0)  # x too short
    with pytest.raises(ValueError):
        _cpu.matvec(np.zeros(40, np.uint8), "q8", 1, 40, np.zeros(40, np.float32), 0)  # cols % 32
    with pytest.raises(ValueError):
        _cpu.quantize_q8(np.zeros(33, np.float32), 0)
    with pytest.raises(ValueError):
        _cpu.matvec(np.zeros(64, np.float32), "q5", 1, 64, x, 0)
    with pytest.raises(ValueError):
        _cpu.attention(np.zeros(16, np.float32), np.zeros((3, 8), np.float32), np.zeros((2, 8), np.float32), 2, 1, 8, 0)


def test_cpu_features_consistent():
    assert "scalar" in FEATS["cpu_supports"] and "scalar" in FEATS["compiled"]
    if FEATS["flags"]["avx2"] and FEATS["flags"]["fma"] and FEATS["flags"]["f16c"] and FEATS["flags"]["os_avx"]:
        assert "avx2" in FEATS["cpu_supports"]


def test_rope_parameters_match_transformers():
    """inv_freq and the cos/sin scale for default, linear, llama3 and YaRN scaling (fixture from transformers)."""
    import json
    from pathlib import Path

    from qora.engine import rope_parameters

    for case in json.loads((Path(__file__).parent / "fixtures" / "rope_cases.json").read_text()):
        inv, scale = rope_parameters(case)
        np.testing.assert_allclose(inv, np.array(case["inv_freq"], np.float32), rtol=1e-6, err_msg=str(case))
        assert abs(scale - case["attention_factor"]) < 1e-6, case


# ---- the one order every path follows (include/qora/common.h), as NumPy ----
SEGS = 4


def fma32(a, b, c):
    """float32 fma through float64: a is a product of two f16 scales (22 bits) and b an int dot
    (<= 16 bits), so a*b is exact in float64 and the sum rounds once there, then to float32
    (the two roundings disagree only on an exact float32 midpoint, ~2^-29 of the time)."""
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def ref_quantized_products(raw, dtype, rows, cols, xq_raw):
    """Y[t, r] exactly as every kernel computes it: per block an exact int32 dot and the scale
    f16(w.d) * f16(x.d) in float32; QORA_SEGS contiguous segments (the last takes the rest), each a
    float32 fma chain from 0; then ((a0 + a1) + a2) + a3."""
    nb = cols // 32
    if dtype == "q4":
        blocks = raw.reshape(rows, nb, 18)
        dw = blocks[:, :, :2].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = blocks[:, :, 2:]
        qw = np.concatenate([(qs & 0x0F).astype(np.int64) - 8, (qs >> 4).astype(np.int64) - 8], axis=2)
    else:
        blocks = raw.reshape(rows, nb, 34)
        dw = blocks[:, :, :2].copy().view(np.float16)[..., 0].astype(np.float32)
        qw = blocks[:, :, 2:].copy().view(np.int8).astype(np.int64)
    xb = xq_raw.reshape(-1, nb, 34)
    dx = xb[:, :, :2].copy().view(np.float16)[..., 0].astype(np.float32)
    qx = xb[:, :, 2:].copy().view(np.int8).astype(np.int64)
    isum = np.einsum("rbk,tbk->trb", qw, qx).astype(np.float32)  # exact: |isum| < 2^16
    d = dx[:, None, :] * dw[None, :, :]  # float32, exact
    seg = nb // SEGS
    bounds = [i * seg for i in range(SEGS)] + [nb]
    total = None
    for i in range(SEGS):
        acc = np.zeros(isum.shape[:2], np.float32)
        for b in range(bounds[i], bounds[i + 1]):
            acc = fma32(d[:, :, b], isum[:, :, b], acc)
        total = acc if total is None else (total + acc).astype(np.float32)
    return total


def test_quantize_q8_same_bytes_on_every_path():
    """Every path rounds activations to the same Q8 bytes (ties included): a 1-step difference
    would send the paths' models apart."""
    r = rng()
    x = (r.standard_normal(32 * 400) * r.choice([1e-3, 1, 50], 32 * 400)).astype(np.float32)
    # exact ties: values whose x * 127 / amax lands on k + 0.5
    x[:32] = (np.arange(32, dtype=np.float32) - 15.5) / 127 * 4
    want = _cpu.quantize_q8(x, ISAS[0])
    for isa in ISAS[1:]:
        np.testing.assert_array_equal(_cpu.quantize_q8(x, isa), want, err_msg=ISA_NAMES[isa])


@pytest.mark.parametrize("dtype,repack", [("q4", False), ("q4", True), ("q8", False)], ids=["q4", "q4x8", "q8"])
@pytest.mark.parametrize("n", [1, 3, 4, 5, 8, 16, 17])
@pytest.mark.parametrize(
    "shape", [(1, 32), (5, 64), (13, 96), (9, 128), (33, 160), (16, 224), (41, 576), (130, 2048), (24, 1536)]
)
def test_quantized_products_same_bits_on_every_path(dtype, repack, n, shape):
    """Q4/Q8 weights x Q8 activations: every ISA path, layout and thread count returns exactly the
    NumPy model of the one shared order (segment chains of the per-block int dots), bit for bit,
    ragged rows (not a multiple of 8) and block counts (under 4, not a multiple of 4) included."""
    r = rng()
    rows, cols = shape
    raw, _ = random_weights(r, dtype, rows, cols)
    x = (r.standard_normal((n, cols)) * 3).astype(np.float32)
    xq = np.stack([_cpu.quantize_q8(row, ISAS[0]) for row in x])
    want = ref_quantized_products(raw, dtype, rows, cols, xq)
    for isa in ISAS:
        for threads in (1, 2):
            got = _cpu.matmul(raw, dtype, rows, cols, x, isa, threads, repack)
            np.testing.assert_array_equal(got, want, err_msg=f"{ISA_NAMES[isa]} threads={threads}")


@pytest.mark.parametrize("walk", DECODE_WALKS)
@pytest.mark.parametrize(
    "shape", [(8, 32), (16, 96), (13, 96), (24, 224), (41, 576), (130, 2048), (2048 + 24, 224), (33, 11008)]
)
def test_decode_walks_same_bits(walk, shape):
    """The decode walks of repacked Q4 (repack.h: one stream per thread with or without software prefetch,
    or four segment streams)
    on every ISA path and thread count give the NumPy model of the shared order bit for bit: one
    token (the decode kernels), ragged rows (not a multiple of 8 or 16) and block counts (under 4,
    not a multiple of 4, the last segment longer)."""
    r = rng()
    rows, cols = shape
    raw, _ = random_weights(r, "q4", rows, cols)
    x = (r.standard_normal((1, cols)) * 3).astype(np.float32)
    want = ref_quantized_products(raw, "q4", rows, cols, _cpu.quantize_q8(x[0], ISAS[0])[None])
    before = _cpu.decode_walk()
    try:
        assert _cpu.set_decode_walk(walk) == walk
        for isa in ISAS:
            for threads in (1, 2, 3):
                got = _cpu.matmul(raw, "q4", rows, cols, x, isa, threads, True)
                np.testing.assert_array_equal(got, want, err_msg=f"{ISA_NAMES[isa]} threads={threads}")
    finally:
        _cpu.set_decode_walk(before)


def test_decode_walk_rejects_unknown_names():
    with pytest.raises(ValueError, match="decode walk"):
        _cpu.set_decode_walk("zigzag")


def test_read_bandwidth_probe():
    """The bandwidth probe reads a buffer at 1 and 2 threads and reports a positive rate; a buffer
    too small for its threads, or an impossible size, is refused."""
    for threads in (1, 2):
        assert _cpu.read_bandwidth(threads, 8 << 20, 1) > 0
    with pytest.raises(ValueError):
        _cpu.read_bandwidth(4, 64, 1)
    with pytest.raises(MemoryError):
        _cpu.read_bandwidth(1, 1 << 62, 1)
    with pytest.raises(ValueError):
        _cpu.read_bandwidth(0, 8 << 20, 1)


def test_amx_products_same_bits(amx):
    """The AMX tile kernel (16 rows x 16 tokens, one pass per segment) gives the same bits too."""
    r = rng()
    for rows, cols, n in [(16, 32, 16), (48, 224, 17), (130, 2048, 32), (32, 576, 40)]:
        raw, _ = random_weights(r, "q4", rows, cols)
        x = (r.standard_normal((n, cols)) * 3).astype(np.float32)
        xq = np.stack([_cpu.quantize_q8(row, ISAS[0]) for row in x])
        got = _cpu.matmul(raw, "q4", rows, cols, x, AVX512, 2, True)
        np.testing.assert_array_equal(got, ref_quantized_products(raw, "q4", rows, cols, xq))


@pytest.mark.parametrize("n", [1, 31, 32, 33, 64, 100, 576, 1537])
def test_float_kernels_same_bits_on_every_path(n):
    """Norms, float dots and attention feed the next Q8 rounding, so they agree bit for bit too."""
    r = rng()
    x = r.standard_normal(n).astype(np.float32)
    w = r.standard_normal(n).astype(np.float32)
    norms = [_cpu.rmsnorm(x, w, 1e-5, isa) for isa in ISAS]
    for isa, got in zip(ISAS[1:], norms[1:], strict=True):
        np.testing.assert_array_equal(got, norms[0], err_msg=ISA_NAMES[isa])
    for dtype in ("f16", "f32"):
        raw = w.astype(np.float16 if dtype == "f16" else np.float32).reshape(1, n)
        dots = [_cpu.matvec(raw, dtype, 1, n, x, isa) for isa in ISAS]
        for isa, got in zip(ISAS[1:], dots[1:], strict=True):
            np.testing.assert_array_equal(got, dots[0], err_msg=f"{dtype} {ISA_NAMES[isa]}")


@pytest.mark.parametrize(
    "n_heads,n_kv,hd",
    [(9, 3, 64), (4, 2, 16), (8, 1, 128), (2, 2, 256), (4, 4, 48), (3, 1, 96), (5, 5, 32), (12, 2, 64), (14, 2, 256)],
)
@pytest.mark.parametrize("n_pos", [1, 15, 16, 17, 70, 300, 1030])
@pytest.mark.parametrize("kv_f16", [True, False], ids=["kv16", "kv32"])
def test_attention_same_bits_on_every_path(n_heads, n_kv, hd, n_pos, kv_f16):
    """The generic attention and the AVX2 / AVX-512 ones (head sizes 64/128/256; AVX2 any multiple of 32
    up to 256) compute the same steps."""
    r = rng()
    q = (r.standard_normal(n_heads * hd) * 2).astype(np.float32)
    kc = (r.standard_normal((n_pos, n_kv * hd)) * 2).astype(np.float32)
    vc = r.standard_normal((n_pos, n_kv * hd)).astype(np.float32)
    outs = [_cpu.attention(q, kc, vc, n_heads, n_kv, hd, isa, 1, kv_f16) for isa in ISAS]
    for isa, got in zip(ISAS[1:], outs[1:], strict=True):
        np.testing.assert_array_equal(got, outs[0], err_msg=ISA_NAMES[isa])
    # 1 to 3 threads: work items of whole rows (every group), of some groups, and of one group
    for isa in ISAS:
        for threads in (2, 3):
            got = _cpu.attention(q, kc, vc, n_heads, n_kv, hd, isa, threads, kv_f16)
            np.testing.assert_array_equal(got, outs[0], err_msg=f"{ISA_NAMES[isa]} threads={threads}")


# ---- attention in the order of common.h, as NumPy: chunks of ATT_CHUNK positions folded in order ----
ATT_CHUNK = 256  # QORA_ATT_CHUNK (forward.h)
F32 = np.float32


def fma32_exact(a, b, c):
    """float32 fma, correctly rounded for any float32 inputs: a*b is exact in float64, the sum's
    float64 rounding error is recovered (TwoSum) and an exact float32 tie is broken by it."""
    a, b, c = (np.asarray(v, np.float32).astype(np.float64) for v in (a, b, c))
    p = a * b
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)
    r = s.astype(np.float32)
    d = s - r.astype(np.float64)
    other = np.nextafter(r, np.where(d > 0, np.float32(np.inf), np.float32(-np.inf)).astype(np.float32))
    tie = (d != 0) & (np.abs(d) * 2 == np.abs(other.astype(np.float64) - r.astype(np.float64)))
    return np.where(tie & (err != 0) & (np.sign(err) == np.sign(d)), other, r).astype(np.float32)


def ref_exp_neg(x):
    """qora_exp_neg (common.h) lane by lane."""
    x = np.maximum(np.asarray(x, F32), F32(-87.0))
    n = np.rint(x * F32(1.44269504088896341)).astype(F32)
    r = fma32_exact(-n, F32(0.693359375), x)
    r = fma32_exact(-n, F32(-2.12194440e-4), r)
    p = np.full_like(r, F32(1.9875691500e-4))
    for coef in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = fma32_exact(p, r, F32(coef))
    p = fma32_exact(p, r * r, r + F32(1.0))
    two_n = ((n.astype(np.int32) + 127).astype(np.uint32) << 23).view(F32)
    return (p * two_n).astype(F32)


def ref_reduce16(c):
    """qora_reduce16 over the last axis (16 lanes)."""
    c = c.copy()
    for w in (8, 4, 2, 1):
        c[..., :w] = c[..., :w] + c[..., w : 2 * w]
    return c[..., 0]


def ref_float_dots(k, q):
    """k (n, d) . q (d,) in the float dot's order: 32 fma chains, lane j + lane j+16, reduce16, tail."""
    n, d = k.shape
    acc = np.zeros((n, 32), F32)
    i = 0
    while i + 32 <= d:
        acc = fma32_exact(k[:, i : i + 32], q[i : i + 32], acc)
        i += 32
    s = ref_reduce16(acc[:, :16] + acc[:, 16:])
    for j in range(i, d):
        s = fma32_exact(k[:, j], q[j], s)
    return s


def ref_attention_chunk(q, k, v, scale):
    """One chunk for one head: (max, sum, unnormalised V sum)."""
    s = ref_float_dots(k, q) * scale
    mx = s.max()
    e = ref_exp_neg(s - mx)
    chains = np.zeros(16, F32)
    for t in range(len(e)):
        chains[t % 16] = chains[t % 16] + e[t]
    acc = np.zeros(k.shape[1], F32)
    for t in range(len(e)):
        acc = fma32_exact(e[t], v[t], acc)
    return mx, ref_reduce16(chains), acc


def ref_attention_bits(q, kc, vc, n_heads, n_kv, hd):
    """Every head's output exactly as every path computes it (common.h's attention order)."""
    group, n_pos = n_heads // n_kv, kc.shape[0]
    scale = F32(1) / np.sqrt(F32(hd))
    out = np.zeros((n_heads, hd), F32)
    for h in range(n_heads):
        g = h // group
        k, v, qh = kc[:, g * hd : (g + 1) * hd], vc[:, g * hd : (g + 1) * hd], q[h * hd : (h + 1) * hd]
        M, S, o = ref_attention_chunk(qh, k[:ATT_CHUNK], v[:ATT_CHUNK], scale)
        for p0 in range(ATT_CHUNK, n_pos, ATT_CHUNK):
            mx, sm, acc = ref_attention_chunk(qh, k[p0 : p0 + ATT_CHUNK], v[p0 : p0 + ATT_CHUNK], scale)
            m2 = max(M, mx)
            a, b = ref_exp_neg(np.array([M - m2, mx - m2], F32))
            S = fma32_exact(sm, b, S * a)
            o = fma32_exact(b, acc, o * a)
            M = m2
        out[h] = o * (F32(1) / S)
    return out.reshape(-1)


def test_fma32_exact():
    r = rng()
    a, b, c = (r.standard_normal(10000).astype(F32) for _ in range(3))
    want = np.array(
        [np.float32(np.longdouble(x) * np.longdouble(y) + np.longdouble(z)) for x, y, z in zip(a, b, c, strict=True)]
    )
    np.testing.assert_array_equal(fma32_exact(a, b, c), want)
    # the float64 sum lands on a float32 tie (and rounds to even, up) though the exact value is below it
    odd, below = F32(1 + 2.0**-23), F32(2.0**-24 * (1 - 2.0**-23))
    assert fma32(odd, below, odd) == F32(1 + 2.0**-22)
    assert fma32_exact(odd, below, odd) == odd


@pytest.mark.parametrize("n_pos", [1, 255, 256, 257, 1000, 4097])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("hd", [64, 128])
@pytest.mark.parametrize("kv_f16", [True, False], ids=["kv16", "kv32"])
def test_attention_chunks_same_bits_as_numpy(n_pos, group, hd, kv_f16):
    """Decode attention split into chunks of 256 positions (one chunk, ragged last chunks, many):
    every ISA path and thread count returns the NumPy model of the order bit for bit."""
    r = rng()
    n_kv = 2
    n_heads = group * n_kv
    q = (r.standard_normal(n_heads * hd) * 2).astype(F32)
    kc = (r.standard_normal((n_pos, n_kv * hd)) * 2).astype(F32)
    vc = r.standard_normal((n_pos, n_kv * hd)).astype(F32)
    if kv_f16:  # the model reads the values the f16 cache holds
        kc, vc = kc.astype(np.float16).astype(F32), vc.astype(np.float16).astype(F32)
    want = ref_attention_bits(q, kc, vc, n_heads, n_kv, hd)
    np.testing.assert_allclose(want, ref_attention(q, kc, vc, n_heads, n_kv, hd), rtol=1e-4, atol=1e-5)
    for isa in ISAS:
        for threads in (1, 2, 3):
            got = _cpu.attention(q, kc, vc, n_heads, n_kv, hd, isa, threads, kv_f16)
            np.testing.assert_array_equal(got, want, err_msg=f"{ISA_NAMES[isa]} threads={threads}")


# ---- prefill: flash attention of a block of queries over key chunks (forward.h qora_attention_tiles) ----
@pytest.mark.parametrize(
    "pos0,n",
    [(0, 1), (0, 16), (5, 3), (240, 16), (255, 2), (256, 16), (0, 300), (500, 13), (4090, 16), (8990, 10)],
)
@pytest.mark.parametrize("group,hd", [(1, 64), (4, 128), (3, 64)])
@pytest.mark.parametrize("kv_f16", [True, False], ids=["kv16", "kv32"])
def test_prefill_attention_same_bits_as_decode(pos0, n, group, hd, kv_f16):
    """n queries at positions pos0 .. pos0+n-1 at once (whole chunks as tiles, the diagonal masked,
    chunks past a query skipped; lengths up to 9,000, ragged chunk and tile edges): each query's
    output is, bit for bit, one decode step at its position (which test_attention_chunks_same_bits_as_numpy
    holds to the NumPy model of the order), on every path and thread count; and within float
    tolerance of a float64 softmax."""
    r = rng()
    n_kv = 2
    n_heads, n_pos = group * n_kv, pos0 + n
    q = (r.standard_normal((n, n_heads * hd)) * 2).astype(F32)
    kc = (r.standard_normal((n_pos, n_kv * hd)) * 2).astype(F32)
    vc = r.standard_normal((n_pos, n_kv * hd)).astype(F32)
    if kv_f16:
        kc, vc = kc.astype(np.float16).astype(F32), vc.astype(np.float16).astype(F32)
    for t in (0, n // 2, n - 1):
        p = pos0 + t + 1
        np.testing.assert_allclose(
            _cpu.attention(q[t], kc[:p], vc[:p], n_heads, n_kv, hd, ISAS[0], 1, kv_f16),
            ref_attention(q[t], kc[:p], vc[:p], n_heads, n_kv, hd),
            rtol=1e-4,
            atol=1e-5,
        )
    for isa in ISAS:
        want = np.stack(
            [
                _cpu.attention(q[t], kc[: pos0 + t + 1], vc[: pos0 + t + 1], n_heads, n_kv, hd, isa, 1, kv_f16)
                for t in range(n)
            ]
        )
        for threads in (1, 3):
            got = _cpu.attention(q.reshape(-1), kc, vc, n_heads, n_kv, hd, isa, threads, kv_f16, n)
            np.testing.assert_array_equal(got.reshape(n, -1), want, err_msg=f"{ISA_NAMES[isa]} threads={threads}")


def test_prefill_attention_rejects_bad_query_counts():
    q, kv = np.zeros(2 * 8, np.float32), np.zeros((3, 8), np.float32)
    for n in (0, 4):  # no query, or more queries than cached positions
        with pytest.raises(ValueError):
            _cpu.attention(q, kv, kv, 1, 1, 8, 0, 1, True, n)
    with pytest.raises(ValueError):  # q holds 2 queries, not 3
        _cpu.attention(q, kv, kv, 1, 1, 8, 0, 1, True, 3)
