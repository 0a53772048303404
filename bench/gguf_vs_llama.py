"""qora and llama.cpp on the very same GGUF files: `qora bench` and llama-bench alternated, round after round,
so a noisy machine moves both alike; prints each side's tok/s (mean of all its samples) and the ratio.

    python bench/gguf_vs_llama.py --llama-bench /tmp/lcb-native/bin/llama-bench --threads 2 --pp 64 --tg 32 \\
        --rounds 3 --reps 2 /tmp/r3b.q4_k_m.gguf /tmp/r3b.q8_0.gguf

qora runs with --precision q8 (integer products over 8-bit activations, llama.cpp's arithmetic) unless
--precision says otherwise. --json FILE keeps every sample.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def qora_run(model: str, threads: int, pp: int, tg: int, reps: int, precision: str) -> dict[str, list[float]]:
    cmd = [sys.executable, "-m", "qora", "bench", "--load", model, "--cpu", "--threads", str(threads), "--pp", str(pp)]
    cmd += ["--tg", str(tg), "--reps", str(reps), "--precision", precision, "--json", "--quiet"]
    r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return {"pp": r["pp_samples"], "tg": r["tg_samples"]}


def llama_run(exe: str, model: str, threads: int, pp: int, tg: int, reps: int) -> dict[str, list[float]]:
    cmd = [exe, "-m", model, "-t", str(threads), "-p", str(pp), "-n", str(tg), "-r", str(reps), "-o", "json"]
    rows = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    out: dict[str, list[float]] = {"pp": [], "tg": []}
    for row in rows:
        out["pp" if row["n_prompt"] else "tg"] += list(row["samples_ts"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--llama-bench", default="/tmp/lcb-native/bin/llama-bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pp", type=int, default=64)
    ap.add_argument("--tg", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precision", default="q8", choices=("q8", "f32"))
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    samples: dict = {}
    for rnd in range(a.rounds):
        for m in a.models:
            for side in ("llama.cpp", "qora"):
                if side == "qora":
                    got = qora_run(m, a.threads, a.pp, a.tg, a.reps, a.precision)
                else:
                    got = llama_run(a.llama_bench, m, a.threads, a.pp, a.tg, a.reps)
                for test, v in got.items():
                    samples.setdefault((m, test, side), []).extend(v)
                print(f"round {rnd + 1}: {Path(m).name} {side}: " + ", ".join(
                    f"{t} {statistics.mean(v):.2f}" for t, v in got.items() if v), file=sys.stderr, flush=True)
    print(f"{a.threads} threads, pp{a.pp} / tg{a.tg}, {a.rounds} rounds x {a.reps} reps, qora --precision {a.precision}")
    print("| model | test | llama.cpp tok/s | qora tok/s | qora / llama.cpp |")
    print("|---|---|---|---|---|")
    for m in a.models:
        for test, n in (("pp", a.pp), ("tg", a.tg)):
            lc, qo = samples.get((m, test, "llama.cpp"), []), samples.get((m, test, "qora"), [])
            if not lc or not qo:
                continue
            ml, mq = statistics.mean(lc), statistics.mean(qo)
            sl, sq = (statistics.stdev(v) if len(v) > 1 else 0.0 for v in (lc, qo))
            print(f"| {Path(m).name} | {test}{n} | {ml:.2f} ± {sl:.2f} | {mq:.2f} ± {sq:.2f} | {mq / ml:.2f}x |")
    if a.json:
        Path(a.json).write_text(json.dumps({"|".join(k): v for k, v in samples.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
