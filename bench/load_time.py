"""How long `qora.load` takes to open a model, against a plain sequential read of the same file.

Each `qora.load` runs in a fresh process (imports, parsing and the engine's first touch of its memory count,
as for a user), the files and thread counts interleaved round by round so a noisy machine moves them alike.
The file is read before each load, so the page cache is warm: the figure is the load's own cost,
not the disk's. Phases (`import qora` is not part of the load): the file opened and checked (header,
metadata, tokenizer, the finiteness scan); the rest (the loader's Tokenizer, its lazy imports, the
Model); the engine built (for the CPU engine with 8-bit activations: the interleaved copies of the
matrices, kquants_repack.h qora_repack_all).

    python bench/load_time.py [--threads 1,2] [--rounds 3] [--no-repack] [--small-pages] FILE [FILE ...]

e.g. /tmp/r3b.qora /tmp/r3b.gguf /tmp/r3b.q4_k_m.gguf /tmp/r3b.q8_0.gguf (bench/random_model.py,
bench/random_gguf.py). GB/s is the file's size over the time; "read" is the sequential read's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import qora
import qora.engine
import qora.loader
t1 = time.perf_counter()
spent = {}


def timed(name, fn):  # qora.load's own steps, timed where it calls them
    def run(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] = time.perf_counter() - t
    return run


qora.loader.open_model_file = timed("file", qora.loader.open_model_file)
qora.engine.make_engine = timed("engine", qora.engine.make_engine)
qora.load(sys.argv[1], threads=int(sys.argv[2]), device="cpu", precision="q8")
t2 = time.perf_counter()
load = t2 - t1
print(json.dumps({"import": t1 - t0, "file": spent["file"], "rest": load - spent["file"] - spent["engine"],
                  "engine": spent["engine"], "load": load}))
"""


def sequential_read(path: str, chunk: int = 8 << 20) -> float:
    """Seconds to read the whole file in chunk-sized reads into one buffer."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(view):
            pass
    return time.perf_counter() - t


# how the engine is built: interleaved copies on huge pages (the default), on 4 KiB pages, none
MODES = {"x8": {"QORA_REPACK": "1"}, "x8-4k": {"QORA_REPACK": "1", "QORA_NO_THP": "1"}, "off": {"QORA_REPACK": "0"}}


def one_load(path: str, threads: int, mode: str) -> dict:
    env = dict(os.environ, **MODES[mode])
    out = subprocess.run([sys.executable, "-c", CHILD, path, str(threads)], env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"load of {path} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-repack", action="store_true", help="also load with QORA_REPACK=0 (file layout)")
    p.add_argument("--small-pages", action="store_true", help="also load with QORA_NO_THP=1 (copies on 4 KiB pages)")
    a = p.parse_args(argv)
    threads = [int(t) for t in a.threads.split(",")]
    modes = ["x8"] + (["x8-4k"] if a.small_pages else []) + (["off"] if a.no_repack else [])
    variants = [(f, t, m) for f in a.files for t in threads for m in modes]
    samples: dict = {v: [] for v in variants}
    reads: dict = {f: [] for f in a.files}
    for rnd in range(a.rounds):
        for v in variants:
            reads[v[0]].append(sequential_read(v[0]))  # warms the cache for this load, and is the baseline
            samples[v].append(one_load(*v))
        print(f"round {rnd + 1}/{a.rounds} done", file=sys.stderr)
    print("| file | threads | copies | load s (median, min) | import s | file s | rest s | engine s | load GB/s | read GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for f, t, r in variants:
        s = samples[f, t, r]
        size = os.path.getsize(f) / 1e9
        med = {k: statistics.median(x[k] for x in s) for k in s[0]}
        best = min(x["load"] for x in s)
        read = statistics.median(reads[f])
        print(
            f"| {os.path.basename(f)} | {t} | {r} | {med['load']:.2f} ({best:.2f}) | {med['import']:.2f} "
            f"| {med['file']:.2f} | {med['rest']:.2f} | {med['engine']:.2f} | {size / med['load']:.2f} "
            f"| {size / read:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
