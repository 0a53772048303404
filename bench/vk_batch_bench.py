"""The batched Vulkan step alone (issue 17): aggregate decode tok/s of R sequences decoding together
through `forward_batch` (one pass per step, R rows), against the single-sequence decode step
(`forward_lazy`, what `qora` runs for one user) on the same engine, the same cached depth.

    python bench/vk_batch_bench.py --nvidia-icd                     # random SmolLM3-3B-shaped Q4
    python bench/vk_batch_bench.py --rows 1,2,4,8,16,32 --depth 0,1024 --steps 32 --reps 3
    QORA_VK_ALLOW_CPU=1 python bench/vk_batch_bench.py --model tiny.qora --rows 1,2 --steps 2 --reps 1

Each R: R slots are filled to `depth` tokens (one prompt copied by copy_slot into the others), then
`steps` steps of R decode rows are timed; tok/s = R x steps / time. The single decode row is timed the
same way on the engine's own cache. Results are wall-clock tok/s (best and median of reps), plus, with
--profile, the GPU time per kernel of a batched step (prefill labels: the batched step is recorded
as a prefill of R rows).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import random_model  # noqa: E402
from vulkan_bench import ensure_model, nvidia_icd  # noqa: E402


def single(engine, depth: int, steps: int, vocab: int, rng) -> float:
    engine.forward(rng.integers(0, vocab, max(depth, 1)).astype(np.int32), 0)
    pos = max(depth, 1)
    t0 = time.perf_counter()
    for i in range(steps):
        engine.forward_lazy(int(rng.integers(0, vocab)), pos + i)
    return steps / (time.perf_counter() - t0)


def batched(engine, rows: int, depth: int, steps: int, vocab: int, rng) -> float:
    start = max(depth, 1)
    engine.forward_batch([(0, rng.integers(0, vocab, start), 0)])
    for s in range(1, rows):
        engine.copy_slot(0, s, start)
    engine.forward_batch([(s, [1], start) for s in range(rows)])  # warm: this shape's pipelines, sets
    t0 = time.perf_counter()
    for i in range(steps):
        engine.forward_batch([(s, [int(rng.integers(0, vocab))], start + 1 + i) for s in range(rows)])
    return rows * steps / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a .qora or GGUF file (default: the random SmolLM3-3B-shaped model)")
    ap.add_argument("--quant", default="q4", choices=random_model.QUANTS)
    ap.add_argument("--layers", type=int, help="random model with fewer layers (quick runs)")
    ap.add_argument("--rows", default="1,2,4,8,16,32", help="sequences decoding together, comma-separated")
    ap.add_argument("--depth", default="0,1024", help="tokens cached per sequence before the timed steps")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="GPU time per kernel of the batched steps")
    ap.add_argument("--nvidia-icd", action="store_true", help="write an NVIDIA loader manifest if missing")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    if a.nvidia_icd and not os.environ.get("VK_ICD_FILENAMES"):
        icd = nvidia_icd()
        if icd:
            os.environ["VK_ICD_FILENAMES"] = icd
    if a.profile:
        os.environ["QORA_VK_PROFILE"] = "1"
    from qora.engine import VulkanEngine
    from qora.loader import open_model_file

    rows = [int(r) for r in a.rows.split(",")]
    depths = [int(d) for d in a.depth.split(",")]
    qf = open_model_file(ensure_model(a.model, a.quant, a.layers))
    context = max(depths) + a.steps + 8
    engine = VulkanEngine(qf, max_seq_len=context, required=True)
    engine.open_slots(max(rows), context)
    vocab, rng = engine.vocab_size, np.random.default_rng(0)
    print(f"{engine.device_name}: {Path(qf.path).name}, {engine.kv_dtype} KV, {a.steps} steps x {a.reps} reps")
    results = []
    for depth in depths:
        one = [single(engine, depth, a.steps, vocab, rng) for _ in range(a.reps)]
        print(f"depth {depth:5d}  single decode ({'forward_lazy':>12s}): {max(one):8.1f} tok/s", flush=True)
        results.append({"depth": depth, "rows": 0, "tok_s": one})
        for r in rows:
            got = [batched(engine, r, depth, a.steps, vocab, rng) for _ in range(a.reps)]
            print(
                f"depth {depth:5d}  {r:3d} rows per step: {max(got):8.1f} tok/s (median {statistics.median(got):.1f}), "
                f"{max(got) / max(one):.2f}x one sequence",
                flush=True,
            )
            results.append({"depth": depth, "rows": r, "tok_s": got})
    if a.profile:
        kernels, ms = engine.prefill_profile()
        print(f"GPU profile of the prefill-type submissions (the batched steps and the cache fills): {ms:.3f} ms each")
        for name, (k_ms, calls) in sorted(kernels.items(), key=lambda kv: -kv[1][0]):
            print(f"  {name:14s} {k_ms:8.3f} ms  {calls:5.0f} dispatches")
    if a.json:
        a.json.write_text(json.dumps({"device": engine.device_name, "results": results}, indent=1))
    engine.close()
    qf.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
