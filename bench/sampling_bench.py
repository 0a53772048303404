"""What choosing the token costs: the default Sampler per token at a model's vocabulary (NumPy, the
reference, against the C sampler; CPU time), and decode with it against raw decode (interleaved
repetitions, so a noisy machine hits all alike).

    python bench/sampling_bench.py --load /tmp/r3b.qora --tg 16 --reps 3 [--cpu | --gpu] [--threads 2]

On a GPU (--gpu) the sampled decode goes through VulkanEngine.forward_lazy (candidates read back) as
qora's generation does; "numpy" there reads the whole row back and samples in NumPy, as before.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qora.generate import engine_step  # noqa: E402
from qora.loader import load_model  # noqa: E402
from qora.sampling import Sampler  # noqa: E402


def sampler_cost(vocab: int, reps: int = 300) -> dict:
    """ms of CPU time per call of the default Sampler (and greedy) on random logits, NumPy vs C."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(vocab) * 3).astype(np.float32)
    history = rng.integers(0, vocab, 200).tolist()
    out = {}
    for name, kw in (("default", {}), ("greedy", {"greedy": True})):
        for fast in (False, True):
            s = Sampler(seed=0, fast=fast, **kw)
            s(x, history)
            best = []
            for _ in range(3):
                t0 = time.process_time()
                for _ in range(reps):
                    s(x, history)
                best.append((time.process_time() - t0) / reps * 1e3)
            out[f"{name} {'c' if fast else 'numpy'}"] = min(best)
    return out


def decode(engine, n: int, start: int, sampler: Sampler | None, lazy: bool) -> float:
    """tok/s of n steps from position `start`: random ids (raw) or each chosen by `sampler`."""
    rng = np.random.default_rng(1)
    t, history = int(rng.integers(0, engine.vocab_size)), []
    t0 = time.perf_counter()
    for pos in range(start, start + n):
        if sampler is None:
            engine.forward(np.array([t], dtype=np.int32), pos)
            t = int(rng.integers(0, engine.vocab_size))
            continue
        logits = engine_step(engine, t, pos) if lazy else engine.forward(np.array([t], dtype=np.int32), pos)[-1]
        history.append(t)
        t = sampler(logits, history)
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", required=True)
    ap.add_argument("--tg", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int)
    dev = ap.add_mutually_exclusive_group()
    dev.add_argument("--cpu", action="store_true")
    dev.add_argument("--gpu", action="store_true")
    a = ap.parse_args()
    device = "gpu" if a.gpu else "cpu" if a.cpu else "auto"
    with load_model(a.load, device, a.threads, context=a.tg + 64) as model:
        e = model.engine
        print(f"device {e.device} ({e.device_name}), isa {e.isa}, threads {e.n_threads}, vocab {e.vocab_size}")
        for k, v in sampler_cost(e.vocab_size).items():
            print(f"sampler {k}: {v:.3f} ms/token (CPU time)")
        runs = {"raw": [], "sampled c": [], "sampled numpy": []}
        decode(e, 4, 0, None, False)  # warm-up
        for _ in range(a.reps):
            runs["raw"].append(decode(e, a.tg, 0, None, False))
            runs["sampled c"].append(decode(e, a.tg, 0, Sampler(seed=0), True))
            runs["sampled numpy"].append(decode(e, a.tg, 0, Sampler(seed=0, fast=False), False))
        raw = statistics.median(runs["raw"])
        for k, v in runs.items():
            m = statistics.median(v)
            print(f"tg{a.tg} {k}: {m:.2f} tok/s (median of {a.reps}: {', '.join(f'{x:.2f}' for x in v)}), "
                  f"{100 * m / raw:.1f}% of raw")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
