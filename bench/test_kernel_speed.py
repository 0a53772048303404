"""Kernel speed: every SmolLM3-3B matrix product in Q4, for decode (1 token) and prefill chunks.

    python -m pytest bench/test_kernel_speed.py [--threads N] [--kernel-tokens 1,16,64] [--reps 3]

Shapes (rows x cols, y = W x): q and o 2048x2048, k and v 512x2048, gate+up as the engine runs them
(the fused SwiGLU over two 11008x2048 matrices), down 2048x11008, the LM head 128256x2048. Weights:
NumPy random numbers (fixed seed per shape) quantized by qora.quant, as a converted model would be.
Each matrix is prepared once as the engine does at load (_cpu.Matrix), then every timed call runs
the product alone (activations quantized to Q8 once per call, as the engine does per matrix), in both
layouts: "q4x8" (rows interleaved by 8, what the engine runs; 16 rows per vector pair on AVX-512, AMX
tiles for 16-token chunks where the CPU has them) and "q4" (file order, QORA_REPACK=0).
Recorded next to the time: GB/s = weight bytes / time, GOP/s = 2 x weights x tokens / time.
"""

from __future__ import annotations

import time

import harness
import numpy as np
import pytest
from random_model import SMOLLM3_CONFIG

from qora import quant
from qora._core import _cpu
from qora.engine import resolve_isa

C = SMOLLM3_CONFIG
D, H, V = C["dim"], C["hidden_dim"], C["vocab_size"]
QD, KV = C["n_heads"] * C["head_dim"], C["n_kv_heads"] * C["head_dim"]
# name -> (rows, cols, matrices): the products of one layer, and the LM head; swiglu reads two
SHAPES = {
    "q": (QD, D, 1),
    "k": (KV, D, 1),
    "v": (KV, D, 1),
    "o": (D, QD, 1),
    "gate_up": (H, D, 2),
    "down": (D, H, 1),
    "lm_head": (V, D, 1),
}
LAYOUTS = {"q4x8": True, "q4": False}  # name -> repack
MIN_ROUND_SECONDS = 0.05  # each timed round repeats the call until it lasts about this long


def random_q4(rows: int, cols: int, seed: int) -> np.ndarray:
    """Gaussian weights quantized to Q4 (uint8 rows), generated in slices so the float32 copy of the
    LM head (1 GB) never exists at once."""
    rng = np.random.default_rng(seed)
    out = np.empty(quant.storage_shape("q4", (rows, cols)), dtype=np.uint8)
    step = max(1, (1 << 24) // cols)
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        out[r0 : r0 + n] = quant.quantize(0.02 * rng.standard_normal((n, cols), dtype=np.float32), "q4")
    return out


@pytest.fixture(scope="session")
def kernel_weights():
    cache = {}

    def get(name):
        if name not in cache:
            rows, cols, mats = SHAPES[name]
            seed = list(SHAPES).index(name)
            cache[name] = [random_q4(rows, cols, 100 * seed + m) for m in range(mats)]
        return cache[name]

    return get


def _product(name, weights, x, isa, threads, repack):
    rows, cols, _ = SHAPES[name]
    mats = [_cpu.Matrix(w, "q4", rows, cols, repack, threads) for w in weights]  # prepared once, as at load
    if name == "gate_up":
        return lambda: _cpu.swiglu_prepared(mats[0], mats[1], x, isa, threads)
    return lambda: mats[0].matmul(x, isa, threads)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(SHAPES))
def test_kernel(benchmark, kernel_weights, settings, name, layout, kernel_tokens):
    rows, cols, mats = SHAPES[name]
    isa, _ = resolve_isa()
    threads = settings["threads"]
    weights = kernel_weights(name)
    x = np.random.default_rng(1).standard_normal((kernel_tokens, cols), dtype=np.float32)
    fn = _product(name, weights, x, isa, threads, LAYOUTS[layout])
    y = fn()  # warm-up, and the size of a round
    assert y.shape == (kernel_tokens, rows) and np.isfinite(y).all()
    t0 = time.perf_counter()
    fn()
    iterations = max(1, int(MIN_ROUND_SECONDS / max(time.perf_counter() - t0, 1e-6)))
    benchmark.pedantic(fn, rounds=max(3, settings["reps"]), iterations=iterations, warmup_rounds=0)
    stats = benchmark.stats.stats if benchmark.stats else None
    if stats is None or not stats.data:  # --benchmark-disable: nothing was timed
        return
    k = harness.Kernel(
        name=name,
        shape=f"{rows}x{cols}" + (" x2" if mats > 1 else ""),
        layout=layout,
        tokens=kernel_tokens,
        threads=threads,
        isa=_cpu.ISA_NAMES[isa],
        weight_bytes=sum(w.nbytes for w in weights),
        ops=2 * mats * rows * cols * kernel_tokens,
        seconds=stats.median,
    )
    benchmark.extra_info.update(k.extra_info())
    harness.KERNELS.append(k)
