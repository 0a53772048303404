"""Decode-shaped products (one token) of each weight type, in GB/s of weights read: the native kernels of
the GGUF types against Q4_0 (repacked as the engine does). The types are timed interleaved, several
rounds, so a noisy machine moves them alike; compare the ratios.

    python bench/kquant_matvec.py [--rows 8192] [--cols 4096] [--threads 2] [--rounds 5] [--isa avx2] [--walk seq]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from qora._core import _cpu
from qora.dtypes import WEIGHT_TYPES
from qora.engine import ISA_NAMES
from qora.engine.cpu import DECODE_WALKS, resolve_kernel

TYPES = ["q4", "q4_1", "q5_0", "q5_1", "q8", "q4_k", "q5_k", "q6_k", "f16", "bf16"]


def random_weights(r, dtype, rows, cols):
    t = WEIGHT_TYPES[dtype]
    if not t.quantized:
        return r.integers(0, 1 << 14, size=(rows, cols), dtype=np.uint16).view("<f2" if dtype == "f16" else "<u2")
    nb = rows * cols // t.block
    raw = r.integers(0, 256, size=(nb, t.block_bytes), dtype=np.uint8)
    for off in t.scales:
        raw[:, off : off + 2] = np.full(nb, 0.01, "<f2").view(np.uint8).reshape(nb, 2)
    return raw.reshape(rows, -1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=0.3, help="per type per round")
    p.add_argument("--isa", default=None, help=f"one of {', '.join(ISA_NAMES)} (default: the best)")
    p.add_argument("--precision", choices=("q8", "f32"), default="q8")
    p.add_argument("--types", default=",".join(TYPES))
    p.add_argument("--file-layout", action="store_true", help="no interleaved copies (QORA_REPACK=0's layout)")
    p.add_argument("--walk", choices=DECODE_WALKS, default=None, help="decode walk (default: the engine's choice)")
    a = p.parse_args(argv)
    walk = _cpu.set_decode_walk(a.walk or resolve_kernel()[0])
    feats = _cpu.cpu_features()
    isa = (
        ISA_NAMES.index(a.isa)
        if a.isa
        else max(i for i, n in enumerate(ISA_NAMES) if n in feats["cpu_supports"] and n in feats["compiled"])
    )
    r = np.random.default_rng(0)
    types = a.types.split(",")
    mats = {
        t: _cpu.Matrix(random_weights(r, t, a.rows, a.cols), t, a.rows, a.cols, not a.file_layout, a.threads) for t in types
    }
    x = r.standard_normal((1, a.cols)).astype(np.float32)
    best = {t: float("inf") for t in types}
    f32 = a.precision == "f32"
    for _ in range(a.rounds):
        for t, m in mats.items():
            m.matmul(x, isa, a.threads, f32)
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < a.seconds:
                m.matmul(x, isa, a.threads, f32)
                n += 1
            best[t] = min(best[t], (time.perf_counter() - t0) / n)
    print(f"{a.rows}x{a.cols}, {ISA_NAMES[isa]}, {a.threads} threads, {a.precision} activations, walk {walk}, "
          f"best of {a.rounds}")
    base = None
    for t in types:
        gbs = a.rows * a.cols * WEIGHT_TYPES[t].bits_per_weight / 8 / best[t] / 1e9
        base = base or gbs
        print(f"  {t:5s} {best[t] * 1e6:9.1f} us  {gbs:6.2f} GB/s  ({gbs / base:.2f}x {types[0]}'s GB/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
