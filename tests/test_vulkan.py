"""The Vulkan backend: each shader against NumPy, the tiny model on the GPU against the CPU engine,
and every fallback path. CI runs these on Mesa's software Vulkan driver (lavapipe, subgroups of 8);
without a usable Vulkan device the GPU tests skip and only the device-free ones run."""

from __future__ import annotations

import importlib.util
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _helpers_vulkan import DEVICE, matmul_want, needs_gpu, run_matmul
from test_kernels import random_q4, random_q8, ref_quantize_q8

import qora
from qora._core import _cpu, _vulkan
from qora.engine import vulkan
from qora.errors import QoraError

REPO = Path(__file__).resolve().parents[1]
FIX = Path(__file__).parent / "fixtures"
STORE, ADD, SWIGLU, QKV = 0, 1, 2, 3


def rel_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


def random_matrix(r, dtype, rows, cols):
    """(file bytes/array, float64 values) of a random matrix stored as dtype."""
    if dtype == "q4":
        raw, vals = random_q4(r, rows, cols)
    elif dtype == "q8":
        raw, vals = random_q8(r, rows, cols)
    else:
        raw = (r.standard_normal((rows, cols)) * 0.1).astype(np.float16 if dtype == "f16" else np.float32)
        vals = raw
    return raw, vals.astype(np.float64)


def effective_input(dtype, x):
    """The input a product sees: Q8-rounded for Q4/Q8 weights, as the CPU engine does."""
    if dtype in ("q4", "q8"):
        d, q = ref_quantize_q8(x)
        return (q.astype(np.float64) * d.astype(np.float64)[:, None]).reshape(-1)
    return x.astype(np.float64)


# ───── device-free: the build, the embedded SPIR-V, the loader being optional ─────


def _gen_shaders():
    spec = importlib.util.spec_from_file_location("gen_shaders", REPO / "tools" / "gen_shaders.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(
    not (REPO / "tools" / "gen_shaders.py").exists() or not (REPO / "qora" / "_core" / "shaders").is_dir(),
    reason="needs the source tree (shader sources and tools/gen_shaders.py)",
)
def test_embedded_spirv_matches_sources():
    """The header's hashes match the GLSL; with the same compiler (glslc, or glslangValidator for the
    cooperative-matrix shaders), a fresh compile gives the same bytes."""
    gen = _gen_shaders()
    assert gen.stale(gen.Tools(shutil.which("glslc"), shutil.which("glslangValidator"))) == []
    version, have = gen.parse_header(gen.HEADER.read_text())
    assert set(have) == set(gen.SHADERS)
    assert all(blob[:4] == b"\x03\x02\x23\x07" for _, blob in have.values())  # SPIR-V magic


def _function_variables(spirv: bytes) -> int:
    """OpVariables in the Function storage class (arrays there that a driver may place in local memory)."""
    words = np.frombuffer(spirv, dtype="<u4")
    assert words[0] == 0x07230203
    i, n = 5, 0
    while i < len(words):
        count, op = int(words[i]) >> 16, int(words[i]) & 0xFFFF
        assert count > 0
        n += op == 59 and int(words[i + 3]) == 7  # OpVariable, StorageClass Function
        i += count
    return n


@pytest.mark.skipif(not (REPO / "tools" / "gen_shaders.py").exists(), reason="needs tools/gen_shaders.py")
def test_register_arrays_are_values():
    """The tensor-core kernels and the decode attention keep no variable in function memory. The
    accumulator array of matmul_coop.comp once stayed there (one loop over it indexed by a variable),
    and an H100 then loaded and stored every accumulator in local memory around each product (the
    products alone ran at ~32 TFLOP/s); attn_decode.comp's per-head arrays, indexed in loops to a
    specialization constant, took 288 bytes of local memory there."""
    gen = _gen_shaders()
    _, have = gen.parse_header(gen.HEADER.read_text())
    kernels = {name: blob for name, (_, blob) in have.items() if name.startswith("matmul_coop_")}
    assert kernels
    kernels["attn_decode"] = have["attn_decode"][1]
    for name, blob in kernels.items():
        assert _function_variables(blob) == 0, name
    # the parser does see one: a module header and `%2 = OpVariable %1 Function`
    one = np.array([0x07230203, 0x10300, 0, 3, 0, (4 << 16) | 59, 1, 2, 7], "<u4").tobytes()
    assert _function_variables(one) == 1


@pytest.mark.skipif(
    not (REPO / "tools" / "gen_shaders.py").exists()
    or not (REPO / "qora" / "_core" / "shaders").is_dir()
    or not (shutil.which("glslangValidator") and shutil.which("spirv-opt")),
    reason="needs the source tree and glslangValidator + spirv-opt",
)
def test_coopmat_probe_variants_compile():
    """The tensor-core kernel's measurement variants (gen_shaders --probes, bench/coopmat_probe.sh) still
    compile, with and without spirv-opt, and are not in the committed header."""
    gen = _gen_shaders()
    tools = gen.Tools(shutil.which("glslc"), shutil.which("glslangValidator"))
    assert not any(name.startswith("matmul_coop_q4_") for name in gen.SHADERS)
    for probe in ("n8", "noopt", "pm168"):
        name = gen.add_probe(probe)
        try:
            assert gen.compile_spirv(name, tools)[:4] == b"\x03\x02\x23\x07"
        finally:
            del gen.SHADERS[name]
            gen.GLSLANG.discard(name)


@pytest.mark.skipif(
    not (REPO / "tools" / "gen_shaders.py").exists() or sys.platform == "win32",
    reason="needs tools/gen_shaders.py and a POSIX shell",
)
def test_a_compiler_that_does_not_run_counts_as_absent(tmp_path, capsys):
    """A glslangValidator or glslc that exits non-zero on --version (a broken install: its SPIRV-Tools
    library missing or of another ABI) is ignored with a warning, and --if-stale still builds from the
    committed SPIR-V: such a machine once failed `pip install -e .`."""
    gen = _gen_shaders()
    broken = tmp_path / "broken-tool"
    broken.write_text("#!/bin/sh\necho 'error while loading shared libraries: libSPIRV-Tools-shared.so' >&2\nexit 1\n")
    broken.chmod(0o755)
    tools = gen.Tools(str(broken), str(broken), str(broken))
    assert (tools.glslc, tools.glslang, tools.glslc_version, tools.glslang_version) == (None, None, None, None)
    assert not tools.complete()
    err = capsys.readouterr().err
    assert "exited 1" in err and "libSPIRV-Tools-shared.so" in err
    assert gen.main(["--if-stale", "--glslc", str(broken), "--glslang", str(broken)]) == 0


def test_no_loader_imports_and_reports(monkeypatch, tmp_path):
    missing = str(tmp_path / "libvulkan-missing.so.1")
    with pytest.raises(_vulkan.VulkanError) as e:
        _vulkan.list_devices(missing)
    assert e.value.kind == "loader" and "no Vulkan loader" in str(e.value)
    monkeypatch.setenv("QORA_VK_LOADER", missing)
    assert vulkan.devices() == []


def test_choose_device_policy(monkeypatch):
    def dev(i, kind, vram, usable=True):
        return {"index": i, "name": f"d{i}", "type": kind, "vram_bytes": vram, "usable": usable, "why_not": "x"}

    monkeypatch.delenv("QORA_VK_DEVICE", raising=False)
    monkeypatch.delenv("QORA_VK_ALLOW_CPU", raising=False)
    found = [dev(0, "cpu", 8), dev(1, "integrated", 4), dev(2, "discrete", 2), dev(3, "discrete", 1, usable=False)]
    assert vulkan.choose_device(found)["index"] == 2
    with pytest.raises(vulkan.GpuUnavailable) as e:
        vulkan.choose_device([dev(0, "cpu", 8)])
    assert e.value.quiet and "QORA_VK_ALLOW_CPU" in str(e.value)
    assert vulkan.choose_device([dev(0, "cpu", 8)], required=True)["index"] == 0
    monkeypatch.setenv("QORA_VK_ALLOW_CPU", "1")
    assert vulkan.choose_device([dev(0, "cpu", 8)])["index"] == 0
    monkeypatch.setenv("QORA_VK_DEVICE", "1")
    assert vulkan.choose_device(found)["index"] == 1
    monkeypatch.setenv("QORA_VK_DEVICE", "3")
    with pytest.raises(vulkan.GpuUnavailable):
        vulkan.choose_device(found)
    monkeypatch.setenv("QORA_VK_DEVICE", "7")
    with pytest.raises(vulkan.GpuUnavailable):
        vulkan.choose_device(found)


def test_pack_layout():
    r = np.random.default_rng(0)
    raw, _ = random_q4(r, 3, 64)
    packed = _vulkan.pack("q4", 3, 64, raw)
    blocks = raw.reshape(3, 2, 18)
    assert packed.shape[0] == _vulkan.packed_bytes("q4", 3, 64) and packed.shape[0] % 16 == 0
    assert np.array_equal(packed[: 6 * 16].reshape(6, 16), blocks[:, :, 2:].reshape(6, 16))
    assert np.array_equal(packed[6 * 16 : 6 * 18].reshape(6, 2), blocks[:, :, :2].reshape(6, 2))
    with pytest.raises(ValueError):
        _vulkan.pack("q4", 3, 64, raw[:2])


# ───── shaders against NumPy ─────


def act_layout(width):
    """(act_w, words of one half) of the decode activation buffer for inputs up to width (act.glsl)."""
    w = (width + 127) // 128 * 128
    return w, w + w // 4 + w // 16


def unpack_act(act, n, base=0):
    """The floats, the Q8 ints (blocks, 32) and the (scale, int sum) pairs of one activation half."""
    w, _ = act_layout(n)
    nb = n // 32
    f = act[base : base + n].view(np.float32)
    q = act[base + w : base + w + 8 * nb].view(np.int8).reshape(nb, 32)
    ds = act[base + w + w // 4 : base + w + w // 4 + 2 * nb].view(np.float32).reshape(nb, 2)
    return f, q, ds


def run_quant(ctx, x, norm=None, threads=64, width=None):
    """quant.comp: x (RMS-normalized with norm if given) into half 0 of a fresh activation buffer."""
    n = x.size
    w, half = act_layout(width or n)
    act = np.zeros(2 * half, np.uint32)
    push = struct.pack("<4If", n, 0, 0, w, 1e-6)
    nq = norm if norm is not None else np.zeros(4, np.float32)
    bufs = [None, None, None, x.copy(), None, None, None, None, act, np.zeros(4, np.uint32), nq]
    ctx.run_kernel("quant", [threads, 0 if norm is None else 1], bufs, push, 1)
    return act


def run_matvec(
    ctx,
    dtype,
    raw,
    rows,
    cols,
    x,
    mode=STORE,
    norm=None,
    y=None,
    rows_per=4,
    threads=64,
    dot=False,
    epi=0,
    nq=None,
    epi_n=0,
    **qkv,
):
    """One matvec.comp dispatch on the input x prepared by quant.comp (rows: of the stored matrix;
    SWIGLU: gate rows, the up rows follow). Returns y, the caches and the activation buffer
    (half 1: what the epilogue prepared, for epi)."""
    stored = rows * 2 if mode == SWIGLU else rows
    packed = _vulkan.pack(dtype, stored, cols, raw)
    y = np.zeros(rows, np.float32) if y is None else y
    kc = np.zeros(qkv.get("kv_words", 4), np.uint32)
    vc = np.zeros_like(kc)
    params = np.array([qkv.get("pos", 0), 1, 0, 0], np.uint32)
    rope = qkv.get("rope", np.zeros(4, np.float32)).astype(np.float32)
    width = max(cols, epi_n)
    w, half = act_layout(width)
    act = run_quant(ctx, x, norm, width=width)
    push = struct.pack(
        "<11IfI",
        rows,
        cols,
        0,
        0,
        w,
        qkv.get("q_dim", 0),
        qkv.get("kv_dim", 0),
        qkv.get("head_dim", 0),
        qkv.get("use_rope", 0),
        epi_n,
        half,
        1e-6,
        qkv.get("row0", 0),
    )
    if mode == QKV:
        groups = (rows // 4 + rows_per // 4 - 1) // (rows_per // 4)
    elif mode == SWIGLU:
        groups = (rows + rows_per // 2 - 1) // (rows_per // 2)
    else:
        groups = (rows + rows_per - 1) // rows_per
    spec = [threads, rows_per, mode, epi]
    cnt = np.zeros(w // 32 + 8, np.uint32)
    nq = nq if nq is not None else np.zeros(4, np.float32)
    name = f"matvec_{dtype}" + ("_dot" if dot else "") + qkv.get("suffix", "")
    ctx.run_kernel(name, spec, [packed, None, None, y, kc, vc, params, rope, act, cnt, nq], push, groups)
    assert not cnt.any()  # the epilogue's last workgroup reset the count for the next dispatch
    return y, kc, vc, act


def dot_variants(dtype):
    """Q4/Q8: the emulated dot and, where the device has it, the packed integer dot product."""
    return [False, True] if dtype in ("q4", "q8") and DEVICE is not None and DEVICE.get("int_dot") else [False]


@needs_gpu
@pytest.mark.parametrize("dtype", ["q4", "q8", "f16", "f32"])
@pytest.mark.parametrize("shape", [(1, 32), (37, 64), (130, 352), (64, 2048)])
def test_matvec(ctx, dtype, shape):
    rows, cols = shape
    r = np.random.default_rng(1000 * rows + cols)
    raw, vals = random_matrix(r, dtype, rows, cols)
    x = r.standard_normal(cols).astype(np.float32)
    xe = effective_input(dtype, x)
    # float32 sums against float64 ones: the error scales with the terms, not with the result (a
    # one-row result can cancel to near zero: 4e-5 of such a result was once seen in CI)
    scale = (np.abs(vals) @ np.abs(xe)).max()
    for dot in dot_variants(dtype):
        y, _, _, _ = run_matvec(
            ctx, dtype, raw, rows, cols, x, rows_per=1 + rows % 5, threads=32 if cols < 100 else 64, dot=dot
        )
        assert np.abs(y - vals @ xe).max() / scale < 1e-6
        # bit-for-bit the CPU engine's integer arithmetic, up to float summation order
        assert rel_err(y, _cpu.matvec(raw, dtype, rows, cols, x, 0)) < 1e-5


@needs_gpu
@pytest.mark.parametrize("threads", [32, 64, 256])
def test_quant(ctx, threads):
    """The decode input: floats, and the CPU engine's Q8 quantization exactly (with the int sums)."""
    n = 352
    r = np.random.default_rng()
    x = r.standard_normal(n).astype(np.float32)
    x[:32] = 0  # an all-zero block: scale 0
    f, q, ds = unpack_act(run_quant(ctx, x, threads=threads), n)
    d, qr = ref_quantize_q8(x)
    assert np.array_equal(f, x) and np.array_equal(q, qr) and np.array_equal(ds[:, 0], d.astype(np.float32))
    assert np.array_equal(ds[:, 1], qr.astype(np.float32).sum(axis=1))
    nw = (1 + 0.1 * r.standard_normal(n)).astype(np.float32)
    f, q, _ = unpack_act(run_quant(ctx, x, norm=nw, threads=threads), n)
    xn = _cpu.rmsnorm(x, nw, 1e-6, 0)
    assert rel_err(f, xn) < 1e-6
    assert (q != ref_quantize_q8(xn)[1]).sum() <= 2  # a rounding tie may fall either way
    x88 = x[:88]  # not whole Q8 blocks (F16/F32 inputs only): the floats alone
    f, _, _ = unpack_act(run_quant(ctx, x88, norm=nw[:88], threads=threads), 88)
    assert rel_err(f, _cpu.rmsnorm(x88, nw[:88], 1e-6, 0)) < 1e-6


@needs_gpu
@pytest.mark.parametrize("dtype", ["q4", "f16"])
def test_matvec_norm_and_residual(ctx, dtype):
    rows, cols = 70, 256
    r = np.random.default_rng()
    raw, vals = random_matrix(r, dtype, rows, cols)
    x = r.standard_normal(cols).astype(np.float32)
    nw = (1 + 0.1 * r.standard_normal(cols)).astype(np.float32)
    xn = _cpu.rmsnorm(x, nw, 1e-6, 0)
    y, _, _, _ = run_matvec(ctx, dtype, raw, rows, cols, x, norm=nw)
    # a Q8 rounding of the normed input may land on the other side of a tie: allow a few
    assert rel_err(y, vals @ effective_input(dtype, xn)) < 3e-3
    y0 = r.standard_normal(rows).astype(np.float32)
    y, _, _, _ = run_matvec(ctx, dtype, raw, rows, cols, x, mode=ADD, y=y0.copy())
    # the GPU's x / d may differ from NumPy's by an ulp and round one Q8 value the other way
    assert rel_err(y, y0 + vals @ effective_input(dtype, x)) < (3e-3 if dtype == "q4" else 1e-5)


@needs_gpu
@pytest.mark.parametrize("mode,rows_per,epi", [(ADD, 2, 1), (ADD, 6, 1), (ADD, 2, 2), (SWIGLU, 4, 1)])
def test_matvec_epilogue(ctx, mode, rows_per, epi):
    """The next input prepared from the whole finished output, by the last workgroup of each Q8
    block of it (epi 1 where a workgroup's rows lie in one block) or of the dispatch: the same
    bits as quant.comp run on that output afterwards (epi 2: RMS-normalized first)."""
    rows, cols = 320, 64
    r = np.random.default_rng()
    raw, vals = random_matrix(r, "q4", 2 * rows if mode == SWIGLU else rows, cols)
    x = r.standard_normal(cols).astype(np.float32)
    y0 = r.standard_normal(rows).astype(np.float32)
    nq = (1 + 0.1 * r.standard_normal(rows)).astype(np.float32) if epi == 2 else None
    y, _, _, act = run_matvec(
        ctx, "q4", raw, rows, cols, x, mode=mode, y=y0.copy(), rows_per=rows_per, epi=epi, nq=nq, epi_n=rows
    )
    out = vals @ effective_input("q4", x)
    if mode == SWIGLU:
        g, u = out[:rows], out[rows:]
        assert rel_err(y, g / (1 + np.exp(-g)) * u) < 1e-5
    else:
        assert rel_err(y, y0 + out) < 1e-5
    _, half = act_layout(rows)
    want = unpack_act(run_quant(ctx, y, norm=nq), rows)
    for got, ref in zip(unpack_act(act, rows, base=half), want, strict=True):
        assert np.array_equal(got, ref)


@needs_gpu
@pytest.mark.parametrize("dtype", ["q4", "q8", "f32"])
def test_matvec_swiglu(ctx, dtype):
    rows, cols = 45, 96
    r = np.random.default_rng()
    raw, vals = random_matrix(r, dtype, 2 * rows, cols)
    x = r.standard_normal(cols).astype(np.float32)
    gu = vals @ effective_input(dtype, x)
    g, u = gu[:rows], gu[rows:]
    for dot in dot_variants(dtype):
        h, _, _, _ = run_matvec(ctx, dtype, raw, rows, cols, x, mode=SWIGLU, rows_per=6, dot=dot)
        assert rel_err(h, g / (1 + np.exp(-g)) * u) < 1e-5


def ref_rope(v, n_heads, hd, cos, sin):
    v = v.reshape(n_heads, hd).astype(np.float64)
    h = hd // 2
    return np.concatenate([v[:, :h] * cos - v[:, h:] * sin, v[:, h:] * cos + v[:, :h] * sin], axis=1).reshape(-1)


def rope_table(positions, hd, theta=10000.0, scale=1.0):
    inv = (1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd)).astype(np.float32)
    ang = np.float32(positions)[:, None] * inv[None, :]
    return np.stack([np.cos(ang) * scale, np.sin(ang) * scale], axis=-1).astype(np.float32)  # (n, hd/2, 2)


@needs_gpu
@pytest.mark.parametrize("use_rope", [1, 0])
def test_matvec_qkv_rope_and_cache(ctx, use_rope):
    """q rotated to the scratch, k rotated and v into the f16 cache at the position (NoPE: no rotation)."""
    n_heads, n_kv, hd, cols, pos, max_pos = 4, 2, 16, 64, 5, 8
    q_dim, kv_dim = n_heads * hd, n_kv * hd
    rows = q_dim + 2 * kv_dim
    r = np.random.default_rng()
    raw, vals = random_matrix(r, "q8", rows, cols)
    x = r.standard_normal(cols).astype(np.float32)
    cs = rope_table(np.array([pos]), hd, scale=1.3)[0]
    y, kc, vc, _ = run_matvec(
        ctx,
        "q8",
        raw,
        rows,
        cols,
        x,
        mode=QKV,
        rows_per=8,
        y=np.zeros(q_dim, np.float32),
        pos=pos,
        rope=cs.reshape(-1),
        q_dim=q_dim,
        kv_dim=kv_dim,
        head_dim=hd,
        use_rope=use_rope,
        kv_words=max_pos * kv_dim // 2,
    )
    out = vals @ effective_input("q8", x)
    q, k, v = out[:q_dim], out[q_dim : q_dim + kv_dim], out[q_dim + kv_dim :]
    if use_rope:
        q, k = ref_rope(q, n_heads, hd, cs[:, 0], cs[:, 1]), ref_rope(k, n_kv, hd, cs[:, 0], cs[:, 1])
    assert rel_err(y, q) < 1e-5
    kc16, vc16 = kc.view(np.float16).reshape(max_pos, kv_dim), vc.view(np.float16).reshape(max_pos, kv_dim)
    assert rel_err(kc16[pos], k) < 1e-3 and rel_err(vc16[pos], v) < 1e-3  # f16 storage
    assert not kc16[:pos].any() and not vc16[pos + 1 :].any()  # nothing else written


needs_coopmat = pytest.mark.skipif(
    DEVICE is None or not DEVICE.get("coopmat"),
    reason="no device with f16 cooperative matrices (lavapipe has none; runs on an NVIDIA GPU)",
)


@needs_coopmat
@pytest.mark.parametrize("dtype", ["q4", "q8", "f16", "f32"])
@pytest.mark.parametrize("mode", [STORE, ADD])
@pytest.mark.parametrize("shape", [(70, 67), (300, 129), (128, 512)])
def test_matmul_coop(ctx, dtype, mode, shape):
    """Tensor-core prefill product: weights dequantized to f16, the float input rounded to f16, f32
    sums; tile edges crossed in rows, tokens and columns."""
    rows, n_tok = shape
    cols = 96 if dtype in ("q4", "q8") else 88
    r = np.random.default_rng()
    raw, vals = random_matrix(r, dtype, rows, cols)
    x = r.standard_normal((n_tok, cols)).astype(np.float32)
    w = _vulkan.pack(dtype, rows, cols, raw)
    y, y0 = run_matmul(ctx, f"matmul_coop_{dtype}", mode, w, x, np.zeros(4, np.float32), rows, cols, 128, r)
    # the operands as the shader stages them: f16 (q * d rounded once)
    w16 = vals.astype(np.float32).astype(np.float16).astype(np.float64)
    want = matmul_want(y0, x.astype(np.float16).astype(np.float64) @ w16.T, mode == ADD)
    assert rel_err(y, want) < 1e-5
    assert rel_err(y[:, 2 : 2 + rows], want[:, 2 : 2 + rows]) < 1e-5
    assert np.array_equal(y[:, :2], y0[:, :2]) and np.array_equal(y[:, 2 + rows :], y0[:, 2 + rows :])


def test_coopmat_probe_reported():
    """Every listed device says whether the tensor-core prefill can run on it (a bool the engine reads)."""
    try:
        found = _vulkan.list_devices()
    except _vulkan.VulkanError:
        pytest.skip("no Vulkan loader")
    assert all(isinstance(d["coopmat"], bool) for d in found)


@needs_gpu
@pytest.mark.parametrize("dtype", ["q4", "q8", "f16", "f32"])
@pytest.mark.parametrize("mode", [STORE, ADD])
def test_matmul(ctx, dtype, mode):
    """Prefill product over a batch of tokens, tile edges crossed in rows, tokens and columns."""
    rows, cols, n_tok = 70, 96 if dtype in ("q4", "q8") else 88, 67
    r = np.random.default_rng()
    raw, vals = random_matrix(r, dtype, rows, cols)
    x = r.standard_normal((n_tok, cols)).astype(np.float32)
    xs = np.zeros(n_tok * (cols // 32 + 1), np.float32)
    xin = x
    if dtype in ("q4", "q8"):  # the Q8 input prep.comp makes: integer values, one scale per block
        d, q = ref_quantize_q8(x)
        xin, xs[: d.size] = q.astype(np.float32).reshape(n_tok, cols), d.astype(np.float32)
    w = _vulkan.pack(dtype, rows, cols, raw)
    y, y0 = run_matmul(ctx, f"matmul_{dtype}", mode, w, xin, xs, rows, cols, 64, r)
    ref = np.stack([vals @ effective_input(dtype, x[t]) for t in range(n_tok)])
    want = matmul_want(y0, ref, mode == ADD)
    assert rel_err(y, want) < 1e-5


@needs_gpu
def test_prep_norm_swiglu_q8(ctx):
    n, n_tok, eps = 96, 3, 1e-6
    r = np.random.default_rng()
    x = r.standard_normal((n_tok, n)).astype(np.float32)
    nw = (1 + 0.1 * r.standard_normal(n)).astype(np.float32)

    def prep(inp, ld_in, norm, q8, swiglu):
        y = np.zeros((n_tok, n), np.float32)
        ys = np.zeros(n_tok * (n // 32), np.float32)
        push = struct.pack("<3If", n, ld_in, n, eps)
        ctx.run_kernel("prep", [0, norm, q8, swiglu], [None, inp.copy(), nw, y, ys], push, n_tok)
        return y, ys.reshape(n_tok, n // 32)

    y, _ = prep(x, n, 1, 0, 0)
    assert rel_err(y, np.stack([_cpu.rmsnorm(x[t], nw, eps, 0) for t in range(n_tok)])) < 1e-5
    y, ys = prep(x, n, 0, 1, 0)  # exact: the same quantizer as the CPU engine
    d, q = ref_quantize_q8(x)
    assert np.array_equal(y.reshape(-1, 32), q.astype(np.float32)) and np.array_equal(
        ys.reshape(-1), d.astype(np.float32)
    )
    gu = r.standard_normal((n_tok, 2 * n)).astype(np.float32)
    y, _ = prep(gu, 2 * n, 0, 0, 1)
    g, u = gu[:, :n].astype(np.float64), gu[:, n:]
    assert rel_err(y, g / (1 + np.exp(-g)) * u) < 1e-5


@needs_gpu
def test_rope_kv(ctx):
    n_heads, n_kv, hd, n_tok, start, max_pos = 4, 2, 16, 3, 2, 8
    q_dim, kv_dim = n_heads * hd, n_kv * hd
    ld = q_dim + 2 * kv_dim
    r = np.random.default_rng()
    qkv = r.standard_normal((n_tok, ld)).astype(np.float32)
    cs = rope_table(np.arange(start, start + n_tok), hd)
    kc = np.zeros(max_pos * kv_dim // 2, np.uint32)
    vc = np.zeros_like(kc)
    params = np.array([start, n_tok, 0, 0], np.uint32)
    out = qkv.copy()
    push = struct.pack("<5I", n_heads, n_kv, hd, ld, 1)
    ctx.run_kernel("rope_kv", [], [None, None, None, out, kc, vc, params, cs.reshape(-1)], push, n_tok)
    kc16, vc16 = kc.view(np.float16).reshape(max_pos, kv_dim), vc.view(np.float16).reshape(max_pos, kv_dim)
    for t in range(n_tok):
        c, s = cs[t, :, 0], cs[t, :, 1]
        assert rel_err(out[t, :q_dim], ref_rope(qkv[t, :q_dim], n_heads, hd, c, s)) < 1e-6
        k = ref_rope(qkv[t, q_dim : q_dim + kv_dim], n_kv, hd, c, s)
        assert np.array_equal(kc16[start + t], k.astype(np.float32).astype(np.float16))
        assert np.array_equal(vc16[start + t], qkv[t, q_dim + kv_dim :].astype(np.float16))


@needs_gpu
@pytest.mark.parametrize("dtype", ["q4", "q8", "f16", "f32"])
def test_embed(ctx, dtype):
    rows, cols = 50, 64
    r = np.random.default_rng()
    raw, vals = random_matrix(r, dtype, rows, cols)
    toks = [3, 17, 49, 3]
    params = np.array([0, len(toks), 0, 0, *toks], np.uint32)
    out = np.zeros((len(toks), cols), np.float32)
    # the second half of the table as its own chunk: only tokens in its rows are written
    half = _vulkan.pack(dtype, rows - 25, cols, np.ascontiguousarray(raw[25:]))
    ctx.run_kernel(
        f"embed_{dtype}", [], [half, None, None, out, None, None, params], struct.pack("<4I", 25, cols, 25, cols), 4
    )
    assert not out[[0, 1, 3]].any() and np.array_equal(out[2], vals[49].astype(np.float32))
    ctx.run_kernel(
        f"embed_{dtype}",
        [],
        [_vulkan.pack(dtype, rows, cols, raw), None, None, out, None, None, params],
        struct.pack("<4I", rows, cols, 0, cols),
        4,
    )
    assert np.array_equal(out, vals[toks].astype(np.float32))


# ───── the tiny model: GPU against the CPU engine ─────


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return {quant: tiny_model("tiny-smollm3", quant) for quant in ("q4", "q8", "f16")}


# With an f32 KV cache both engines do the same integer block sums and float steps: they agree to
# float rounding. With an f16 cache, a key/value a rounding apart on the two sides can land on either
# side of an f16 tie (and then a Q8 activation too), which the tiny random model amplifies.
TOL = {"f32": 1e-4, "f16": 5e-2}
PROMPT = "The capital of France is"


@needs_gpu
@pytest.mark.parametrize(
    "quant,kv,dot",
    [
        ("q4", "f32", 0),
        ("q8", "f32", 0),
        ("f16", "f32", 0),
        ("q4", "f16", 0),
        ("q8", "f16", 0),
        ("q4", "f32", 1),
        ("q8", "f16", 1),
    ],
)
def test_tiny_model_matches_cpu(tiny, quant, kv, dot, monkeypatch):
    if dot and not DEVICE.get("int_dot"):
        pytest.skip("no packed integer dot product on this device")
    monkeypatch.setenv("QORA_KV", kv)
    monkeypatch.setenv("QORA_VK_DOT", str(dot))  # decode Q4/Q8 dots emulated / by the device's instruction
    monkeypatch.setenv("QORA_VK_COOPMAT", "0")  # the integer prefill path (tensor cores: the test below)
    tol = TOL[kv]
    gpu = qora.load(tiny[quant], device="gpu", max_seq_len=128)
    cpu = qora.load(tiny[quant], device="cpu", max_seq_len=128)
    try:
        assert gpu.engine.device == "vulkan" and cpu.engine.device == "cpu"
        assert gpu.engine.kv_dtype == cpu.engine.kv_dtype == kv
        toks = np.random.default_rng(7).integers(0, gpu.config["vocab_size"], 48).tolist()
        # prefill with every row of logits, in several submissions (logit_rows) ...
        lg, lc = gpu.forward(toks[:40]), cpu.forward(toks[:40])
        assert lg.shape == lc.shape == (40, gpu.config["vocab_size"])
        assert rel_err(lg, lc) < tol
        # ... decode one token at a time ...
        for i in range(40, 44):
            assert rel_err(gpu.engine.forward([toks[i]], i), cpu.engine.forward([toks[i]], i)) < tol
        # ... and a batched prefill from a later position that returns the last row only
        lg, lc = gpu.engine.forward(toks[44:48], 44), cpu.engine.forward(toks[44:48], 44)
        assert lg.shape == (1, gpu.config["vocab_size"]) and rel_err(lg, lc) < tol
        if kv == "f32":  # the top two logits of this model's greedy path are as close as 0.2 %
            opts = dict(raw=True, greedy=True, max_tokens=24)
            assert gpu.generate(PROMPT, **opts) == cpu.generate(PROMPT, **opts)
    finally:
        gpu.close()
        cpu.close()
    with pytest.raises(QoraError, match="closed"):
        gpu.engine.forward([1], 0)


@needs_coopmat
@pytest.mark.parametrize("quant", ["q4", "q8", "f16"])
def test_tiny_model_coopmat(tiny, quant, monkeypatch):
    """Prefill on tensor cores (f16 operands, f32 sums) against the CPU engine's float-activation
    arithmetic, the nearest CPU counterpart; decode after it (the integer mat-vecs) against the
    CPU's default arithmetic: its KV cache was filled with other roundings (f16 there, Q8 here),
    which the tiny random model amplifies to a few percent (0.05 seen on an H100)."""
    monkeypatch.setenv("QORA_KV", "f32")
    monkeypatch.setenv("QORA_VK_COOPMAT", "2")  # every product, however small
    toks = np.random.default_rng(11).integers(0, 400, 44).tolist()
    gpu = qora.load(tiny[quant], device="gpu", max_seq_len=128)
    try:
        assert gpu.engine.matmul == "coopmat"
        lg = gpu.forward(toks[:40])
        monkeypatch.setenv("QORA_PRECISION", "f32")
        with qora.load(tiny[quant], device="cpu", max_seq_len=128) as cpu:
            assert rel_err(lg, cpu.forward(toks[:40])) < 1e-2
        monkeypatch.delenv("QORA_PRECISION")
        with qora.load(tiny[quant], device="cpu", max_seq_len=128) as cpu:
            cpu.forward(toks[:40])
            for i in range(40, 44):
                assert rel_err(gpu.engine.forward([toks[i]], i), cpu.engine.forward([toks[i]], i)) < 0.1
    finally:
        gpu.close()


@needs_gpu
def test_chunked_head_and_long_prefill(tiny, monkeypatch):
    """The embedding / LM head split into row chunks (as when it exceeds a storage-buffer binding)
    and a prompt longer than one prefill submission give the CPU engine's logits."""
    monkeypatch.setenv("QORA_KV", "f32")
    monkeypatch.setenv("QORA_VK_COOPMAT", "0")  # integer prefill products, as the CPU's
    monkeypatch.setenv("QORA_VK_CHUNK_ROWS", "96")  # 400 rows: 5 chunks, the last one short
    monkeypatch.setenv("QORA_VK_BATCH", "16")
    toks = np.random.default_rng(3).integers(0, 400, 45).tolist()
    with qora.load(tiny["q8"], device="gpu", max_seq_len=64) as g, qora.load(tiny["q8"], device="cpu") as c:
        assert rel_err(g.engine.forward(toks, 0), c.engine.forward(toks, 0)) < 1e-4  # 3 submissions
        assert rel_err(g.forward(toks[:20]), c.forward(toks[:20])) < 1e-4  # all rows, chunked head
        assert rel_err(g.engine.forward([5], 20), c.engine.forward([5], 20)) < 1e-4


# ───── fallbacks ─────


def _cpu_text(path):
    with qora.load(path, device="cpu", max_seq_len=128) as m:
        return m.generate(PROMPT, raw=True, greedy=True, max_tokens=24)


def test_fallback_no_loader(tiny, monkeypatch, capfd):
    monkeypatch.setenv("QORA_VK_LOADER", "/nonexistent/libvulkan.so.1")
    with qora.load(tiny["q4"], max_seq_len=128) as m:  # auto: silent on a machine without Vulkan
        assert m.engine.device == "cpu"
        assert m.generate(PROMPT, raw=True, greedy=True, max_tokens=24) == _cpu_text(tiny["q4"])
    assert capfd.readouterr().err == ""
    qora.load(tiny["q4"], max_seq_len=128, verbose=True).close()  # --verbose: one line says why
    err = capfd.readouterr().err
    assert "GPU not used (no Vulkan loader" in err and err.count("GPU not used") == 1
    with pytest.raises(QoraError, match="no usable GPU: no Vulkan loader"):
        qora.load(tiny["q4"], device="gpu")


def test_fallback_no_device(tiny, monkeypatch, capfd):
    for var in ("VK_ICD_FILENAMES", "VK_DRIVER_FILES"):  # the loader finds no driver
        monkeypatch.setenv(var, str(FIX / "no-such-icd.json"))
    monkeypatch.setenv("QORA_VK_ALLOW_CPU", "1")
    with qora.load(tiny["q4"], max_seq_len=128) as m:
        assert m.engine.device == "cpu"
    assert capfd.readouterr().err == ""
    with pytest.raises(QoraError, match="no usable GPU"):
        qora.load(tiny["q4"], device="gpu")


@needs_gpu
def test_fallback_allocation_failure(tiny, monkeypatch, capfd):
    monkeypatch.setenv("QORA_VK_FAIL", "alloc")
    monkeypatch.setenv("QORA_VK_ALLOW_CPU", "1")
    with qora.load(tiny["q8"], max_seq_len=128) as m:  # a device that cannot hold the model: one line
        assert m.engine.device == "cpu"
        text = m.generate(PROMPT, raw=True, greedy=True, max_tokens=24)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "GPU not used" in err[0] and "simulated" in err[0]
    assert text == _cpu_text(tiny["q8"])
    with pytest.raises(QoraError, match="simulated"):
        qora.load(tiny["q8"], device="gpu")


@needs_gpu
def test_fallback_mid_run(tiny, monkeypatch, capfd):
    """The device is lost after the prefill and 5 decode steps: the CPU takes over at that position."""
    monkeypatch.setenv("QORA_VK_FAIL", "run:6")
    with qora.load(tiny["f16"], device="gpu", max_seq_len=128) as m:
        assert m.engine.device == "vulkan"
        text = m.generate(PROMPT, raw=True, greedy=True, max_tokens=24)
        assert m.engine.device == "cpu"
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "continuing on the CPU from position" in err[0]
        assert text == _cpu_text(tiny["f16"])
        # the engine keeps serving on the CPU
        assert m.generate(PROMPT, raw=True, greedy=True, max_tokens=24) == text


@needs_gpu
def test_cli_gpu_flag(tiny):
    run = [
        sys.executable,
        "-m",
        "qora",
        "--load",
        str(tiny["f16"]),  # f32 KV cache: the GPU and CPU texts agree exactly
        "--prompt",
        PROMPT,
        "--raw",
        "--greedy",
        "--max-tokens",
        "8",
        "--context",
        "64",
    ]
    insist = dict(__import__("os").environ, QORA_VK_ALLOW_CPU="1")  # --gpu on lavapipe: run it there anyway
    p = subprocess.run([*run, "--gpu", "--verbose"], capture_output=True, text=True, cwd=REPO, env=insist)
    assert p.returncode == 0, p.stderr
    assert "on gpu (" in p.stderr and "device memory" in p.stderr
    cpu = subprocess.run([*run, "--cpu"], capture_output=True, text=True, cwd=REPO)
    assert cpu.returncode == 0 and cpu.stdout == p.stdout
    env = dict(__import__("os").environ, QORA_VK_LOADER="/nonexistent/libvulkan.so.1")
    p = subprocess.run([*run, "--gpu"], capture_output=True, text=True, cwd=REPO, env=env)
    assert p.returncode == 1 and p.stderr.startswith("qora: error: no usable GPU") and "Traceback" not in p.stderr
