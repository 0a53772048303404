"""The aarch64 paths (NEON, dotprod, i8mm) tested on this x86 machine: tests/arm/harness.c, the engine's
own headers cross-compiled with Debian's gcc-aarch64-linux-gnu, runs under qemu-aarch64 (qemu-user) on
inputs written here, and every output must equal the x86 build's bit for bit (the paths' common order of
float operations, include/qora/common.h) and the NumPy references within the x86 tests' bounds.

Each path runs under the smallest qemu CPU model that has its features (scalar and NEON on a Cortex-A53,
dotprod on a Neoverse N1, i8mm on `max`), so an instruction past its level would kill the run with
SIGILL; feature detection (getauxval's HWCAPs) is checked on each model. Covered: every weight type's
products (random blocks, ragged rows and token counts, real SmolLM2-135M / SmolLM3-3B shapes, Q4
repacked and in file order, 8-bit and float activations, 1 and 2 OpenMP threads), swiglu, the Q8
quantizer, RMSNorm, softmax, f16 conversion, attention over the f16 and Q8_0 caches (one and several
256-position chunks), and whole forward passes of tiny models (prefill then decode) against the x86
engine's logits. The tests that run the harness skip where the cross compiler or qemu-aarch64 is missing
(.ci/run installs both); resolve_isa's aarch64 list is tested without them."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_kernels import ref_quantize_q8
from test_quants_native import effective_inputs, random_blocks, reference_values

from qora._core import _cpu
from qora.dtypes import QK, QK_K, WEIGHT_TYPES
from qora.engine.base import rope_parameters
from qora.engine.cpu import ISA_NAMES, ISA_NAMES_BY_ARCH, CpuEngine
from qora.format import read_qora

# the cross compiler, with its arguments (e.g. QORA_ARM_CC="clang-16 --target=aarch64-linux-gnu")
CC = shlex.split(os.environ.get("QORA_ARM_CC", "aarch64-linux-gnu-gcc"))
QEMU = os.environ.get("QORA_ARM_QEMU", "qemu-aarch64")
ROOT = Path(__file__).resolve().parent.parent

ARM_ISAS = ISA_NAMES_BY_ARCH["aarch64"]
# the least qemu CPU model with each path's features
LEVEL = {"scalar": "cortex-a53", "neon": "cortex-a53", "dotprod": "neoverse-n1", "i8mm": "max"}
DETECTED = {
    "cortex-a53": ["scalar", "neon"],
    "cortex-a76": ["scalar", "neon", "dotprod"],
    "neoverse-n1": ["scalar", "neon", "dotprod"],
    "max": ["scalar", "neon", "dotprod", "i8mm"],
}
X86_SCALAR = ISA_NAMES.index("scalar")


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """The harness cross-compiled with setup.py's flags (static: qemu needs no aarch64 sysroot); every
    test that runs it skips where the cross compiler or qemu-aarch64 is missing."""
    if shutil.which(CC[0]) is None or shutil.which(QEMU) is None:
        pytest.skip(f"needs {CC[0]} and {QEMU} (Debian: apt install gcc-aarch64-linux-gnu qemu-user)")
    out = tmp_path_factory.mktemp("arm-build") / "harness"
    omp = [] if "clang" in Path(CC[0]).name else ["-fopenmp"]  # (QORA_ARM_CC=clang-16: no aarch64 libomp here)
    cmd = [
        *CC,
        "-O3",
        "-fno-strict-aliasing",
        "-Wno-unused-function",
        "-ffp-contract=off",
        *omp,
        "-static",
        "-I",
        str(ROOT / "include"),
        str(ROOT / "tests" / "arm" / "harness.c"),
        "-o",
        str(out),
        "-lm",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


class Cases:
    """Input files and case lines for one harness run, with what each case must give."""

    def __init__(self, folder: Path):
        self.dir = folder
        self.lines: list[str] = []
        self.expect: list[tuple[str, np.ndarray, bool, object]] = []  # (name, want, bit for bit, check or None)

    def file(self, name, ext, arr):
        np.ascontiguousarray(arr).tofile(self.dir / f"{name}.{ext}")

    def add(self, line, name, want, check=None, exact=True):
        """want: the x86 build's output (exact: bit for bit), or only its dtype and shape; check(got, isa):
        the NumPy reference's bound."""
        self.lines.append(line)
        self.expect.append((name, np.ascontiguousarray(want), exact, check))

    def run(self, harness, isa, cpu=None):
        (self.dir / "cases.txt").write_text("\n".join(self.lines) + "\n")
        cmd = [QEMU, "-cpu", cpu or LEVEL[isa], str(harness), isa, str(self.dir), "cases.txt"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"{isa}: rc {r.returncode}: {r.stderr[-2000:]}"

    def output(self, name, isa, like):
        return np.fromfile(self.dir / f"{name}.{isa}.out", dtype=like.dtype).reshape(like.shape)

    def check(self, isa):
        for name, want, exact, check in self.expect:
            got = self.output(name, isa, want)
            if exact:
                np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8), err_msg=f"{isa} {name}")
            if check is not None:
                check(got, isa)


def within(ref, scale, bound):
    def check(got, isa):
        err = np.abs(got.astype(np.float64) - ref) / scale
        assert err.max() < bound, (isa, err.max())

    return check


def test_feature_detection_on_each_cpu_model(harness):
    for cpu, paths in DETECTED.items():
        r = subprocess.run([QEMU, "-cpu", cpu, str(harness), "--features"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == paths, cpu


def test_kernel_tables_follow_the_python_names(harness):
    """The aarch64 enum and tables in ISA_NAMES_BY_ARCH["aarch64"]'s order (what the compiled core of an
    aarch64 machine reads as ISA_NAMES; tests/test_engine_protocol.py checks the running build's)."""
    r = subprocess.run([QEMU, "-cpu", "max", str(harness), "--tables"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    count, *rows = r.stdout.splitlines()
    assert int(count) == len(ARM_ISAS)
    assert [row.split() for row in rows] == [[str(i), name, str(i)] for i, name in enumerate(ARM_ISAS)]


def test_resolve_isa_on_an_aarch64_build(monkeypatch):
    """The Python side of an aarch64 build (no ARM interpreter here): the best path the CPU and the build
    have, a forced one, one the CPU lacks, one the build left out (clang before 16: i8mm), and x86 names."""
    from qora.engine import cpu as eng
    from qora.errors import QoraError

    feats = {"cpu_supports": ["scalar", "neon", "dotprod", "i8mm"], "compiled": ["scalar", "neon", "dotprod"]}
    monkeypatch.setattr(eng, "ISA_NAMES", ARM_ISAS)
    monkeypatch.setattr(eng, "MACHINE", "aarch64")
    monkeypatch.setattr(eng, "_core", lambda: type("Core", (), {"cpu_features": staticmethod(lambda: feats)}))
    monkeypatch.delenv("QORA_ISA", raising=False)
    assert eng.resolve_isa() == (2, "best available")
    assert eng.resolve_isa("neon") == (1, "forced by QORA_ISA=neon")
    assert eng.resolve_isa("i8mm") == (2, "QORA_ISA=i8mm: not compiled into this build, using dotprod")
    with pytest.raises(QoraError, match="QORA_ISA=avx2 is an x86_64 path; this aarch64 build runs scalar, neon"):
        eng.resolve_isa("avx2")
    feats["cpu_supports"] = ["scalar", "neon"]  # a Cortex-A53 / A72
    assert eng.resolve_isa() == (1, "best available")
    with pytest.raises(QoraError, match="does not support dotprod"):
        eng.resolve_isa("dotprod")


# (rows, cols) per block size: ragged rows (tiles of 4, interleaved groups of 8 and their leftovers), block
# counts that do not split into the four segments evenly, and real shapes (SmolLM2-135M: 576 / 1536;
# SmolLM3-3B: 2048)
SHAPES = {
    QK: [(1, 32), (3, 96), (13, 160), (33, 288), (576, 576), (64, 1536)],
    QK_K: [(1, 256), (5, 512), (13, 768), (20, 2304), (64, 2048)],
    1: [(1, 7), (5, 33), (13, 100), (64, 576)],
}
TOKENS = (1, 2, 5, 17)  # decode, an even and odd count (i8mm's token pairs), whole 4-token tiles plus a ragged one


def product_cases(c: Cases, rng):
    k = 0
    for dtype, t in WEIGHT_TYPES.items():
        block = t.block if t.quantized else 1
        for rows, cols in SHAPES[block]:
            for nt in TOKENS:
                if rows * cols * nt > 600_000 and nt > 5:
                    continue  # the big shapes at decode and a short prefill only (qemu runs the scalar path too)
                for act_f32 in (0, 1) if t.quantized else (0,):
                    for repack in (0, 1) if dtype == "q4" and not act_f32 else (0,):
                        name = f"p{k}"
                        k += 1
                        raw = random_blocks(rng, dtype, rows, cols)
                        x = rng.standard_normal((nt, cols)).astype(np.float32)
                        threads = 2 if k % 3 == 0 else 1
                        c.file(name, "w", raw)
                        c.file(name, "x", x)
                        want = _cpu.matmul(raw, dtype, rows, cols, x, X86_SCALAR, 1, bool(repack), bool(act_f32))
                        w = reference_values(raw, dtype, rows, cols).astype(np.float64)
                        xe = x.astype(np.float64) if act_f32 or not t.quantized else effective_inputs(dtype, x)
                        scale = np.abs(xe) @ np.abs(w).T + 1e-6
                        c.add(
                            f"matmul {name} {dtype} {rows} {cols} {nt} {repack} {act_f32} {threads}",
                            name,
                            want,
                            within(xe @ w.T, scale, 1e-5),
                        )
    for dtype, rows, cols, nt, repack in [
        ("q4", 37, 576, 5, 1),
        ("q4", 1536, 576, 1, 1),
        ("q4_k", 37, 512, 5, 0),
        ("q6_k", 16, 256, 3, 0),
        ("q8", 9, 64, 4, 0),
    ]:
        name = f"s{k}"
        k += 1
        gw, uw = random_blocks(rng, dtype, rows, cols), random_blocks(rng, dtype, rows, cols)
        x = rng.standard_normal((nt, cols)).astype(np.float32)
        c.file(name, "wg", gw)
        c.file(name, "wu", uw)
        c.file(name, "x", x)
        g, u = _cpu.Matrix(gw, dtype, rows, cols, bool(repack)), _cpu.Matrix(uw, dtype, rows, cols, bool(repack))
        c.add(f"swiglu {name} {dtype} {rows} {cols} {nt} {repack} 0 2", name, _cpu.swiglu_prepared(g, u, x, X86_SCALAR))


def small_kernel_cases(c: Cases, rng):
    for n in (32, 96, 576, 2048):
        x = rng.standard_normal(n).astype(np.float32) * 3
        x[:32] = 0.0  # an all-zero block
        name = f"q{n}"
        c.file(name, "x", x)
        want = _cpu.quantize_q8(x, X86_SCALAR)
        rd, rq = ref_quantize_q8(x)

        def q8_check(got, isa, rd=rd, rq=rq):
            b = got.reshape(-1, 34)
            np.testing.assert_array_equal(b[:, :2].copy().view(np.float16).reshape(-1), rd)
            assert np.abs(b[:, 2:].view(np.int8).astype(int) - rq.astype(int)).max() <= 1

        c.add(f"quantize {name} {n}", name, want, q8_check)
    for n in (1, 7, 33, 576, 2049):
        x, w = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
        name = f"r{n}"
        c.file(name, "x", x)
        c.file(name, "w", w)
        x64 = x.astype(np.float64)
        ref = w * x64 / np.sqrt((x64 * x64).mean() + 1e-5)
        c.add(
            f"rmsnorm {name} {n} 1e-5",
            name,
            _cpu.rmsnorm(x, w, np.float32(1e-5), X86_SCALAR),
            within(ref, np.abs(ref).max(), 1e-5),
        )
    for n in (1, 15, 16, 33, 300):
        x = (rng.standard_normal(n) * 4).astype(np.float32)
        name = f"m{n}"
        c.file(name, "x", x)
        e = np.exp(x.astype(np.float64) - x.max())
        ref = np.concatenate([e, [x.max(), e.sum()]]).astype(np.float32)

        def softmax_check(got, isa, name=name, ref=ref):
            """bit for bit the scalar path's (the x86 build's C: there is no Python wrapper), close to NumPy"""
            base = c.output(name, "scalar", ref)
            np.testing.assert_array_equal(got.view(np.uint32), base.view(np.uint32), err_msg=f"{isa} {name}")
            np.testing.assert_allclose(got, ref, rtol=2e-6, err_msg=name)

        c.add(f"softmax {name} {n}", name, ref, softmax_check, exact=False)
    for n in (3, 64, 131):
        x = (rng.standard_normal(n) * 1000).astype(np.float32)
        x[0], x[1] = 7e4, 3e-6  # past f16's range; an f16 subnormal
        name = f"h{n}"
        c.file(name, "x", x)
        with np.errstate(over="ignore"):  # 7e4 becomes inf, as it must
            c.add(f"tof16 {name} {n}", name, x.astype(np.float16))  # round to nearest even, bit for bit
    attention = [(4, 2, 64, 40, 1), (6, 2, 64, 300, 1), (4, 1, 128, 530, 5), (3, 3, 32, 17, 17), (5, 1, 16, 20, 2)]
    for kv in ("f16", "q8"):
        for nh, nkv, hd, n_pos, nq in attention if kv == "f16" else attention[:4]:
            name = f"a{kv}_{nh}_{hd}_{n_pos}_{nq}"
            q = rng.standard_normal(nq * nh * hd).astype(np.float32)
            k, v = (rng.standard_normal((n_pos, nkv * hd)).astype(np.float32) for _ in range(2))
            if kv == "f16":
                k, v = k.astype(np.float16), v.astype(np.float16)
                kf, vf = k, v
            else:  # Q8_0 rows as the engine writes them (the activation quantizer)
                k, v = (np.stack([_cpu.quantize_q8(row, X86_SCALAR) for row in a]) for a in (k, v))
                kf, vf = (np.stack([q8_values(row) for row in a]) for a in (k, v))
            for ext, arr in (("q", q), ("k", k), ("v", v)):
                c.file(name, ext, arr)
            want = _cpu.attention(q, k, v, nh, nkv, hd, X86_SCALAR, 1, kv, nq)
            ref = attention_reference(q, kf, vf, nh, nkv, hd, nq)
            c.add(
                f"attention {name} {nh} {nkv} {hd} {n_pos} {nq} 2 {kv}",
                name,
                want,
                within(ref, np.abs(ref).max(), 1e-5),
            )


def q8_values(raw):
    """A row of Q8_0 blocks (uint8) as its float values."""
    b = raw.reshape(-1, 34)
    return (b[:, 2:].view(np.int8) * b[:, :2].copy().view(np.float16).astype(np.float32)).reshape(-1)


def attention_reference(q, k, v, nh, nkv, hd, nq):
    n_pos = k.shape[0]
    q = q.reshape(nq, nh, hd).astype(np.float64)
    k = k.astype(np.float64).reshape(n_pos, nkv, hd)
    v = v.astype(np.float64).reshape(n_pos, nkv, hd)
    out = np.zeros((nq, nh, hd))
    for t in range(nq):
        last = n_pos - nq + t
        for h in range(nh):
            g = h // (nh // nkv)
            s = k[: last + 1, g] @ q[t, h] / np.sqrt(hd)
            p = np.exp(s - s.max())
            out[t, h] = p @ v[: last + 1, g] / p.sum()
    return out.reshape(-1)


@pytest.fixture(scope="module")
def kernel_runs(harness, tmp_path_factory):
    """Every kernel case on every aarch64 path, each under its own CPU level (one qemu run per path)."""
    c = Cases(tmp_path_factory.mktemp("arm-kernels"))
    rng = np.random.default_rng()  # fresh inputs every run
    product_cases(c, rng)
    small_kernel_cases(c, rng)
    for isa in ARM_ISAS:
        c.run(harness, isa)
    return c


@pytest.mark.parametrize("isa", ARM_ISAS)
def test_kernels_equal_the_x86_build_and_numpy(kernel_runs, isa):
    kernel_runs.check(isa)


# ------------------------------------------------------------------ whole models

PREFILL, N_TOKENS = 20, 26  # prefill of 20 tokens (ragged 16-token chunks), then 6 decode steps


def dump_model(c: Cases, name, path, precision, kv_type, repack=1):
    """The model as CpuModel gets it, in the harness's files; returns the x86 engine's logits (scalar path:
    every x86 path gives the same bits, tests/test_path_agreement.py)."""
    with read_qora(path) as qf:
        cfg = qf.config
        e = CpuEngine(qf, n_threads=1, max_seq_len=64, isa="scalar", precision=precision, kv_type=kv_type)
        try:
            tokens = np.random.default_rng(3).integers(0, cfg["vocab_size"], N_TOKENS).astype(np.int32)
            rows = [e.forward(tokens[:PREFILL].tolist(), 0, all_logits=True)]
            rows += [e.forward([int(t)], p) for p, t in enumerate(tokens[PREFILL:], PREFILL)]
            want = np.concatenate(rows).astype(np.float32)
            kv, ctx = WEIGHT_TYPES[e.kv_dtype].c_id, e.max_seq_len
        finally:
            e.close()
        inv_freq, rope_scale = rope_parameters(cfg)
        tied = int("output" not in qf.tensor_info)
        nums = [cfg[k] for k in ("n_layers", "dim", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size")]
        f32 = [float(np.float32(v)).hex() for v in (cfg["norm_eps"], rope_scale)]  # exact through fscanf
        head = [*nums, ctx, *f32, kv, int(precision == "f32"), repack, N_TOKENS, PREFILL, tied]
        (c.dir / f"{name}.cfg").write_text(
            " ".join(map(str, head)) + "\n" + " ".join(str(int(bool(r))) for r in cfg["rope_layers"]) + "\n"
        )
        index = []
        for tname, info in qf.tensor_info.items():
            shape = tuple(info["shape"])
            c.file(name, tname, np.asarray(qf.tensor(tname)))
            index.append(f"{tname} {info['dtype']} {shape[0]} {shape[1] if len(shape) > 1 else 1}")
        (c.dir / f"{name}.tensors").write_text("\n".join(index) + "\n")
        c.file(name, "inv_freq", np.asarray(inv_freq, dtype=np.float32))
        c.file(name, "tokens", tokens)
    return want


def wide_head_model(folder: Path) -> Path:
    """A tiny checkpoint with 64-wide heads (the fixtures' are 16: attention's NEON kernel has no plan for
    them), converted to q4."""
    from _helpers_convert import make_hf_model

    from qora.convert import convert

    make_hf_model(folder / "hf", dim=128, n_heads=4, n_kv_heads=2, head_dim=64, hidden_dim=192, seed=4)
    return convert(folder / "hf", folder / "wide-q4.qora", quant="q4", progress=False)


@pytest.fixture(scope="module")
def model_cases(tiny_model, tmp_path_factory):
    c = Cases(tmp_path_factory.mktemp("arm-models"))
    wide = wide_head_model(tmp_path_factory.mktemp("arm-wide"))
    for kv in ("f16", "q8"):
        c.add(f"model wide-q4-kv{kv} 2", f"wide-q4-kv{kv}", dump_model(c, f"wide-q4-kv{kv}", wide, "q8", kv))
    for i, (model, quant, precision, kv_type) in enumerate(
        [
            ("tiny-smollm3", "q4", "q8", "f16"),
            ("tiny-llama", "q8", "q8", "f16"),
            ("tiny-llama", "q4_k", "q8", "f16"),
            ("tiny-smollm3", "q4", "f32", "f32"),
        ]
    ):
        name = f"{model}-{quant}-{precision}-kv{kv_type}"
        want = dump_model(c, name, tiny_model(model, quant), precision, kv_type)
        c.add(f"model {name} {1 + i % 2}", name, want)
    return c


@pytest.mark.parametrize("isa", ARM_ISAS)
def test_forward_equals_the_x86_engine(harness, model_cases, isa):
    """Prefill and decode logits of the tiny models, bit for bit those of the x86 engine."""
    model_cases.run(harness, isa)
    model_cases.check(isa)
