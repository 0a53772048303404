"""NumPy reference quantizers for the qora weight types.

Design: one function per direction, vectorised over whole row chunks (no Python loop over blocks).
The two block formats are bit-identical to GGUF so GGUF weights import losslessly and the C kernels
can be checked against llama.cpp on the very same bytes:

    q4 (= GGUF Q4_0)  per row, cols/32 blocks of 18 bytes: f16 scale d, then 16 bytes of nibbles;
                      byte j holds element j (low nibble) and element j+16 (high nibble);
                      value = (nibble - 8) * d
    q8 (= GGUF Q8_0)  per row, cols/32 blocks of 34 bytes: f16 scale d, then 32 int8; value = q * d
    f16, f32          IEEE half / single, stored as is
    q4_1, q5_0, q5_1, q4_k, q5_k, q6_k, bf16
                      GGUF's Q4_1 ... Q6_K and BF16 bit for bit (layouts: include/qora/common.h), run
                      as stored; decoded here through gguf-py's reference (gguf.quants)

Quantization follows ggml's reference code step for step, in float32 (see the q4/q8 helpers).
Shapes are [rows, cols] = [out_features, in_features]; 1-D tensors are [n].
"""

from __future__ import annotations

import numpy as np

from qora.dtypes import QK, WEIGHT_TYPES

# Views of the one table in qora/dtypes.py, by the names the format and the converter use.
DTYPES = tuple(WEIGHT_TYPES)
BLOCK_BYTES = {n: t.block_bytes for n, t in WEIGHT_TYPES.items() if t.quantized}
FLOAT_DTYPES = {n: t.numpy for n, t in WEIGHT_TYPES.items() if not t.quantized}

# Rows are quantized in chunks of about this many elements so temporaries stay small
# (a 128256 x 2048 embedding would otherwise need several GiB of float32 scratch).
_CHUNK_ELEMS = 1 << 22


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"unknown qora dtype {dtype!r} (expected one of {', '.join(DTYPES)})")


def row_bytes(dtype: str, cols: int) -> int:
    """Bytes of one row of `cols` elements (cols must be a multiple of the type's block: 32, or 256 for
    the K types)."""
    _check_dtype(dtype)
    if dtype in BLOCK_BYTES:
        block = WEIGHT_TYPES[dtype].block
        if cols % block:
            raise ValueError(f"{dtype} needs a row length that is a multiple of {block}, got {cols}")
        return cols // block * BLOCK_BYTES[dtype]
    return cols * FLOAT_DTYPES[dtype].itemsize


def nbytes(dtype: str, shape) -> int:
    """Size in bytes of a tensor of `shape` stored as `dtype` (q4/q8 need 2-D shapes)."""
    _check_dtype(dtype)
    shape = tuple(int(s) for s in shape)
    if dtype in BLOCK_BYTES:
        if len(shape) != 2:
            raise ValueError(f"{dtype} tensors must be 2-D, got shape {list(shape)}")
        return shape[0] * row_bytes(dtype, shape[1])
    n = 1
    for s in shape:
        n *= s
    return n * FLOAT_DTYPES[dtype].itemsize


# llama.cpp's fallback for a K type whose row is not whole 256-element super-blocks
K_FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8"}


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def recipe_type(name: str, quant: str, shape, n_layers: int) -> str:
    """The type of tensor `name` (a qora name, shape (rows, cols)) when a model is written as `quant`.
    q4_k is llama-quantize's Q4_K_M: Q6_K for the LM head (the embedding when tied) and for attn_v and
    ffn_down in the layers _more_bits picks; a K type whose rows are not whole super-blocks falls back
    as llama.cpp's does (K_FALLBACK). Other choices are used as they are."""
    dtype = quant
    if quant == "q4_k":
        layer = int(name.split(".")[1]) if name.startswith("layers.") else -1
        kind = name.rsplit(".", 1)[-1]
        if name in ("output", "tok_embeddings.tied") or (kind in ("wv", "w_down") and _more_bits(layer, n_layers)):
            dtype = "q6_k"
    if dtype in K_FALLBACK and len(shape) == 2 and int(shape[1]) % WEIGHT_TYPES[dtype].block:
        dtype = K_FALLBACK[dtype]
    return dtype


def storage_shape(dtype: str, shape) -> tuple[int, ...]:
    """Shape of the array that holds a stored tensor: [rows, row_bytes] for q4/q8, else `shape`."""
    shape = tuple(int(s) for s in shape)
    if dtype in BLOCK_BYTES:
        return (shape[0], row_bytes(dtype, shape[1]))
    _check_dtype(dtype)
    return shape


# --------------------------------------------------------------------------------------------
# Block quantizers: x is float32 [n_blocks, 32], result uint8 [n_blocks, block_bytes]
# --------------------------------------------------------------------------------------------


def _quantize_blocks_q4(x: np.ndarray) -> np.ndarray:
    # ggml quantize_row_q4_0_ref: max = the value with the largest |v| (first one on ties),
    # d = max / -8, id = 1/d (0 if d == 0), q = MIN(15, (int8_t)(x*id + 8.5f)).
    ax = np.abs(x)
    imax = ax.argmax(axis=1)[:, None]
    vmax = np.take_along_axis(x, imax, axis=1)  # (n, 1) float32
    # ggml starts from max = 0.0f and only replaces it on a strictly larger |v|: an all-zero block
    # (even all -0.0) keeps +0.0, so d = -0.0 exactly as in C.
    vmax = np.where(np.take_along_axis(ax, imax, axis=1) == 0, np.float32(0.0), vmax)
    d = vmax / np.float32(-8.0)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0.0), np.float32(1.0) / d).astype(np.float32)
    # x*id lies in [-8, 8] (up to rounding), so x*id + 8.5 >= 0 and the C cast truncates.
    q = np.trunc(x * inv + np.float32(8.5)).astype(np.int32)
    q = np.clip(q, 0, 15).astype(np.uint8)
    out = np.empty((x.shape[0], BLOCK_BYTES["q4"]), dtype=np.uint8)
    out[:, :2] = d.astype("<f2").view(np.uint8)
    out[:, 2:] = q[:, : QK // 2] | (q[:, QK // 2 :] << np.uint8(4))
    return out


def _roundf(v: np.ndarray) -> np.ndarray:
    # C roundf: halfway cases away from zero (np.rint rounds them to even).
    r = np.rint(v)
    t = np.trunc(v)
    half = np.abs(v - t) == np.float32(0.5)
    return np.where(half, t + np.sign(v), r)


def _quantize_blocks_q8(x: np.ndarray) -> np.ndarray:
    # ggml quantize_row_q8_0_ref: d = amax / 127, id = 1/d (0 if d == 0), q = roundf(x*id).
    amax = np.abs(x).max(axis=1, keepdims=True)
    d = amax / np.float32(127.0)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0.0), np.float32(1.0) / d).astype(np.float32)
    q = _roundf(x * inv).astype(np.int8)
    out = np.empty((x.shape[0], BLOCK_BYTES["q8"]), dtype=np.uint8)
    out[:, :2] = d.astype("<f2").view(np.uint8)
    out[:, 2:] = q.view(np.uint8)
    return out


def _dequantize_blocks_q4(b: np.ndarray) -> np.ndarray:
    d = b[:, :2].copy().view("<f2").astype(np.float32)  # (n, 1)
    qs = b[:, 2:]
    q = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1).astype(np.int8) - np.int8(8)
    return q.astype(np.float32) * d


def _dequantize_blocks_q8(b: np.ndarray) -> np.ndarray:
    d = b[:, :2].copy().view("<f2").astype(np.float32)
    return b[:, 2:].view(np.int8).astype(np.float32) * d


def _qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """llama.cpp's make_qkx2_quants on rows of x (each a sub-block) with weights w, in float32: the
    asymmetric grid (scale, -min) of least weighted squared error over nstep + 1 trial scales, each fitted
    by weighted least squares. Returns (scale, -min, levels)."""
    f = np.float32
    mn = np.minimum(x.min(axis=1), f(0))
    mx = x.max(axis=1)
    flat = mx == mn
    sum_w, sum_x = w.sum(axis=1), (w * x).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(flat, f(0), f(nmax) / (mx - mn)).astype(f)
        scale = np.where(flat, f(0), f(1) / iscale).astype(f)
        levels = np.clip(np.rint(iscale[:, None] * (x - mn[:, None])), 0, nmax).astype(f)
        best = (w * (scale[:, None] * levels + mn[:, None] - x) ** 2).sum(axis=1)
        for step in range(nstep + 1):
            iscale = ((f(rmin) + f(rdelta) * f(step) + f(nmax)) / (mx - mn)).astype(f)
            la = np.clip(np.rint(iscale[:, None] * (x - mn[:, None])), 0, nmax).astype(f)
            sl, sl2, sxl = (w * la).sum(axis=1), (w * la * la).sum(axis=1), (w * la * x).sum(axis=1)
            det = sum_w * sl2 - sl * sl
            this_scale = (sum_w * sxl - sum_x * sl) / det
            this_min = (sl2 * sum_x - sl * sxl) / det
            pos = this_min > 0
            this_scale = np.where(pos, sxl / sl2, this_scale).astype(f)
            this_min = np.where(pos, f(0), this_min).astype(f)
            err = (w * (this_scale[:, None] * la + this_min[:, None] - x) ** 2).sum(axis=1)
            better = (det > 0) & (err < best) & ~flat
            levels = np.where(better[:, None], la, levels)
            best = np.where(better, err, best)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)
    levels = np.where(flat[:, None], f(0), levels)
    return scale.astype(f), (-mn).astype(f), levels


def _quantize_blocks_q4_k(x: np.ndarray) -> np.ndarray:
    # ggml quantize_row_q4_K_ref: per sub-block of 32 an asymmetric 4-bit grid weighted by
    # rms(sub-block) + |x|, the eight scales and minimums then quantized to 6 bits against the block's
    # largest, the levels recomputed against the rounded scales.
    f = np.float32
    nb = x.shape[0]
    xs = x.reshape(nb * 8, 32)
    av = np.sqrt((xs * xs).sum(axis=1) / f(32))
    scales, mins, levels = _qkx2(xs, av[:, None] + np.abs(xs), 15, -1.0, 0.1, 20)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale, max_min = scales.max(axis=1), mins.max(axis=1)
    with np.errstate(divide="ignore"):
        inv_s = np.where(max_scale > 0, f(63) / max_scale, f(0)).astype(f)
        inv_m = np.where(max_min > 0, f(63) / max_min, f(0)).astype(f)
    ls = np.minimum(np.rint(inv_s[:, None] * scales), 63).astype(np.uint8)
    lm = np.minimum(np.rint(inv_m[:, None] * mins), 63).astype(np.uint8)
    packed = np.zeros((nb, 12), np.uint8)
    packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    d = (max_scale / f(63)).astype(np.float16)
    dmin = (max_min / f(63)).astype(np.float16)
    ds = d.astype(f)[:, None] * ls.astype(f)
    dm = dmin.astype(f)[:, None] * lm.astype(f)
    xb = x.reshape(nb, 8, 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        redo = np.clip(np.rint((xb + dm[:, :, None]) / ds[:, :, None]), 0, 15)
    q = np.where((ds != 0)[:, :, None], redo, levels.reshape(nb, 8, 32)).astype(np.uint8)
    qs = (q[:, 0::2, :] | (q[:, 1::2, :] << 4)).reshape(nb, 128)  # sub-blocks 2i, 2i+1 share 32 bytes
    out = np.empty((nb, BLOCK_BYTES["q4_k"]), dtype=np.uint8)
    out[:, 0:2] = d.reshape(nb, 1).view(np.uint8)
    out[:, 2:4] = dmin.reshape(nb, 1).view(np.uint8)
    out[:, 4:16] = packed
    out[:, 16:] = qs
    return out


def _qx(x: np.ndarray, nmax: int):
    """llama.cpp's make_qx_quants with rmse_type 1 on rows of x: a symmetric grid (levels -nmax..nmax-1)
    whose scale is the x^2-weighted least-squares fit, the best of 19 trial grids. Returns (scale, l + nmax)."""
    f = np.float32
    i = np.abs(x).argmax(axis=1)
    vmax = x[np.arange(x.shape[0]), i]
    zero = np.abs(vmax) < f(1e-15)
    w = x * x
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = (f(-nmax) / vmax).astype(f)
        lv = np.clip(np.rint(iscale[:, None] * x), -nmax, nmax - 1).astype(f)
        slx, sl2 = (w * x * lv).sum(axis=1), (w * lv * lv).sum(axis=1)
        scale = np.where(sl2 != 0, slx / sl2, f(0)).astype(f)
        best = scale * slx
        for k in (*range(-9, 0), *range(1, 10)):
            iscale = (-(f(nmax) + f(0.1) * f(k)) / vmax).astype(f)
            la = np.clip(np.rint(iscale[:, None] * x), -nmax, nmax - 1).astype(f)
            slx, sl2 = (w * x * la).sum(axis=1), (w * la * la).sum(axis=1)
            better = (sl2 > 0) & (slx * slx > best * sl2)
            lv = np.where(better[:, None], la, lv)
            scale = np.where(better, slx / sl2, scale).astype(f)
            best = np.where(better, scale * slx, best)
    levels = np.where(zero[:, None], f(0), lv + f(nmax))
    return np.where(zero, f(0), scale).astype(f), levels


def _quantize_blocks_q6_k(x: np.ndarray) -> np.ndarray:
    # ggml quantize_row_q6_K_ref: per sub-block of 16 a symmetric 6-bit grid (make_qx_quants), the 16
    # scales quantized to int8 against the largest, the levels recomputed against the rounded scales.
    f = np.float32
    nb = x.shape[0]
    scales, levels = _qx(x.reshape(nb * 16, 16), 32)
    scales, levels = scales.reshape(nb, 16), levels.reshape(nb, 16, 16)
    i = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(nb), i]
    zero = np.abs(max_scale) < f(1e-15)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(zero, f(0), f(-128) / max_scale).astype(f)
        d = np.where(zero, f(0), f(1) / iscale).astype(np.float16)
    sc = np.minimum(np.rint(iscale[:, None] * scales), 127).astype(np.int8)
    ds = d.astype(f)[:, None] * sc.astype(f)
    xb = x.reshape(nb, 16, 16)
    with np.errstate(divide="ignore", invalid="ignore"):
        redo = np.clip(np.rint(xb / ds[:, :, None]), -32, 31) + 32
    q = np.where((ds != 0)[:, :, None], redo, levels).astype(np.uint8).reshape(nb, 2, 4, 32)
    q = np.where(zero[:, None, None, None], np.uint8(0), q)
    sc = np.where(zero[:, None], np.int8(0), sc)
    lo = q & np.uint8(0xF)
    ql = np.concatenate([lo[:, :, 0] | lo[:, :, 2] << 4, lo[:, :, 1] | lo[:, :, 3] << 4], axis=2)
    qh = (q[:, :, 0] >> 4) | (q[:, :, 1] >> 4) << 2 | (q[:, :, 2] >> 4) << 4 | (q[:, :, 3] >> 4) << 6
    out = np.empty((nb, BLOCK_BYTES["q6_k"]), dtype=np.uint8)
    out[:, 0:128] = ql.reshape(nb, 128)
    out[:, 128:192] = qh.reshape(nb, 64)
    out[:, 192:208] = sc.view(np.uint8)
    out[:, 208:210] = d.reshape(nb, 1).view(np.uint8)
    return out


def _gguf(what: str):
    """The gguf package (the [convert] extra), or a QoraError naming it."""
    try:
        import gguf.constants
        import gguf.quants
    except ImportError:
        from qora.errors import QoraError

        raise QoraError(f"{what} needs the gguf package: pip install 'qora[convert]'") from None
    return gguf


def _gguf_quantizer(name: str):
    """gguf-py's quantizer of a 32-element type (ggml's reference, bit for bit)."""

    def quantize_blocks(x: np.ndarray) -> np.ndarray:
        gguf = _gguf("writing " + name)
        return gguf.quants.quantize(x, gguf.constants.GGMLQuantizationType[WEIGHT_TYPES[name].gguf]).reshape(
            x.shape[0], -1
        )

    return quantize_blocks


_QUANT_BLOCKS = {
    "q4": _quantize_blocks_q4,
    "q8": _quantize_blocks_q8,
    "q4_1": _gguf_quantizer("q4_1"),
    "q5_0": _gguf_quantizer("q5_0"),
    "q5_1": _gguf_quantizer("q5_1"),
    "q4_k": _quantize_blocks_q4_k,
    "q6_k": _quantize_blocks_q6_k,
}
_DEQUANT_BLOCKS = {"q4": _dequantize_blocks_q4, "q8": _dequantize_blocks_q8}
WRITABLE = tuple(n for n, t in WEIGHT_TYPES.items() if t.writable)  # what quantize() can make


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def quantize(arr, dtype: str) -> np.ndarray:
    """Convert a float array to qora storage.

    q4/q8: `arr` must be 2-D [rows, cols] with cols % 32 == 0; returns uint8 [rows, row_bytes].
    f16/f32: returns a little-endian float16/float32 array of the same shape (any rank).
    """
    _check_dtype(dtype)
    arr = np.asarray(arr)
    if dtype not in _QUANT_BLOCKS and dtype not in ("f16", "f32"):
        raise ValueError(f"qora has no quantizer for {dtype} (it can write {', '.join(WRITABLE)})")
    if dtype in FLOAT_DTYPES:
        return np.ascontiguousarray(arr, dtype=FLOAT_DTYPES[dtype])
    if arr.ndim != 2:
        raise ValueError(f"{dtype} quantization needs a 2-D array, got shape {list(arr.shape)}")
    rows, cols = arr.shape
    rb = row_bytes(dtype, cols)
    out = np.empty((rows, rb), dtype=np.uint8)
    fn = _QUANT_BLOCKS[dtype]
    step = max(1, _CHUNK_ELEMS // max(cols, 1))
    for r0 in range(0, rows, step):
        chunk = np.ascontiguousarray(arr[r0 : r0 + step], dtype=np.float32)
        n = chunk.shape[0]
        out[r0 : r0 + n] = fn(chunk.reshape(-1, WEIGHT_TYPES[dtype].block)).reshape(n, rb)
    return out


def dequantize(raw, dtype: str, shape) -> np.ndarray:
    """Decode stored data (bytes, or an array as returned by quantize / QoraFile.tensor) to float32."""
    _check_dtype(dtype)
    shape = tuple(int(s) for s in shape)
    want = nbytes(dtype, shape)
    if isinstance(raw, np.ndarray):
        buf = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    else:
        buf = np.frombuffer(raw, dtype=np.uint8)
    if buf.size != want:
        raise ValueError(f"{dtype} tensor of shape {list(shape)} needs {want} bytes, got {buf.size}")
    if dtype not in _DEQUANT_BLOCKS and dtype not in ("f16", "f32"):
        gguf = _gguf("decoding " + dtype)
        qtype = gguf.constants.GGMLQuantizationType[WEIGHT_TYPES[dtype].gguf]
        return gguf.quants.dequantize(buf, qtype).astype(np.float32).reshape(shape)
    if dtype in FLOAT_DTYPES:
        return buf.view(FLOAT_DTYPES[dtype]).astype(np.float32).reshape(shape)
    rows, cols = shape
    rb = row_bytes(dtype, cols)
    buf = buf.reshape(rows, rb)
    out = np.empty(shape, dtype=np.float32)
    fn = _DEQUANT_BLOCKS[dtype]
    step = max(1, _CHUNK_ELEMS // max(cols, 1))
    for r0 in range(0, rows, step):
        chunk = buf[r0 : r0 + step]
        n = chunk.shape[0]
        out[r0 : r0 + n] = fn(chunk.reshape(-1, BLOCK_BYTES[dtype])).reshape(n, cols)
    return out
