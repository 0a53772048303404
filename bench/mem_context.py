"""Peak memory of a model loaded at a long context, against what it must hold: the weights and the
KV cache (issue 13's goal: RSS <= weights + KV + 10 % at 64K context).

    python bench/mem_context.py                       # the demo model (SmolLM2-135M, 8,192 positions)
                                                      # stretched by YaRN x8 to 65,536, prompt of 65,536
    python bench/mem_context.py --load M.qora --context 65536 --prompt 8192 --kv-type q8

The prompt (random token ids) is prefilled in pieces, and peak RSS is psutil's resident set sampled
every 10 ms (and the kernel's ru_maxrss, which cannot miss a peak). Reported: the process before
loading (interpreter, NumPy, qora), the weights' bytes, the KV cache as allocated (context x per
token) and as filled (prompt x per token; calloc'd pages are resident only once written), the peak
and the rest (peak - before - weights - filled KV) as a share of weights + filled KV.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time

import numpy as np
import psutil


class PeakRss:
    """The process's largest resident set, sampled in a thread."""

    def __init__(self, every=0.01):
        self.proc, self.every, self.peak = psutil.Process(), every, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.every)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", help="model (default: the demo model)")
    ap.add_argument("--context", type=int, default=65536)
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default: the whole context)")
    ap.add_argument("--rope-scaling", default=None, help="default for the demo: yarn:8 (8,192 -> 65,536)")
    ap.add_argument("--kv-type", default=None, choices=("f16", "f32", "q8"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--piece", type=int, default=4096, help="prompt tokens per forward call")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)

    import qora
    from qora.engine.base import context_bytes_per_token
    from qora.loader import resolve_model_path

    path = resolve_model_path(a.load)
    rope = a.rope_scaling or (None if a.load else "yarn:8")
    before = psutil.Process().memory_info().rss
    with PeakRss() as peak:
        t0 = time.perf_counter()
        model = qora.load(
            path, device="cpu", threads=a.threads, max_seq_len=a.context, rope_scaling=rope, kv_type=a.kv_type
        )
        eng = model.engine
        n = min(a.prompt or eng.max_seq_len, eng.max_seq_len)
        ids = np.random.default_rng(0).integers(3, eng.vocab_size, n)
        for i in range(0, n, a.piece):
            eng.forward(ids[i : i + a.piece], i)
            print(f"  {min(n, i + a.piece)} / {n} tokens, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        weights = sum(model.file.tensor(k).nbytes for k in model.file.tensor_info)
        cfg = model.config
        kv_tok = 2 * cfg["n_layers"] * cfg["n_kv_heads"] * cfg["head_dim"]  # values per token (K and V)
        from qora.engine.base import KV_ELEMENT_BYTES

        kv_alloc = eng.max_seq_len * kv_tok * KV_ELEMENT_BYTES[eng.kv_dtype]
        kv_filled = n * kv_tok * KV_ELEMENT_BYTES[eng.kv_dtype]
        preflight = eng.max_seq_len * context_bytes_per_token(cfg, eng.kv_dtype)
        model.close()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    top = max(peak.peak, maxrss)
    rest = top - before - weights - kv_filled
    r = {
        "model": str(path),
        "context": eng.max_seq_len,
        "prompt": n,
        "kv_type": eng.kv_dtype,
        "threads": eng.n_threads,
        "rss_before_load": before,
        "weights": weights,
        "kv_allocated": int(kv_alloc),
        "kv_filled": int(kv_filled),
        "preflight_bytes": int(preflight),
        "peak_rss": top,
        "rest": int(rest),
        "rest_share": rest / (weights + kv_filled),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if a.json:
        print(json.dumps(r))
    else:
        mb = 2**20
        print(
            f"{r['model']}: context {r['context']}, prompt {n}, KV {r['kv_type']}, {r['threads']} threads\n"
            f"  before load {before / mb:.0f} MiB; weights {weights / mb:.0f} MiB; KV allocated {kv_alloc / mb:.0f} "
            f"MiB, filled {kv_filled / mb:.0f} MiB\n"
            f"  peak RSS {top / mb:.0f} MiB = before + weights + filled KV + {rest / mb:.0f} MiB "
            f"({100 * r['rest_share']:.1f} % of weights + KV)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
