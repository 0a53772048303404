"""The batched step on the GPU (VulkanEngine.open_slots / forward_batch / copy_slot, qora_vk.c
qvk_model_forward_batch): rows of several sequences in one pass, each stored and attending at its own
slot, against the CPU engine's forward_batch and the GPU's own single-sequence forward, on tiny
models (lavapipe in CI): ragged mixes of decode rows and prompt chunks, passes split over the rows,
slot reuse, copy_slot, the pre-flight and bad input."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from _helpers_vulkan import DEVICE, needs_gpu

from qora import engine as eng
from qora.errors import QoraError
from qora.format import read_qora

pytestmark = needs_gpu

# The GPU's batched products are the prefill's (matmul.comp), its single decode step the mat-vecs: the
# same arithmetic in another order of float sums; with an f32 cache and float activations (f16
# weights) they agree to float rounding (1e-6 seen). Q4 / Q8 products round their activations to Q8:
# a value a rounding apart can land on either side of a tie, which the tiny random model amplifies to
# about 0.6 % of the largest logit (seen on lavapipe, one row in twenty; most rows agree bit for bit).
# With an f16 or Q8 cache, a key or value can round either way too (test_vulkan.py allows 5e-2). A row
# attending over the wrong slot or position is off by tens of percent.
TOL = {"f16": 1e-4, "q8": 2e-2, "q4": 2e-2}
KV_TOL = {"f32": 0.0, "f16": 5e-2, "q8": 5e-2}


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))


# ───── the kernels' batched modes against NumPy ─────


@pytest.mark.parametrize(
    "entries,n_heads,n_kv,hd,hg,kv",
    [
        # (slot, start, n): decode rows at several depths, a prompt chunk, a fresh prompt, one slot twice
        ([(0, 5, 1), (1, 0, 40), (2, 90, 1), (3, 17, 9)], 4, 2, 16, 2, np.float16),
        ([(2, 0, 1), (0, 130, 3), (1, 60, 70), (3, 0, 1)], 8, 2, 128, 4, np.float32),
        ([(1, 0, 12), (1, 12, 1), (0, 3, 1)], 2, 1, 64, 2, np.float16),
    ],
)
def test_attn_prefill_entries_over_their_slots(ctx, entries, n_heads, n_kv, hd, hg, kv):
    """attn_prefill.comp SEG: workgroup z = entry (start, n, first row, first cache row of its slot),
    every entry against NumPy attention over its own slot; the longest entry sets the tiles."""
    from test_vulkan_attention import flash_shape, ref_attention

    slot_ctx, q_dim, kv_dim = 256, n_heads * hd, n_kv * hd
    r = np.random.default_rng(len(entries) + hd)
    kc, vc = (r.standard_normal((4 * slot_ctx, kv_dim)).astype(kv) for _ in range(2))
    rows = sum(n for _, _, n in entries)
    ld_q = q_dim + 2 * kv_dim
    q = r.standard_normal((rows, ld_q)).astype(np.float32)
    out = np.zeros((rows, q_dim), np.float32)
    seg, row = [], 0
    for slot, start, n in entries:
        seg.append((start, n, row, slot * slot_ctx))
        row += n
    seg = np.array(seg, np.uint32)
    threads, bk, ts, bq = flash_shape(hd, hg, DEVICE["max_shared_memory"])
    spec = [threads, int(kv == np.float16), hd, hg, bk, ts, 1]
    push = struct.pack("<7I", n_heads, n_kv, hd, ld_q, q_dim, 0, 0)
    bufs = [None, q, None, out, kc, vc, np.zeros(4, np.uint32), None, seg]
    tiles = -(-max(n for _, _, n in entries) // bq)
    ctx.run_kernel("attn_prefill", spec, bufs, push, n_heads // hg, tiles, len(entries))
    for (_, start, n), (_, _, row0, base) in zip(entries, seg, strict=True):
        own = slice(base, base + start + n)
        want = ref_attention(q[row0 : row0 + n], kc[own], vc[own], start, n_heads, n_kv, hd)
        assert rel_err(out[row0 : row0 + n], want) < 1e-5


def test_rope_kv_rows_to_their_own_cache_rows(ctx):
    """rope_kv.comp ROWMAP: row t is rotated with its own cos/sin and stored at cache row rowmap[t];
    the same as the plain kernel storing the rows in order."""
    from test_vulkan import rope_table

    n_heads, n_kv, hd, n_rows, n_cache = 4, 2, 16, 5, 40
    q_dim, kv_dim = n_heads * hd, n_kv * hd
    ld = q_dim + 2 * kv_dim
    r = np.random.default_rng(3)
    qkv = r.standard_normal((n_rows, ld)).astype(np.float32)
    cs = rope_table(np.array([7, 0, 33, 2, 19]), hd).reshape(-1)
    rowmap = np.array([39, 0, 17, 3, 22], np.uint32)
    push = struct.pack("<5I", n_heads, n_kv, hd, ld, 1)
    got = [qkv.copy(), np.zeros(n_cache * kv_dim // 2, np.uint32), np.zeros(n_cache * kv_dim // 2, np.uint32)]
    params = np.array([0, n_rows, 0, 0], np.uint32)
    ctx.run_kernel("rope_kv", [0, 1, 1], [None, None, None, *got, params, cs, rowmap], push, n_rows)
    want = [qkv.copy(), np.zeros(n_rows * kv_dim // 2, np.uint32), np.zeros(n_rows * kv_dim // 2, np.uint32)]
    ctx.run_kernel("rope_kv", [0, 1], [None, None, None, *want, params, cs], push, n_rows)
    assert np.array_equal(got[0], want[0])
    for g, w in zip(got[1:], want[1:], strict=True):
        assert np.array_equal(g.reshape(n_cache, -1)[rowmap], w.reshape(n_rows, -1))
        assert not np.delete(g.reshape(n_cache, -1), rowmap, axis=0).any()


@pytest.fixture(scope="module")
def hd32_model(tmp_path_factory):
    """A tiny random Llama with heads of 32 (a Q8_0 cache needs whole blocks per head)."""
    from _helpers_convert import make_hf_model

    from qora.convert import convert

    d = tmp_path_factory.mktemp("vk-batch-hd32")
    make_hf_model(d / "hf", n_layers=2, head_dim=32, n_heads=4, n_kv_heads=2)
    return convert(d / "hf", d / "hd32-q8.qora", quant="q8", progress=False)


@pytest.fixture
def engines(tiny_model, hd32_model, monkeypatch, request):
    """(gpu, cpu, tolerance) of one tiny model (f32 cache unless asked), 4 slots each."""
    name, quant, kv = getattr(request, "param", ("tiny-smollm3", "q8", "f32"))
    monkeypatch.setenv("QORA_KV", kv)
    monkeypatch.setenv("QORA_VK_ALLOW_CPU", "1")
    monkeypatch.setenv("QORA_VK_COOPMAT", "0")  # the integer products, as the CPU's
    qf = read_qora(hd32_model if name == "hd32" else tiny_model(name, quant))
    gpu = eng.make_engine(qf, "gpu", max_seq_len=96)
    cpu = eng.make_engine(qf, "cpu", threads=2, max_seq_len=96)
    assert gpu.device == "vulkan"
    assert gpu.open_slots(4) == cpu.open_slots(4) == 4
    yield gpu, cpu, max(TOL[quant], KV_TOL[kv])
    gpu.close()
    cpu.close()
    qf.close()


def _check(gpu, cpu, entries, tol):
    got, want = gpu.forward_batch(entries), cpu.forward_batch(entries)
    assert len(got) == len(want) == len(entries)
    for g, w in zip(got, want, strict=True):
        assert g.shape == (gpu.vocab_size,)
        assert rel_err(g, w) < tol
    return got


@pytest.mark.parametrize(
    "engines",
    [
        ("tiny-smollm3", "q8", "f32"),
        ("tiny-smollm3", "q4", "f32"),
        ("tiny-llama", "f16", "f32"),
        ("tiny-llama", "f16", "f16"),
        ("hd32", "q8", "q8"),
    ],
    indirect=True,
)
@pytest.mark.parametrize("rows", [None, 5])  # 5: every step split into several passes
def test_batch_matches_cpu_and_single_forward(engines, rows):
    gpu, cpu, tol = engines
    if rows:
        gpu.open_slots(4, rows=rows)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, gpu.vocab_size, size=n) for n in (1, 6, 19, 33)]
    # step 1: slots 0, 1 prefill whole, slot 2 its first 7 tokens; slot 3 waits
    out = _check(gpu, cpu, [(0, prompts[0], 0), (1, prompts[1], 0), (2, prompts[2][:7], 0)], tol)
    # the same as the GPU's single-sequence forward over its own cache
    assert rel_err(out[1], gpu.forward(prompts[1], 0)[-1]) < tol
    # step 2: two decode rows at depths 1 and 6, the rest of slot 2's prompt, slot 3 joins whole
    toks = {s: list(map(int, p)) for s, p in enumerate(prompts)}
    step = [(0, [7], 1), (1, [8], 6), (2, prompts[2][7:], 7), (3, prompts[3], 0)]
    _check(gpu, cpu, step, tol)
    toks[0].append(7)
    toks[1].append(8)
    # steps 3..: everyone decodes at a different depth, in a shuffled order
    for i in range(3):
        order = rng.permutation(4)
        entries = [(int(s), [10 + i + int(s)], len(toks[s])) for s in order]
        out = _check(gpu, cpu, entries, tol)
        for (s, t, _), row in zip(entries, out, strict=True):
            toks[s] += t
            if s == 3:  # slot 3 alone, replayed through forward: the same logits
                assert rel_err(row, gpu.forward(toks[3], 0)[-1]) < tol
    # a step of one decode row (the server's step when one sequence runs), then of one prompt chunk
    for entries in ([(2, [9], len(toks[2]))], [(1, prompts[2], len(toks[1]))]):
        row = _check(gpu, cpu, entries, tol)[0]
        s, t, _ = entries[0]
        toks[s] += list(map(int, t))
        assert rel_err(row, gpu.forward(toks[s], 0)[-1]) < tol


def test_slot_reuse_and_copy(engines):
    gpu, cpu, tol = engines
    rng = np.random.default_rng(9)
    a, b = rng.integers(0, gpu.vocab_size, 24), rng.integers(0, gpu.vocab_size, 30)
    _check(gpu, cpu, [(0, a, 0), (1, b, 0)], tol)
    # slot 1 reused from position 10 for another continuation (positions past it are overwritten)
    _check(gpu, cpu, [(1, a[10:], 10), (0, [3], 24)], tol)
    # a shared prefix: slot 0's first 20 positions into slots 2 and 3, which go on from there
    for dst in (2, 3):
        gpu.copy_slot(0, dst, 20)
        cpu.copy_slot(0, dst, 20)
    _check(gpu, cpu, [(2, b[:5], 20), (3, [4], 20), (0, [5], 25)], tol)
    gpu.copy_slot(2, 2, 20)  # onto itself: nothing to do
    gpu.copy_slot(2, 0, 0)


@pytest.mark.parametrize("kv", ["f32", "f16"])
def test_one_row_step_is_the_decode_step_over_the_slot(tiny_model, monkeypatch, kv):
    """A step of one decode row (or of a few, one token per sequence: QORA_VK_SLOT_DECODE) runs the
    single-sequence decode step over that slot's cache (its own buffers aliasing the slots' cache): the
    batched path's logits within rounding, every slot, the other slots untouched, after a copy_slot too."""
    monkeypatch.setenv("QORA_KV", kv)
    monkeypatch.setenv("QORA_VK_ALLOW_CPU", "1")
    monkeypatch.setenv("QORA_VK_COOPMAT", "0")
    monkeypatch.setenv("QORA_VK_PROFILE", "1")  # decode steps show in profile(), batched ones do not
    qf = read_qora(tiny_model("tiny-llama", "f16"))
    out = {}
    try:
        for mode in ("1", "0"):
            monkeypatch.setenv("QORA_VK_SLOT_DECODE", mode)
            gpu = eng.make_engine(qf, "gpu", max_seq_len=64)
            gpu.open_slots(3, 40)  # 40 positions: slots padded to 256-byte boundaries
            p = np.random.default_rng(4).integers(0, gpu.vocab_size, 20)
            gpu.forward_batch([(0, p[:9], 0), (1, p, 0), (2, p[:3], 0)])
            rows = [gpu.forward_batch([(s, [5 + s], n)])[0] for s, n in ((1, 20), (0, 9), (2, 3), (1, 21))]
            gpu.copy_slot(1, 2, 22)
            rows += [gpu.forward_batch([(2, [7], 22)])[0], gpu.forward_batch([(0, [8], 10)])[0]]
            # a step of decode rows only (one token each, any order): each row its slot's decode step
            rows += gpu.forward_batch([(1, [9], 22), (2, [4], 23), (0, [6], 11)])
            out[mode] = rows
            kernels, _ = gpu.profile()
            assert ("attention" in kernels) == (mode == "1")  # which path the one-row steps took
            gpu.close()
    finally:
        qf.close()
    tol = 1e-4 if kv == "f32" else KV_TOL[kv]
    for a, b in zip(out["1"], out["0"], strict=True):
        assert rel_err(a, b) < tol


def test_several_entries_of_one_slot_in_one_step(engines):
    gpu, cpu, tol = engines
    p = np.random.default_rng(2).integers(0, gpu.vocab_size, 12)
    out = _check(gpu, cpu, [(0, p[:5], 0), (0, p[5:], 5), (1, p, 0)], tol)
    assert rel_err(out[1], out[2]) < tol  # the same sequence, in two entries or one


def test_bad_input_and_preflight(engines):
    gpu, _, _ = engines
    with pytest.raises(QoraError, match="slot 4 is not in"):
        gpu.forward_batch([(4, [1], 0)])
    with pytest.raises(QoraError, match="do not fit"):
        gpu.forward_batch([(0, [1, 2], 95)])
    with pytest.raises(QoraError, match="at least one entry"):
        gpu.forward_batch([])
    with pytest.raises(QoraError):
        gpu.forward_batch([(0, [gpu.vocab_size], 0)])
    with pytest.raises(QoraError, match="cannot copy"):
        gpu.copy_slot(0, 4, 3)
    with pytest.raises(QoraError, match="n_slots must be"):
        gpu.open_slots(0)
    # more than the device has left: the pre-flight says what fits, and the old slots stay usable
    free = gpu.slot_memory()
    gpu.device_info = dict(gpu.device_info, vram_budget=(gpu.vram_bytes + 200_000) / 0.9)
    with pytest.raises(QoraError, match="sequences of .* tokens fit|lower the number"):
        gpu.open_slots(200, 96)
    gpu.device_info = dict(gpu.device_info, vram_budget=(gpu.vram_bytes + free) / 0.9)
    assert len(gpu.forward_batch([(0, [1, 2, 3], 0)])) == 1
    # the device refusing the allocation (as when another process took the memory): a clear error
    gpu._ctx.set_fail_alloc(True)
    try:
        with pytest.raises(QoraError, match="cannot open 3 sequences"):
            gpu.open_slots(3)
    finally:
        gpu._ctx.set_fail_alloc(False)
    with pytest.raises(QoraError, match="open_slots first"):  # the old slots went with the failed attempt
        gpu.forward_batch([(0, [1], 0)])
    assert gpu.open_slots(2) == 2 and len(gpu.forward_batch([(1, [1, 2], 0)])) == 1
    gpu.close()
    with pytest.raises(QoraError, match="closed"):
        gpu.forward_batch([(0, [1], 0)])
    with pytest.raises(QoraError, match="closed"):
        gpu.open_slots(2)


def test_device_loss_mid_batch_goes_on_on_the_cpu(tiny_model, monkeypatch):
    """A device lost during a batched step: the slots' tokens are replayed on the CPU engine, and the
    step (and the next ones) give the CPU's logits."""
    monkeypatch.setenv("QORA_KV", "f32")
    monkeypatch.setenv("QORA_VK_ALLOW_CPU", "1")
    monkeypatch.setenv("QORA_VK_FAIL", "run:2")
    qf = read_qora(tiny_model("tiny-smollm3", "q8"))
    gpu = eng.make_engine(qf, "gpu", max_seq_len=64)
    monkeypatch.delenv("QORA_VK_FAIL")
    cpu = eng.make_engine(qf, "cpu", threads=2, max_seq_len=64)
    try:
        gpu.open_slots(2)
        cpu.open_slots(2)
        p = np.random.default_rng(1).integers(0, gpu.vocab_size, 10)
        for entries in ([(0, p, 0)], [(1, p[:4], 0), (0, [3], 10)], [(1, [5], 4), (0, [6], 11)]):
            got, want = gpu.forward_batch(entries), cpu.forward_batch(entries)
            assert all(rel_err(g, w) < TOL["q8"] for g, w in zip(got, want, strict=True))
        assert gpu.device == "cpu"
    finally:
        gpu.close()
        cpu.close()
        qf.close()
