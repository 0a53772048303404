"""The Vulkan attention kernels against NumPy: decode (attn_decode.comp, split-K over chunks of the
context, merged by the last chunk; attn_decode2.comp, clusters of lanes per cached position, short
chunks merged in two levels) and prefill (attn_prefill.comp, flash attention over tiles of
queries and keys), at context lengths on and around the chunk and tile edges, GQA groups of
several sizes, f16 and f32 caches. CI runs these on lavapipe; the lengths stay a few thousand."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from _helpers_vulkan import DEVICE, needs_gpu
from test_vulkan import act_layout, rel_err, run_quant, unpack_act

from qora.engine import vulkan


def ref_attention(q, kc, vc, start, n_heads, n_kv, hd):
    """Causal GQA attention in float64: q (n_tok, >= n_heads hd) at positions start.. over the cache."""
    n_tok = q.shape[0]
    K, V = kc.astype(np.float64), vc.astype(np.float64)
    out = np.zeros((n_tok, n_heads * hd))
    for t in range(n_tok):
        n = start + t + 1
        for h in range(n_heads):
            g = h // (n_heads // n_kv)
            s = K[:n, g * hd : (g + 1) * hd] @ q[t, h * hd : (h + 1) * hd].astype(np.float64) / np.sqrt(hd)
            p = np.exp(s - s.max())
            out[t, h * hd : (h + 1) * hd] = (p / p.sum()) @ V[:n, g * hd : (g + 1) * hd]
    return out


def _cache(r, n_pos, kv_dim, kv):
    return r.standard_normal((n_pos, kv_dim)).astype(kv), r.standard_normal((n_pos, kv_dim)).astype(kv)


def att2_cluster(hd):
    """attn_decode2's lanes per cached position as qvk_att2_cluster picks them on DEVICE."""
    c = 1
    while c < hd // 8:
        c *= 2
    return min(c, DEVICE["subgroup_size"])


MB = 16  # attn_decode2: partials per merge


def decode_buffers(n_heads, hd, hg, ch, kernel):
    """(partials, done counters) of the decode kernel: attn_decode (head, chunk) x (hd + 2) and a
    count per head group; attn_decode2 (head group, chunk, then block) x (hg hd + 16) and counts per
    head group and per block."""
    groups = n_heads // hg
    if kernel == 1:
        return np.zeros(groups * ch * hg * (hd + 2), np.float32), np.zeros(groups, np.uint32)
    return np.zeros(groups * (ch + MB) * (hg * hd + 16), np.float32), np.zeros(groups * (1 + MB), np.uint32)


def decode_spec(threads, kv16, hd, hg, ch, cmin, kernel):
    """(shader, specialization) of decode kernel 1 or 2."""
    spec = [threads, int(kv16), hd, hg, ch, cmin, 1]
    return ("attn_decode", spec) if kernel == 1 else ("attn_decode2", spec + [att2_cluster(hd)])


def run_decode(ctx, q, kc, vc, n_pos, n_heads, n_kv, hd, hg, ch, cmin, threads=128, kv16=True, kernel=1):
    """attn_decode (kernel 1) or attn_decode2 (2) for one token at position n_pos - 1: (output, act
    buffer, act half, done, cnt)."""
    q_dim = n_heads * hd
    out = np.zeros(q_dim, np.float32)
    params = np.array([n_pos - 1, 1, 0, 0], np.uint32)
    w, half = act_layout(q_dim)
    push = struct.pack("<7I", n_heads, n_kv, hd, q_dim, q_dim, half, w)
    part, done = decode_buffers(n_heads, hd, hg, ch, kernel)
    act, cnt = np.zeros(2 * half, np.uint32), np.zeros(w // 32 + 8, np.uint32)
    bufs = [part, q, None, out, kc, vc, params, done, act, cnt]
    name, spec = decode_spec(threads, kv16, hd, hg, ch, cmin, kernel)
    ctx.run_kernel(name, spec, bufs, push, n_heads // hg, ch)
    return out, act, half, done, cnt


def check_decode(ctx, n_pos, n_heads, n_kv, hd, hg, ch, cmin, threads, kv, kernel):
    """One decode step on a random cache against NumPy, its counters reset, its output quantized as
    the quant kernel does it."""
    r = np.random.default_rng(n_pos * 7 + hd)
    kc, vc = _cache(r, n_pos, n_kv * hd, kv)
    q = r.standard_normal(n_heads * hd).astype(np.float32)
    out, act, half, done, cnt = run_decode(
        ctx, q, kc, vc, n_pos, n_heads, n_kv, hd, hg, ch, cmin, threads, kv == np.float16, kernel
    )
    assert not done.any() and not cnt.any()  # every merge reset its counter for the next step
    ref = ref_attention(q[None], kc, vc, n_pos - 1, n_heads, n_kv, hd)[0]
    assert rel_err(out, ref) < 1e-5
    # the output quantized for the next product, exactly as the quant kernel does it
    q_dim = n_heads * hd
    for got, want in zip(unpack_act(act, q_dim, base=half), unpack_act(run_quant(ctx, out), q_dim), strict=True):
        assert np.array_equal(got, want)


@needs_gpu
@pytest.mark.parametrize(
    "n_pos,n_heads,n_kv,hd,hg,ch,cmin,threads,kv",
    [
        (1, 4, 2, 16, 2, 4, 256, 128, np.float16),  # one position: one chunk, no merge
        (2, 6, 2, 32, 3, 8, 0, 64, np.float32),  # two chunks of one tile
        (255, 4, 1, 64, 4, 16, 256, 128, np.float16),  # one chunk, two tiles, the second short
        (256, 4, 1, 64, 2, 16, 256, 128, np.float16),  # exactly one chunk
        (257, 4, 1, 64, 4, 16, 256, 128, np.float16),  # two chunks, the second with one position
        (257, 8, 2, 128, 4, 64, 256, 128, np.float32),
        (1000, 16, 4, 128, 4, 8, 64, 128, np.float16),  # 8 chunks of 128
        (1000, 6, 3, 32, 1, 256, 0, 64, np.float16),  # head by head, many short chunks
        (3001, 9, 3, 64, 3, 32, 256, 128, np.float16),  # SmolLM2's GQA group of 3
        (3001, 2, 2, 256, 1, 5, 256, 128, np.float16),  # head_dim 256: 32 octets, 4 groups
        (700, 8, 1, 8, 8, 7, 32, 64, np.float32),  # head_dim 8: 1 octet, 64 groups; 8 heads per workgroup
        (65536, 2, 1, 8, 2, 256, 256, 128, np.float16),  # SmolLM3's full context: 256 chunks of 256 merged
    ],
)
@pytest.mark.parametrize("kernel", [1, 2])
def test_attn_decode(ctx, n_pos, n_heads, n_kv, hd, hg, ch, cmin, threads, kv, kernel):
    check_decode(ctx, n_pos, n_heads, n_kv, hd, hg, ch, cmin, threads, kv, kernel)


@needs_gpu
@pytest.mark.parametrize(
    "n_pos,n_heads,n_kv,hd,hg,ch,cmin,threads,kv",
    [
        (64, 16, 4, 128, 4, 8, 8, 128, np.float16),  # a short context over 8 chunks: one merge
        (16 * 40, 4, 1, 128, 4, 16, 40, 128, np.float16),  # exactly one block of 16 chunks
        (17 * 40, 4, 1, 128, 4, 17, 40, 128, np.float16),  # 17 chunks: a second block of one, two levels
        (4096, 16, 4, 128, 4, 128, 32, 128, np.float16),  # the 3B's default at depth 4096: 8 blocks
        (4095, 16, 4, 128, 4, 64, 32, 256, np.float16),  # 256 threads a workgroup
        (9200, 4, 2, 64, 2, 256, 1, 64, np.float32),  # 256 chunks of 36 (the last of 20): 16 whole blocks
        (8999, 2, 1, 64, 2, 250, 1, 64, np.float16),  # 250 chunks, a ragged last block
        (500, 4, 2, 96, 2, 8, 32, 128, np.float16),  # head_dim 96: lanes of the cluster past the row idle
        (333, 4, 2, 16, 2, 9, 5, 32, np.float32),  # head_dim 16: clusters of 2
        (2000, 2, 1, 256, 1, 200, 3, 128, np.float16),  # head_dim 256, 4 units a lane on 8-lane subgroups
    ],
)
def test_attn_decode2(ctx, n_pos, n_heads, n_kv, hd, hg, ch, cmin, threads, kv):
    """attn_decode2's own edges: the two merge levels (one block, a block of one, many ragged
    blocks), short chunks, head sizes that leave lanes idle or give a lane several units."""
    check_decode(ctx, n_pos, n_heads, n_kv, hd, hg, ch, cmin, threads, kv, 2)


@needs_gpu
@pytest.mark.parametrize("kernel", [1, 2])
def test_attn_decode_repeated_steps(ctx, kernel):
    """The counters a merge resets serve the next step: steps on the same buffers, growing (one
    pass, one merge level, two levels)."""
    n_heads, n_kv, hd, hg, ch, cmin = 4, 2, 32, 2, 40, 16
    r = np.random.default_rng(5)
    kc, vc = _cache(r, 900, n_kv * hd, np.float16)
    q_dim = n_heads * hd
    w, half = act_layout(q_dim)
    part, done = decode_buffers(n_heads, hd, hg, ch, kernel)
    act, cnt = np.zeros(2 * half, np.uint32), np.zeros(w // 32 + 8, np.uint32)
    name, spec = decode_spec(64, 1, hd, hg, ch, cmin, kernel)
    for n_pos in (10, 300, 301, 900, 17, 640):
        q = r.standard_normal(q_dim).astype(np.float32)
        out = np.zeros(q_dim, np.float32)
        params = np.array([n_pos - 1, 1, 0, 0], np.uint32)
        push = struct.pack("<7I", n_heads, n_kv, hd, q_dim, q_dim, half, w)
        ctx.run_kernel(name, spec, [part, q, None, out, kc, vc, params, done, act, cnt], push, n_heads // hg, ch)
        assert not done.any()
        assert rel_err(out, ref_attention(q[None], kc[:n_pos], vc[:n_pos], n_pos - 1, n_heads, n_kv, hd)[0]) < 1e-5


def flash_shape(hd, hg, max_shared=32768):
    """(threads, BK, TS, tokens per workgroup) as qvk_flash_shape picks them."""
    ts = 1 if hd <= 64 else 2 if hd <= 128 else 4
    rows = 32 if ts == 4 else 64
    bq = max(rows // hg, 1)
    threads = bq * hg * ts
    bk = min(32, (min(max_shared, 49152) - 256) // (8 * hd + 4 * threads))
    return threads, (bk & ~7 if bk > 8 else bk), ts, bq


@needs_gpu
@pytest.mark.parametrize(
    "start,n_tok,n_heads,n_kv,hd,hg,bk,kv",
    [
        (0, 1, 4, 2, 16, 2, None, np.float16),
        (0, 2, 4, 2, 16, 2, 4, np.float32),
        (0, 255, 4, 1, 64, 4, None, np.float16),  # TS 1
        (1, 256, 6, 2, 32, 3, None, np.float16),  # 21 tokens per workgroup (63 rows)
        (0, 257, 8, 2, 128, 4, None, np.float16),  # TS 2, partial last tiles
        (200, 57, 8, 2, 128, 4, 8, np.float32),  # after a cached prefix
        (0, 1000, 4, 1, 128, 4, None, np.float16),
        (2990, 11, 2, 2, 256, 1, None, np.float16),  # TS 4, a long prefix, one workgroup of tokens
        (5, 70, 16, 2, 8, 8, 3, np.float32),  # head_dim 8, 8 heads per workgroup, odd key tiles
        (65500, 36, 2, 1, 8, 2, None, np.float16),  # the end of a 65,536-position context
    ],
)
def test_attn_prefill(ctx, start, n_tok, n_heads, n_kv, hd, hg, bk, kv):
    r = np.random.default_rng(start + n_tok + hd)
    n_pos, q_dim = start + n_tok, n_heads * hd
    kc, vc = _cache(r, n_pos, n_kv * hd, kv)
    ld_q = q_dim + 2 * n_kv * hd  # q rows inside qkv rows
    q = r.standard_normal((n_tok, ld_q)).astype(np.float32)
    out = np.zeros((n_tok, q_dim), np.float32)
    threads, bk_def, ts, bq = flash_shape(hd, hg, DEVICE["max_shared_memory"])
    params = np.array([start, n_tok, 0, 0], np.uint32)
    push = struct.pack("<7I", n_heads, n_kv, hd, ld_q, q_dim, 0, 0)
    spec = [threads, int(kv == np.float16), hd, hg, bk or bk_def, ts]
    ctx.run_kernel("attn_prefill", spec, [None, q, None, out, kc, vc, params], push, n_heads // hg, -(-n_tok // bq))
    assert rel_err(out, ref_attention(q, kc, vc, start, n_heads, n_kv, hd)) < 1e-5


@pytest.fixture(scope="module")
def tiny_long(tmp_path_factory):
    """The tiny SmolLM3 fixture with a 4,096-position context (the fixture's own is 256)."""
    import json
    import shutil
    from pathlib import Path

    from qora.convert import convert

    src = Path(__file__).parent / "fixtures" / "tiny-smollm3"
    folder = tmp_path_factory.mktemp("tiny-long")
    shutil.copytree(src, folder / "model")
    cfg = json.loads((folder / "model" / "config.json").read_text())
    cfg["max_position_embeddings"] = 4096
    (folder / "model" / "config.json").write_text(json.dumps(cfg))
    # f16 weights: the products take float inputs, so the two engines differ only by float rounding
    # (with Q4/Q8 weights a Q8 activation one rounding step apart grows to ~1 % of the logits over
    # thousands of positions, with the former attention kernels as with these)
    return convert(folder / "model", folder / "tiny-long-f16.qora", quant="f16", progress=False)


@needs_gpu
@pytest.mark.parametrize("kernel,splits,threads", [(1, 16, 0), (2, 0, 64)])
def test_tiny_model_long_prompt_matches_cpu(tiny_long, monkeypatch, kernel, splits, threads):
    """A 3,000-token prompt (flash-attention prefill over several submissions, a long cached prefix
    for the later ones), then decode steps whose context spans many chunks (split-K and its merge)
    give the CPU engine's logits (f32 KV cache: the same float steps), with either decode kernel."""
    import qora

    monkeypatch.setenv("QORA_KV", "f32")
    monkeypatch.setenv("QORA_VK_COOPMAT", "0")  # integer prefill products, as the CPU's
    # kernel 1: 3,000 positions in 12 chunks of 256; kernel 2 (where the device has subgroup shuffles,
    # as lavapipe does): its default, 94 chunks of 32 for the fixture's 2 head groups (six blocks
    # merged in two levels), in workgroups of 64 threads
    assert kernel == 1 or DEVICE["subgroup_shuffle"]
    monkeypatch.setenv("QORA_VK_ATT_KERNEL", str(kernel))
    monkeypatch.setenv("QORA_VK_ATT_SPLITS", str(splits))
    monkeypatch.setenv("QORA_VK_ATT_THREADS", str(threads))
    toks = np.random.default_rng(11).integers(0, 400, 3004).tolist()
    with (
        qora.load(tiny_long, device="gpu", max_seq_len=3072) as g,
        qora.load(tiny_long, device="cpu", max_seq_len=3072) as c,
    ):
        assert rel_err(g.engine.forward(toks[:3000], 0), c.engine.forward(toks[:3000], 0)) < 1e-4
        for i in range(3000, 3004):
            assert rel_err(g.engine.forward([toks[i]], i), c.engine.forward([toks[i]], i)) < 1e-4


@needs_gpu
def test_vram_preflight_says_what_fits(tiny_long, monkeypatch):
    """A context whose KV cache does not fit the device budget is refused with the KV cache's share
    and the longest context that fits, which then loads."""
    import re

    import qora
    from qora.errors import QoraError

    monkeypatch.setenv("QORA_KV", "f32")
    monkeypatch.setattr(vulkan, "_VRAM_FRACTION", 2.5e-3 * (2 << 30) / DEVICE["vram_budget"])  # ~5 MB
    with pytest.raises(QoraError, match=r"of KV cache\), .* available; a \d+-token context fits") as e:
        qora.load(tiny_long, device="gpu", max_seq_len=4096)
    fits = int(re.search(r"a (\d+)-token context fits", str(e.value)).group(1))
    assert 256 < fits < 4096
    with qora.load(tiny_long, device="gpu", max_seq_len=fits) as m:
        assert m.engine.device == "vulkan" and "of it the f32 KV cache" in m.engine.notes[0]
    with pytest.raises(QoraError, match="context fits"):
        qora.load(tiny_long, device="gpu", max_seq_len=fits + 1)


@needs_gpu
def test_yarn_context_matches_cpu(tiny_long, monkeypatch):
    """With YaRN (factor 2: the context doubled, frequencies and the attention factor changed) the
    GPU gives the CPU engine's logits, in prefill and in decode."""
    import qora

    monkeypatch.setenv("QORA_KV", "f32")
    monkeypatch.setenv("QORA_VK_COOPMAT", "0")  # integer prefill products, as the CPU's
    toks = np.random.default_rng(13).integers(0, 400, 40).tolist()
    with (
        qora.load(tiny_long, device="gpu", max_seq_len=8192, rope_scaling="yarn") as g,
        qora.load(tiny_long, device="cpu", max_seq_len=8192, rope_scaling="yarn") as c,
    ):
        assert g.engine.max_seq_len == c.engine.max_seq_len == 8192
        assert rel_err(g.engine.forward(toks[:36], 0), c.engine.forward(toks[:36], 0)) < 1e-4
        for i in range(36, 40):
            assert rel_err(g.engine.forward([toks[i]], i), c.engine.forward([toks[i]], i)) < 1e-4
