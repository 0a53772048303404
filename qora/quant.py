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


_QUANT_BLOCKS = {"q4": _quantize_blocks_q4, "q8": _quantize_blocks_q8}
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
        out[r0 : r0 + n] = fn(chunk.reshape(-1, QK)).reshape(n, rb)
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
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize as gguf_dequantize

        return gguf_dequantize(buf, GGMLQuantizationType[WEIGHT_TYPES[dtype].gguf]).astype(np.float32).reshape(shape)
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
