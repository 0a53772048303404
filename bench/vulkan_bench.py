"""Vulkan engine speed on the random SmolLM3-3B-shaped model: decode tok/s, prefill tok/s, achieved
weight bandwidth, and which GPU ran. A plain script (not part of the test suite):

    python bench/vulkan_bench.py                          # Q4 model made on first use, tg128 + pp512
    python bench/vulkan_bench.py --quant q4_k_m           # the same shape as llama-quantize's Q4_K_M mix
    python bench/vulkan_bench.py --model m.gguf           # any GGUF (e.g. llama-quantize's output) as it is
    python bench/vulkan_bench.py --model m.qora --tg 128 --pp 512 --reps 5 --json out.json
    python bench/vulkan_bench.py --sweep                  # also try decode workgroup shapes
    python bench/vulkan_bench.py --pp 0 --profile         # GPU time of each decode kernel (timestamps)
    python bench/vulkan_bench.py --depth 0,512,4096,8192  # pp and tg with that many tokens already cached
    python bench/vulkan_bench.py --try QORA_VK_GU_ROWS=8 --try QORA_VK_ATT_SHORT=128,QORA_VK_ATT_SPLITS=32
                                                          # also decode with these settings (same process)
    python bench/vulkan_bench.py --pp 0 --depth 0,4096 --try QORA_VK_ATT_KERNEL=2 --try-profile attention
                                                          # ... and each one's attention GPU time per depth
    QORA_VK_LOADER=/path/libvulkan.so.1 python bench/vulkan_bench.py --nvidia-icd

Measured as llama-bench does: tgN = N single-token steps, ppN = one N-token prompt with logits for
the last token only, from an empty cache or after --depth tokens (llama-bench -d); random token ids; a warm-up run
first (the driver compiles the shaders then), then timed repetitions, median and best reported.
Weight bandwidth = bytes of all weights (each read once per decoded token, the tied LM head
included) x decode tok/s. --nvidia-icd writes a loader manifest for NVIDIA's driver when the
machine has the driver library but no manifest (some containers), then points the loader at it.
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import random_model  # noqa: E402


def bench_dir() -> Path:
    d = os.environ.get("QORA_BENCH_DIR")
    return Path(d).expanduser() if d else Path.home() / ".cache" / "qora" / "bench"


def ensure_model(path: Path | None, quant: str, layers: int | None) -> Path:
    if path:
        return path
    name = f"smollm3-3b-random-{quant}" + (f"-{layers}l" if layers else "") + ".qora"
    out = bench_dir() / name
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing {out} (random SmolLM3-3B-shaped weights, once) ...", file=sys.stderr, flush=True)
        tmp = out.with_suffix(".tmp")
        random_model.write_random_model(tmp, quant, layers)
        tmp.replace(out)
    return out


def nvidia_icd() -> str | None:
    """A loader manifest for NVIDIA's Vulkan driver (libGLX_nvidia) if the machine lacks one."""
    for d in ("/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d", "/usr/local/share/vulkan/icd.d"):
        if Path(d, "nvidia_icd.json").exists():
            return None
    lib = ctypes.util.find_library("GLX_nvidia")
    if not lib:
        for cand in ("/usr/lib/x86_64-linux-gnu/libGLX_nvidia.so.0", "/usr/lib64/libGLX_nvidia.so.0"):
            if Path(cand).exists():
                lib = cand
    if not lib:
        return None
    f = Path(tempfile.gettempdir()) / "qora_nvidia_icd.json"
    f.write_text(json.dumps({"file_format_version": "1.0.0", "ICD": {"library_path": lib, "api_version": "1.3.0"}}))
    return str(f)


def stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "best": max(xs), "runs": xs}


def fill(engine, depth: int, vocab: int, rng):
    """depth random tokens into the KV cache (untimed), as llama-bench -d does."""
    if depth:
        engine.forward(rng.integers(0, vocab, depth).astype(np.int32), 0)


def run(engine, pp: int, tg: int, reps: int, vocab: int, rng, depth: int = 0) -> dict:
    """Timed pp and tg on a ready engine (caller warmed it up), after depth tokens already in the
    cache: tg = single-token steps from position depth, pp = one prompt at position depth."""
    out = {}
    fill(engine, depth, vocab, rng)
    if tg:
        rates = []
        for _ in range(reps):
            toks = rng.integers(0, vocab, tg).astype(np.int32)
            t0 = time.perf_counter()
            for i in range(tg):
                engine.forward(toks[i : i + 1], depth + i)
            rates.append(tg / (time.perf_counter() - t0))
        out["tg"] = stats(rates)
    if pp:
        rates = []
        for _ in range(reps):
            toks = rng.integers(0, vocab, pp).astype(np.int32)
            t0 = time.perf_counter()
            engine.forward(toks, depth)
            rates.append(pp / (time.perf_counter() - t0))
        out["pp"] = stats(rates)
    return out


def warm(engine, pp: int, vocab: int, rng):
    engine.forward(rng.integers(0, vocab, max(pp, 2)).astype(np.int32), 0)
    for i in range(16):
        engine.forward(np.array([i % vocab], np.int32), i)


def make_engine(qfile, context: int):
    from qora.engine import VulkanEngine

    return VulkanEngine(qfile, max_seq_len=context, required=True)


def profile_depth(qf, context: int, tg: int, vocab: int, rng, depth: int):
    """GPU time per decode kernel of tg steps after depth cached tokens, on a fresh engine (the profile
    averages all of an engine's decode steps): ({name: (ms, calls)}, ms per step)."""
    os.environ["QORA_VK_PROFILE"] = "1"
    try:
        e = make_engine(qf, context)
        run(e, 0, tg, 1, vocab, rng, depth)  # the prefill filling the cache is not profiled
        kernels, step_ms = e.profile()
        e.close()
    finally:
        os.environ.pop("QORA_VK_PROFILE")
    return kernels, step_ms


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a .qora or GGUF file (default: the random SmolLM3-3B-shaped model)")
    ap.add_argument(
        "--quant",
        default="q4",
        choices=random_model.QUANTS,
        help="quant of the random model (q4_k_m: each tensor in llama-quantize Q4_K_M's type for it)",
    )
    ap.add_argument("--layers", type=int, help="random model with fewer layers (quick runs)")
    ap.add_argument("--pp", type=int, default=512, help="prompt tokens (0: skip)")
    ap.add_argument("--tg", type=int, default=128, help="decoded tokens (0: skip)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--depth",
        default="0",
        help="tokens already in the KV cache before pp and tg, comma-separated (llama-bench -d): 0,512,4096",
    )
    ap.add_argument("--context", type=int, default=None, help="KV cache tokens (default: depth + pp + tg + 16)")
    ap.add_argument("--sweep", action="store_true", help="also time decode mat-vec workgroup shapes")
    ap.add_argument("--profile", action="store_true", help="also time each decode kernel with GPU timestamps")
    ap.add_argument(
        "--try",
        dest="tries",
        action="append",
        default=[],
        metavar="VAR=VAL[,VAR=VAL]",
        help="also time decode with these environment settings (repeatable)",
    )
    ap.add_argument(
        "--try-profile",
        metavar="KERNEL",
        help="also time this decode kernel (a profile label, e.g. attention) at each depth of each --try",
    )
    ap.add_argument("--nvidia-icd", action="store_true", help="write an NVIDIA loader manifest if missing")
    ap.add_argument("--json", type=Path, help="write the results here too")
    a = ap.parse_args(argv)

    if a.nvidia_icd and not os.environ.get("VK_ICD_FILENAMES"):
        icd = nvidia_icd()
        if icd:
            os.environ["VK_ICD_FILENAMES"] = icd
            print(f"using NVIDIA loader manifest {icd}", file=sys.stderr)
    from qora.engine import vulkan
    from qora.loader import open_model_file

    found = vulkan.devices()
    for d in found:
        print(
            f"vulkan device {d['index']}: {d['name']} ({d['type']}, Vulkan {d['api_version']}, "
            f"{d['vram_bytes'] / 1e9:.1f} GB, subgroup {d['subgroup_size']})"
            + ("" if d["usable"] else f" not usable: {d['why_not']}"),
            file=sys.stderr,
        )
    if not found:
        print("no Vulkan device (QORA_VK_LOADER points at a loader; --nvidia-icd helps in containers)", file=sys.stderr)
        return 1

    try:
        depths = [int(d) for d in a.depth.split(",") if d.strip()]
    except ValueError:
        ap.error(f"--depth {a.depth!r}: expected comma-separated token counts")
    if not depths or min(depths) < 0:
        ap.error("--depth: expected token counts >= 0")
    path = ensure_model(a.model, a.quant, a.layers)
    context = a.context or (max(depths) + max(a.pp, a.tg) + 16)
    rng = np.random.default_rng(0)
    results = {"model": str(path), "pp_tokens": a.pp, "tg_tokens": a.tg, "reps": a.reps, "context": context}
    results["depths"] = {}
    with open_model_file(path) as qf:
        weight_bytes = sum(i["nbytes"] for i in qf.tensor_info.values())
        vocab = qf.config["vocab_size"]
        t0 = time.perf_counter()
        eng = make_engine(qf, context)
        load_s = time.perf_counter() - t0
        info = eng.device_info
        results.update(device=info, weight_bytes=weight_bytes, vram_bytes=eng.vram_bytes, load_seconds=load_s)
        print(
            f"\nGPU: {info['name']} ({info['type']}, Vulkan {info['api_version']}, "
            f"driver {info.get('driver_version', '')})"
        )
        print(
            f"model: {path.name}, {weight_bytes / 1e9:.3f} GB of weights, {eng.vram_bytes / 1e9:.2f} GB on the device, "
            f"loaded in {load_s:.1f} s, KV {eng.kv_dtype}"
        )
        t0 = time.perf_counter()
        warm(eng, a.pp, vocab, rng)
        print(f"warm-up {time.perf_counter() - t0:.1f} s")
        for depth in depths:
            r = run(eng, a.pp, a.tg, a.reps, vocab, rng, depth)
            if depth == depths[0]:
                results.update(r)
            results["depths"][depth] = r
            at = f" @ d{depth}" if depth else ""
            if "tg" in r:
                tg = r["tg"]
                print(
                    f"decode  tg{a.tg}{at}: {tg['median']:8.1f} tok/s median, {tg['best']:8.1f} best   "
                    f"weights {weight_bytes * tg['median'] / 1e9:7.1f} GB/s median, "
                    f"{weight_bytes * tg['best'] / 1e9:7.1f} GB/s best   ({1000 / tg['median']:.3f} ms/token)"
                )
            if "pp" in r:
                pp = r["pp"]
                print(f"prefill pp{a.pp}{at}: {pp['median']:8.1f} tok/s median, {pp['best']:8.1f} best")
        eng.close()

        if a.profile and a.tg:
            results["profile"] = {}
            for depth in depths:
                kernels, step_ms = profile_depth(qf, context, a.tg, vocab, rng, depth)
                results["profile"][depth] = {"step_ms": step_ms, "kernels": kernels}
                print(f"\ndecode GPU time per token at depth {depth} (timestamps): {step_ms:.3f} ms")
                for name, (ms, calls) in sorted(kernels.items(), key=lambda kv: -kv[1][0]):
                    print(f"  {name:10s} {ms:7.3f} ms  {calls:5.0f} dispatches  {1000 * ms / calls:7.2f} us each")
        if a.profile and a.pp:
            os.environ["QORA_VK_PROFILE"] = "1"
            e = make_engine(qf, context)
            for _ in range(3):  # the average of all three (the first also warms the device's caches)
                e.forward(rng.integers(0, vocab, a.pp).astype(np.int32), 0)
            kernels, pp_ms = e.prefill_profile()
            e.close()
            os.environ.pop("QORA_VK_PROFILE")
            results["prefill_profile"] = {"ms": pp_ms, "kernels": kernels}
            print(f"\nprefill GPU time per {min(a.pp, 512)}-token submission (timestamps): {pp_ms:.3f} ms")
            for name, (ms, calls) in sorted(kernels.items(), key=lambda kv: -kv[1][0]):
                print(f"  {name:10s} {ms:7.3f} ms  {calls:5.0f} dispatches  {1000 * ms / calls:7.2f} us each")

        if a.sweep and a.tg:
            results["sweep"] = []
            print("\ndecode mat-vec shapes (QORA_VK_MV_THREADS x QORA_VK_MV_ROWS):")
            for threads in (32, 64, 128, 256):
                for rows in (2, 4, 8):
                    os.environ["QORA_VK_MV_THREADS"], os.environ["QORA_VK_MV_ROWS"] = str(threads), str(rows)
                    try:
                        e = make_engine(qf, a.tg + 16)
                        warm(e, 0, vocab, rng)
                        s = run(e, 0, a.tg, a.reps, vocab, rng)["tg"]
                        e.close()
                    except Exception as ex:  # a shape the device refuses: report and go on
                        print(f"  threads {threads:3d} rows {rows:2d}: failed ({ex})")
                        continue
                    results["sweep"].append({"threads": threads, "rows": rows, **s})
                    print(
                        f"  threads {threads:3d} rows {rows:2d}: {s['median']:8.1f} tok/s median, "
                        f"{s['best']:8.1f} best, {weight_bytes * s['median'] / 1e9:7.1f} GB/s"
                    )
            for k in ("QORA_VK_MV_THREADS", "QORA_VK_MV_ROWS"):
                os.environ.pop(k, None)

        if a.tries and a.tg:
            results["tries"] = []
            print("\ndecode with other settings:")
            for t in a.tries:
                env = dict(kv.split("=", 1) for kv in t.split(",") if kv)
                saved = {k: os.environ.get(k) for k in env}
                os.environ.update(env)
                try:
                    e = make_engine(qf, context)
                    warm(e, 0, vocab, rng)
                    for depth in depths:
                        s = run(e, 0, a.tg, a.reps, vocab, rng, depth)["tg"]
                        results["tries"].append({"env": env, "depth": depth, **s})
                        print(
                            f"  {t:40s} d{depth:<6d} {s['median']:8.1f} tok/s median, {s['best']:8.1f} best, "
                            f"{weight_bytes * s['median'] / 1e9:7.1f} GB/s"
                        )
                    e.close()
                    for depth in depths if a.try_profile else ():
                        kernels, step_ms = profile_depth(qf, context, a.tg, vocab, rng, depth)
                        ms, calls = kernels.get(a.try_profile, (0.0, 1))
                        results["tries"].append(
                            {"env": env, "depth": depth, "profile": {"step_ms": step_ms, "kernels": kernels}}
                        )
                        print(
                            f"  {t:40s} d{depth:<6d} GPU {step_ms:7.3f} ms/token, {a.try_profile} "
                            f"{1000 * ms / calls:7.2f} us each ({ms:6.3f} ms/token)"
                        )
                except Exception as ex:  # a setting the device refuses: report and go on
                    print(f"  {t:40s} failed ({ex})")
                finally:
                    for k, v in saved.items():
                        if v is None:
                            os.environ.pop(k, None)
                        else:
                            os.environ[k] = v
    if a.json:
        a.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
