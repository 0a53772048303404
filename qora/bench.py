"""`qora bench`: how fast a model runs on this machine, measured as llama.cpp's llama-bench measures.

    qora bench [--load M] [--pp 512] [--tg 128] [--depth 0] [--threads N] [--reps 3] [--cpu | --gpu] [--json]

Design: ppN = one N-token prompt from an empty cache, logits for the last token only (prefill);
tgN = N single-token steps from an empty cache (decode); with --depth D (llama-bench's -d D) both
start after D tokens already in the KV cache, filled once, untimed; random token ids from a fixed seed; one
warm-up run of each test, then `reps` timed runs, reported as mean ± standard deviation of tok/s.
Decode is bound by memory bandwidth, so it is also given as weight GB/s: the bytes of weights read
per token (every matrix once, the LM head included, the embedding lookup not) times tok/s. The
engine is driven directly (not through Model.forward), so prefill computes the LM head for the last
token only, as a generation does. bench/ (the suite against llama.cpp) measures with this module too.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from qora.errors import QoraError

SEED = 0  # random token ids: the same prompts on every run and machine
WARMUP = 1  # untimed runs of each test before the timed ones


# ───── model facts ─────


def model_sizes(qfile) -> tuple[int, int]:
    """(bytes of weights read per decoded token, weights of the matrices applied to each token) of an
    open .qora file or a path: every tensor once, the LM head included; an untied embedding is only
    looked up (one row per token), so it counts in neither."""
    if not hasattr(qfile, "tensor_info"):
        from qora.loader import open_model_file

        with open_model_file(qfile, check_values=False) as q:
            return model_sizes(q)
    info = dict(qfile.tensor_info)
    if "output" in info:
        info.pop("tok_embeddings", None)
    size = sum(int(i["nbytes"]) for i in info.values())
    params = sum(math.prod(i["shape"]) for i in info.values() if len(i["shape"]) == 2)
    return size, params


def parameter_count(qfile) -> int:
    """All weights of the model (the embedding once, even when the LM head shares it)."""
    return sum(math.prod(i["shape"]) for i in qfile.tensor_info.values())


# ───── measurements ─────


@dataclass
class Result:
    engine: str  # "qora", "llama.cpp", ...
    test: str  # "pp512", "tg128", ...
    threads: int
    samples: list = field(default_factory=list)  # tok/s of each timed repetition
    detail: str = ""
    depth: int = 0  # tokens already in the KV cache (llama-bench -d)

    @property
    def label(self) -> str:
        return self.test + (f" @ d{self.depth}" if self.depth else "")

    @property
    def n_tokens(self) -> int:
        return int("".join(c for c in self.test if c.isdigit()))

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def best(self) -> float:
        return max(self.samples)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples)

    @property
    def std(self) -> float:
        return statistics.stdev(self.samples) if len(self.samples) > 1 else 0.0


class Runner:
    """Prefill and decode of one engine (CpuEngine or VulkanEngine), timed as llama-bench times them."""

    def __init__(self, engine, seed: int = SEED, depth: int = 0):
        self.engine = engine
        self.depth = depth  # tokens already in the KV cache before each test
        self.threads = engine.n_threads
        self.isa = engine.isa
        self.vocab = engine.vocab_size
        self.rng = np.random.default_rng(seed)

    def token_ids(self, n: int) -> np.ndarray:
        return self.rng.integers(0, self.vocab, size=n)

    def fill(self, chunk: int = 512) -> None:
        """Put `depth` random tokens into the KV cache (untimed). Each test then writes only positions
        past them, so one fill serves every repetition."""
        for pos in range(0, self.depth, chunk):
            self.engine.forward(self.token_ids(min(chunk, self.depth - pos)), pos, all_logits=False)

    def prefill(self, ids) -> np.ndarray:
        """One prompt after `depth` cached tokens; logits of its last token only."""
        return self.engine.forward(ids, self.depth, all_logits=False)

    def decode(self, ids) -> np.ndarray:
        """len(ids) single-token steps after `depth` cached tokens; the last step's logits."""
        fwd = self.engine.forward
        for pos, t in enumerate(ids.tolist(), start=self.depth):
            logits = fwd([t], pos)
        return logits

    def generate(self, ids) -> np.ndarray:
        """len(ids) single-token steps as a generation runs them: from the first id on, the default
        Sampler (seeded) chooses each next token from the step's logits, through the engine's
        on-device sampling where it has one (qora.generate.engine_step); the last step's logits."""
        from qora.generate import engine_step
        from qora.sampling import Sampler

        sampler = Sampler(seed=SEED)
        history, t = [], int(ids[0])
        for pos in range(self.depth, self.depth + len(ids)):
            logits = engine_step(self.engine, t, pos)
            history.append(t)
            t = sampler(logits, history)
        return np.asarray(logits)

    def target(self, test: str):
        """(function of the token ids, number of tokens) for a test name like pp512, tg128 or gen128."""
        if test.startswith("gen"):
            return self.generate, int(test[3:])
        return (self.prefill if test.startswith("pp") else self.decode), int(test[2:])

    def run(self, test: str, reps: int, warmup: int = WARMUP, log=None) -> Result:
        fn, n = self.target(test)
        samples = []
        for i in range(warmup + reps):
            if log and i == 0:
                log(f"{test}: {warmup} warm-up + {reps} timed runs ...")
            ids = self.token_ids(n)
            t0 = time.perf_counter()
            logits = fn(ids)
            dt = time.perf_counter() - t0
            if not np.isfinite(logits).all():
                raise QoraError(f"the engine produced non-finite logits in {test}")
            if i >= warmup:
                samples.append(n / dt)
        detail = f"qora {self.isa}" + (f" @ depth {self.depth}" if self.depth else "")
        return Result("qora", test, self.threads, samples, detail, self.depth)


def read_bandwidth(threads: int, gib: float = 2.0, reps: int = 5) -> float:
    """A STREAM-like read (include/qora/bandwidth.h): GB/s of `threads` OpenMP threads each reading its
    share of a buffer far larger than the last-level cache with wide loads, as decode reads weights.
    Best of reps. Decode reads every weight once per token, so this is its ceiling on this machine."""
    from qora._core import _cpu
    from qora.system import available_ram

    n = int(min(gib * 2**30, max(available_ram() // 4, 256 << 20)))  # never a large share of free RAM
    try:
        return _cpu.read_bandwidth(threads, n, reps)
    except MemoryError as e:
        raise QoraError(f"the bandwidth probe: {e}") from e


# ───── the report ─────


def run_bench(
    model, pp: int, tg: int, reps: int, log=None, depth: int = 0, bandwidth: bool = False, sampled: bool = True
) -> dict:
    """Measure ppN and tgN (0 skips one) on a loaded qora.Model, each after `depth` tokens already in
    the KV cache; with `sampled`, also genN: tgN with the default sampler choosing every token (the
    speed a generation sees); with `bandwidth`, also the machine's read bandwidth at the same thread
    count and decode's weight GB/s as a share of it. The report as a JSON-ready dict."""
    engine = model.engine
    runner = Runner(engine, depth=depth)
    weight_bytes, matmul_params = model_sizes(model.file)
    if depth:
        if log:
            log(f"filling the KV cache with {depth} tokens ...")
        runner.fill()
    results = {}
    for test, n in (("pp", pp), ("tg", tg), ("gen", tg if sampled else 0)):
        if n > 0:
            results[test] = runner.run(f"{test}{n}", reps, log=log)
    # read after the runs: a GPU engine that failed mid-run goes on on the CPU and says so in device / isa
    on_gpu = engine.device == "vulkan"
    cfg = model.config
    from qora import __version__

    report = {
        "qora": __version__,
        "model": model.path.name,
        "architecture": cfg.get("architecture"),
        "n_layers": cfg.get("n_layers"),
        "dim": cfg.get("dim"),
        "weight_type": model.file.tensor_info.get("layers.0.wq", {}).get("dtype"),
        "params": parameter_count(model.file),
        "file_bytes": model.path.stat().st_size,
        "weight_bytes_per_token": weight_bytes,
        "device": "vulkan" if on_gpu else "cpu",
        "device_name": engine.device_name if on_gpu else None,
        "isa": engine.isa,
        "gpu_matmul": getattr(engine, "matmul", None) if on_gpu else None,
        "threads": runner.threads,
        "kv_cache": engine.kv_dtype,
        "pp": pp,
        "tg": tg,
        "depth": depth,
        "reps": reps,
        "warmup": WARMUP,
        "seed": SEED,
        "pp_tok_s": None,
        "pp_std": None,
        "pp_samples": [],
        "pp_gop_s": None,
        "tg_tok_s": None,
        "tg_std": None,
        "tg_samples": [],
        "gen_tok_s": None,
        "gen_std": None,
        "gen_samples": [],
        "gen_pct_of_tg": None,
        "gb_s": None,
        "read_gb_s": None,
        "tg_bandwidth_pct": None,
    }
    if "pp" in results:
        r = results["pp"]
        report.update(pp_tok_s=r.mean, pp_std=r.std, pp_samples=r.samples)
        report["pp_gop_s"] = 2 * matmul_params * r.mean / 1e9  # a multiply and an add per weight per token
    if "tg" in results:
        r = results["tg"]
        report.update(tg_tok_s=r.mean, tg_std=r.std, tg_samples=r.samples)
        report["gb_s"] = weight_bytes * r.mean / 1e9
    if "gen" in results:
        r = results["gen"]
        report.update(gen_tok_s=r.mean, gen_std=r.std, gen_samples=r.samples)
        report["gen_pct_of_tg"] = 100 * r.mean / report["tg_tok_s"]
    if bandwidth:
        if log:
            log(f"read bandwidth, {runner.threads} threads ...")
        report["read_gb_s"] = read_bandwidth(runner.threads)
        if report["gb_s"] is not None and not on_gpu:
            report["tg_bandwidth_pct"] = 100 * report["gb_s"] / report["read_gb_s"]
    return report


def _params_text(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _size_text(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f} MiB"


def format_report(report: dict) -> str:
    """llama-bench's markdown table, with the weight bandwidth of decode in a last column."""
    name = report["model"].removesuffix(".qora")
    size = _size_text(report["file_bytes"])
    if report["device"] == "vulkan":
        backend = f"Vulkan ({report['device_name']}, {report.get('gpu_matmul') or 'fp32'} prefill)"
    else:
        backend = f"CPU ({report['isa']})"
    head = ["model", "size", "params", "backend", "threads", "test", "t/s", "weights GB/s"]
    at = f" @ d{report['depth']}" if report.get("depth") else ""  # llama-bench's label for -d
    rows = []
    for test in ("pp", "tg", "gen"):
        if report.get(f"{test}_tok_s") is None:
            continue
        rate = f"{report['gb_s']:.2f}" if test == "tg" else "-"
        tps = f"{report[f'{test}_tok_s']:.2f} ± {report[f'{test}_std']:.2f}"
        rows.append([name, size, _params_text(report["params"]), backend, str(report["threads"]),
                     f"{test}{report['tg' if test == 'gen' else test]}{at}", tps, rate])  # fmt: skip
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    right = [h in ("size", "params", "threads", "t/s", "weights GB/s") for h in head]  # numbers: right-aligned

    def line(cells):
        cells = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)]
        return "| " + " | ".join(cells) + " |"

    sep = "|" + "|".join("-" * (w + 1) + (":" if r else "-") for w, r in zip(widths, right, strict=True)) + "|"
    about = (
        f"{report['architecture']}, {report['n_layers']} layers, dim {report['dim']}, {report['weight_type']} weights; "
        f"{_size_text(report['weight_bytes_per_token'])} of weights read per decoded token"
    )
    notes = [
        "",
        f"model: {report['model']} ({about})",
        f"t/s: mean ± std of {report['reps']} runs after {report['warmup']} warm-up, random token ids "
        f"(seed {report['seed']}); weights GB/s = bytes read per token x decode t/s; qora {report['qora']}",
    ]
    if report.get("gen_tok_s") is not None:
        notes.append(
            f"gen{report['tg']}: tg{report['tg']} with the default sampler choosing every token (temperature, "
            f"top-k, top-p, penalties): {report['gen_pct_of_tg']:.0f}% of the raw decode speed"
        )
    if report.get("read_gb_s"):
        bw = f"memory read bandwidth, {report['threads']} threads: {report['read_gb_s']:.1f} GB/s"
        if report.get("tg_bandwidth_pct") is not None:
            limit = report["read_gb_s"] * 1e9 / report["weight_bytes_per_token"]
            bw += f"; decode reads weights at {report['tg_bandwidth_pct']:.0f}% of it (limit {limit:.1f} t/s)"
        notes.append(bw)
    return "\n".join([line(head), sep, *map(line, rows), *notes])


# ───── command line ─────


def build_parser() -> argparse.ArgumentParser:
    from qora.cli import PROG, add_context_args, int_at_least

    p = argparse.ArgumentParser(
        prog=f"{PROG} bench",
        description="Measure prefill (ppN) and decode (tgN) speed of a model on this machine, as llama-bench does.",
        epilog="Example: qora bench --load smollm3-3b-q4.qora --pp 512 --tg 128 --threads 4",
    )
    p.add_argument("--load", metavar="PATH", help="a GGUF or .qora model (default: ./model.qora, else the demo model)")
    p.add_argument("--pp", type=int_at_least(0), default=512, metavar="N", help="prompt tokens (default 512; 0 skips)")
    p.add_argument("--tg", type=int_at_least(0), default=128, metavar="N", help="tokens decoded (default 128; 0 skips)")
    p.add_argument(
        "--depth", type=int_at_least(0), default=0, metavar="N",
        help="tokens already in the KV cache before each test, as llama-bench -d (default 0)",
    )  # fmt: skip
    p.add_argument("--reps", type=int_at_least(1), default=3, metavar="N", help="timed runs per test (default 3)")
    add_context_args(p)
    p.add_argument(
        "--threads", type=int_at_least(1), metavar="N", help="CPU threads (default: QORA_THREADS, else physical cores)"
    )
    dev = p.add_mutually_exclusive_group()
    dev.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is usable")
    dev.add_argument("--gpu", action="store_true", help="run on the GPU (Vulkan)")
    p.add_argument(
        "--bandwidth", action="store_true",
        help="also measure the memory read bandwidth (a STREAM-like scan at the same thread count) and "
        "give decode's weight GB/s as a share of it",
    )  # fmt: skip
    p.add_argument(
        "--sampled", action=argparse.BooleanOptionalAction, default=True,
        help="also time genN: tgN with the default sampler choosing every token, the speed a generation "
        "sees (default on)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")
    return p


def main(argv: list[str]) -> int:
    from qora.cli import PROG, device_choice
    from qora.engine.base import with_rope_scaling
    from qora.loader import load_model, open_model_file, resolve_model_path

    args = build_parser().parse_args(argv)
    if args.pp == 0 and args.tg == 0:
        raise QoraError("nothing to measure: --pp and --tg are both 0")
    path = resolve_model_path(args.load)
    # the header only: check the lengths before loading the weights
    with open_model_file(path, check_values=False) as q:
        max_pos = int(with_rope_scaling(q.config, args.rope_scaling)["max_seq_len"])
    need = args.depth + args.pp + args.tg
    if need > max_pos:
        raise QoraError(
            f"--depth {args.depth} + --pp {args.pp} + --tg {args.tg} = {need} tokens exceed the model's "
            f"{max_pos}-token context"
        )

    def log(msg):
        if not args.quiet:
            print(f"{PROG}: {msg}", file=sys.stderr, flush=True)

    device = device_choice(args)
    log(f"loading {path} ...")
    # the KV cache holds depth + pp + tg tokens, as llama-bench sizes its context
    with load_model(
        path, device, args.threads, context=need, rope_scaling=args.rope_scaling, kv_type=args.kv_type,
        precision=args.precision,
    ) as model:
        report = run_bench(
            model, args.pp, args.tg, args.reps, log=log, depth=args.depth, bandwidth=args.bandwidth,
            sampled=args.sampled,
        )  # fmt: skip
    print(json.dumps(report) if args.json else format_report(report), flush=True)
    return 0
