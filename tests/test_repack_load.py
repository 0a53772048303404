"""The interleaved copies made at load (include/qora/kquants_repack.h qora_repack_all: every matrix of the
model in one buffer, one parallel pass cut into pieces across matrices) are byte for byte the per-matrix
layouts the kernels are tested on (qora_repack_q4x8, qora_kx8_repack), whatever the thread count, for
ragged shapes (rows past the last group of 8, matrices of fewer than 8 rows, pieces that end inside a
matrix) and for types kept in the file's layout; Q4_0's layout also against a NumPy model of block_q4x8."""

import platform

import numpy as np
import pytest

from qora._core import _cpu
from qora.dtypes import WEIGHT_TYPES
from qora.engine import DECODE_WALKS, ISA_NAMES

from test_quants_native import random_blocks

FEATS = _cpu.cpu_features()
X86 = platform.machine().lower() in ("x86_64", "amd64")
ISAS = [i for i, n in enumerate(ISA_NAMES) if n in FEATS["cpu_supports"] and n in FEATS["compiled"]]


def mixed_model(r):
    """Matrices as a Q4_K_M file mixes them, with shapes that cut the 256 KiB pieces inside matrices."""
    mats = []
    for dtype, rows, blocks in [
        ("q4_k", 130, 9), ("q6_k", 64, 9), ("q8", 131, 128), ("q4", 1000, 64), ("q5_0", 8, 18), ("q4_k", 7, 9),
        ("f16", 16, 64), ("q5_k", 200, 8), ("q4_1", 77, 40), ("q5_1", 9, 3), ("bf16", 8, 32), ("q6_k", 1030, 6),
        ("q4", 5, 2), ("f32", 24, 8),
    ]:
        cols = blocks * max(WEIGHT_TYPES[dtype].block, 1)
        mats.append((random_blocks(r, dtype, rows, cols), dtype, rows, cols))
    return mats


@pytest.mark.parametrize("isa", ISAS, ids=[ISA_NAMES[i] for i in ISAS])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_one_pass_equals_the_per_matrix_layouts(isa, threads):
    mats = mixed_model(np.random.default_rng())
    together = _cpu.repacked_layouts(mats, threads, isa, True)
    alone = _cpu.repacked_layouts(mats, 1, isa, False)
    for (_, dtype, rows, cols), a, b in zip(mats, together, alone):
        if rows < 8 or dtype in ("f16", "bf16", "f32"):
            assert a is None and b is None, (dtype, rows, cols)
            continue
        if dtype == "q4" or (X86 and ISA_NAMES[isa] != "scalar"):  # x86's vector paths have every x8 kernel
            assert a is not None, (dtype, rows, cols)
        if a is None:
            assert b is None
            continue
        np.testing.assert_array_equal(a, b, err_msg=f"{dtype} {rows}x{cols}, {threads} threads")


def q4x8_reference(raw, rows, cols):
    """block_q4x8 of repack.h in NumPy: per group of 8 rows and block, the 8 f16 scales, then for k < 4
    the bytes 4k..4k+3 of each row's 16 nibble bytes."""
    nb = cols // 32
    blocks = raw.reshape(rows, nb, 18)[: rows // 8 * 8].reshape(rows // 8, 8, nb, 18).transpose(0, 2, 1, 3)
    d = blocks[..., :2].reshape(rows // 8, nb, 16)
    qs = blocks[..., 2:].reshape(rows // 8, nb, 8, 4, 4).transpose(0, 1, 3, 2, 4).reshape(rows // 8, nb, 128)
    return np.concatenate([d, qs], axis=2).reshape(-1)


def test_q4_layout_against_numpy():
    r = np.random.default_rng()
    mats = [(random_blocks(r, "q4", rows, 32 * nb), "q4", rows, 32 * nb) for rows, nb in [(8, 1), (21, 3), (4000, 70)]]
    for (raw, _, rows, cols), got in zip(mats, _cpu.repacked_layouts(mats, 2, ISAS[-1], True)):
        np.testing.assert_array_equal(got, q4x8_reference(raw, rows, cols))


@pytest.mark.parametrize("dtype", ["q8", "q4_1", "q5_0", "q5_1", "q4_k", "q6_k"])
def test_decode_walks_give_the_same_bits(dtype):
    """One-token products over the x8 copies walk a group's blocks as the process-wide decode walk says
    (QORA_KERNEL: seq, one stream; stream, the same without software prefetch; seg4, the four segments at once): the same chains in the same order,
    so the same bits, equal to the scalar path's; block counts below 4, not a multiple of 4, rows past the
    last group of 8."""
    r = np.random.default_rng()
    block = max(WEIGHT_TYPES[dtype].block, 32)
    scalar = ISA_NAMES.index("scalar")
    before = _cpu.decode_walk()
    try:
        for rows, nb in [(8, 1), (16, 3), (130, 9), (64, 37)]:
            cols = block * nb
            raw = random_blocks(r, dtype, rows, cols)
            x = r.standard_normal((1, cols)).astype(np.float32)
            base = _cpu.matmul(raw, dtype, rows, cols, x, scalar, 1, False)
            for walk in DECODE_WALKS:
                _cpu.set_decode_walk(walk)
                for isa in ISAS:
                    for threads in (1, 2):
                        y = _cpu.matmul(raw, dtype, rows, cols, x, isa, threads, True)
                        np.testing.assert_array_equal(y, base, err_msg=f"{walk} {ISA_NAMES[isa]} {dtype} {rows}x{cols}")
    finally:
        _cpu.set_decode_walk(before)
