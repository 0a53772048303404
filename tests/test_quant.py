"""qora.quant: sizes, round trips, and bit identity with GGUF Q4_0 / Q8_0 (gguf-py's reference)."""

import numpy as np
import pytest

from qora import quant

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402

GGML = {"q4": gguf.GGMLQuantizationType.Q4_0, "q8": gguf.GGMLQuantizationType.Q8_0}
SHAPES = [(1, 32), (3, 64), (17, 96), (33, 576), (100, 128), (129, 32)]


def tricky(rows, cols, seed):
    """Random rows plus blocks that stress the rounding rules: zeros, ties of +m/-m, constants,
    exact halves after scaling, tiny and huge magnitudes."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    flat = x.reshape(-1, 32)
    specials = [
        np.zeros(32),
        np.r_[1.0, -1.0, np.zeros(30)],  # tie on |max|: the first one sets the sign
        np.r_[-1.0, 1.0, np.zeros(30)],
        np.full(32, 0.3),
        np.arange(32) - 16.0,
        (np.arange(32) - 16.0) + 0.5,  # q8: halves after scaling
        np.linspace(-127, 127, 32) / 127 * 3.5,
        rng.standard_normal(32) * 1e-6,
        rng.standard_normal(32) * 1e2,
        np.r_[8.0, np.full(31, -1.0)],
    ]
    for i, s in enumerate(specials[: flat.shape[0]]):
        flat[i] = s
    return x


def test_nbytes_and_row_bytes():
    assert quant.nbytes("q4", (10, 64)) == 10 * 2 * 18
    assert quant.nbytes("q8", (10, 64)) == 10 * 2 * 34
    assert quant.nbytes("f16", (10, 64)) == 10 * 64 * 2
    assert quant.nbytes("f32", (7,)) == 28
    assert quant.row_bytes("q4", 2048) == 64 * 18
    assert quant.storage_shape("q8", (5, 64)) == (5, 68)
    assert quant.storage_shape("f32", (5, 64)) == (5, 64)
    with pytest.raises(ValueError):
        quant.nbytes("q4", (10, 48))
    with pytest.raises(ValueError):
        quant.nbytes("q4", (64,))
    with pytest.raises(ValueError):
        quant.nbytes("q5", (1, 32))


@pytest.mark.parametrize("dtype", ["q4", "q8"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [1.0, 1e-3, 300.0])
def test_bit_identical_to_gguf(dtype, shape, scale):
    x = tricky(*shape, seed=hash((dtype, shape)) % 1000) * np.float32(scale)
    ours = quant.quantize(x, dtype)
    ref = gguf_quantize(x, GGML[dtype])
    assert ours.dtype == np.uint8 and ours.shape == (shape[0], quant.row_bytes(dtype, shape[1]))
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(quant.dequantize(ours, dtype, shape), gguf_dequantize(ref, GGML[dtype]))


@pytest.mark.parametrize("dtype", ["q4", "q8"])
def test_chunked_path_matches_single_pass(monkeypatch, dtype):
    x = tricky(70, 96, seed=3)
    whole = quant.quantize(x, dtype)
    monkeypatch.setattr(quant, "_CHUNK_ELEMS", 100)  # a few rows per chunk, ragged last chunk
    np.testing.assert_array_equal(quant.quantize(x, dtype), whole)
    np.testing.assert_array_equal(quant.dequantize(whole, dtype, x.shape), gguf_dequantize(whole, GGML[dtype]))


def block_scale(x):
    return np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True)


def f16_slack(d, qmax):
    """Error from storing the scale d as float16 (matters for tiny, subnormal scales)."""
    return qmax * np.abs(d - d.astype(np.float16).astype(np.float32))


def test_q8_round_trip_error_bound():
    x = tricky(37, 256, seed=1)
    y = quant.dequantize(quant.quantize(x, "q8"), "q8", x.shape)
    d = block_scale(x) / 127
    err = np.abs((y - x).reshape(-1, 32))
    assert np.all(err <= d * 0.5 * 1.001 + f16_slack(d, 127))


def test_q4_round_trip_error_bound():
    x = tricky(37, 256, seed=2)
    y = quant.dequantize(quant.quantize(x, "q4"), "q4", x.shape)
    d = block_scale(x) / 8
    err = np.abs((y - x).reshape(-1, 32))
    assert np.all(err <= d * 1.001 + f16_slack(d, 8))  # at most one step (the clamped +8 side)
    # the element with the largest |x| is reproduced up to the f16 rounding of d
    blocks, deq = x.reshape(-1, 32), y.reshape(-1, 32)
    i = np.abs(blocks).argmax(axis=1)
    r = np.arange(blocks.shape[0])
    np.testing.assert_allclose(deq[r, i], blocks[r, i], rtol=2e-3, atol=1e-6)


def test_q4_zero_blocks_match_ggml_c():
    # quantize_row_q4_0_ref keeps max = 0.0f for an all-zero block, so d = 0.0f / -8 = -0.0f,
    # whatever the sign of the zeros; every nibble is 8.
    for z in (0.0, -0.0):
        raw = quant.quantize(np.full((1, 32), z, np.float32), "q4")[0]
        assert raw[:2].view("<u2")[0] == 0x8000
        assert np.all(raw[2:] == 0x88)


def test_q4_layout_nibbles():
    x = np.zeros((1, 32), np.float32)
    x[0, 0] = -8.0  # d = -8 / -8 = 1 ; q = x/d + 8
    x[0, 1] = 3.0
    x[0, 16] = -5.0
    x[0, 31] = 7.0
    raw = quant.quantize(x, "q4")[0]
    assert raw[:2].view("<f2")[0] == 1.0
    qs = raw[2:]
    assert qs[0] & 0xF == 0 and qs[0] >> 4 == 3  # element 0 low nibble, element 16 high nibble
    assert qs[1] & 0xF == 11
    assert qs[15] >> 4 == 15
    np.testing.assert_array_equal(quant.dequantize(raw, "q4", (1, 32)), x)


@pytest.mark.parametrize("dtype,np_dtype", [("f16", np.float16), ("f32", np.float32)])
def test_float_types(dtype, np_dtype):
    x = np.random.default_rng(0).standard_normal((5, 40)).astype(np.float32)
    s = quant.quantize(x, dtype)
    assert s.dtype == np_dtype and s.shape == x.shape
    np.testing.assert_array_equal(quant.dequantize(s, dtype, x.shape), x.astype(np_dtype).astype(np.float32))
    np.testing.assert_array_equal(quant.dequantize(s.tobytes(), dtype, x.shape), quant.dequantize(s, dtype, x.shape))
    v = quant.quantize(x[0], dtype)  # 1-D works for float types
    assert v.shape == (40,)


def test_bad_inputs():
    with pytest.raises(ValueError):
        quant.quantize(np.zeros((2, 48), np.float32), "q4")
    with pytest.raises(ValueError):
        quant.quantize(np.zeros(64, np.float32), "q8")
    with pytest.raises(ValueError):
        quant.quantize(np.zeros((2, 64), np.float32), "int8")
    with pytest.raises(ValueError):
        quant.dequantize(np.zeros(10, np.uint8), "q4", (1, 32))
