"""The Q8_0 KV cache (`--kv-type q8`): K and V rows stored as llama.cpp's Q8_0 blocks (32 int8 and one
f16 scale, 34 bytes), half of an f16 cache. Attention over such a cache against NumPy (K/V quantized
in NumPy, then exact attention), bit for bit on every ISA path and thread count; the tiny model's
logits with a q8 cache against an f16 one; the engines' flag, pre-flight and reports."""

from __future__ import annotations

import numpy as np
import pytest
from test_kernels import ISA_NAMES, ISAS, ref_attention, ref_attention_bits, ref_quantize_q8, rng

from qora._core import _cpu

try:
    from _helpers_vulkan import needs_gpu
except ImportError:  # a build without the Vulkan extension
    needs_gpu = pytest.mark.skip(reason="no Vulkan backend")

F32 = np.float32


def q8_cache(x):
    """(raw Q8_0 rows as uint8, the float32 values they hold) of a (n_pos, width) float array."""
    n_pos, width = x.shape
    d, q = ref_quantize_q8(x.reshape(-1))
    blocks = np.empty((d.shape[0], 34), np.uint8)
    blocks[:, :2] = d.view(np.uint8).reshape(-1, 2)
    blocks[:, 2:] = q.view(np.uint8)
    vals = (q.astype(F32) * d.astype(F32)[:, None]).reshape(n_pos, width)  # exact: 11 x 8 bits
    return blocks.reshape(n_pos, width // 32 * 34), vals


@pytest.mark.parametrize("n_pos", [1, 31, 255, 256, 257, 1000, 4097])
@pytest.mark.parametrize("group,hd", [(1, 64), (4, 128), (3, 32), (2, 96), (2, 256)])
def test_q8_attention_same_bits_as_numpy(n_pos, group, hd):
    """Decode attention over a Q8_0 cache (one chunk, ragged last chunks, many): every ISA path and
    thread count gives the NumPy model of common.h's order on the dequantized values bit for bit,
    which is within float tolerance of exact (float64) attention on them."""
    r = rng()
    n_kv = 2
    n_heads = group * n_kv
    q = (r.standard_normal(n_heads * hd) * 2).astype(F32)
    kraw, kv = q8_cache((r.standard_normal((n_pos, n_kv * hd)) * 2).astype(F32))
    vraw, vv = q8_cache(r.standard_normal((n_pos, n_kv * hd)).astype(F32))
    want = ref_attention_bits(q, kv, vv, n_heads, n_kv, hd)
    np.testing.assert_allclose(want, ref_attention(q, kv, vv, n_heads, n_kv, hd), rtol=1e-4, atol=1e-5)
    for isa in ISAS:
        for threads in (1, 2, 3):
            got = _cpu.attention(q, kraw, vraw, n_heads, n_kv, hd, isa, threads, "q8")
            np.testing.assert_array_equal(got, want, err_msg=f"{ISA_NAMES[isa]} threads={threads}")


@pytest.mark.parametrize("pos0,n", [(0, 1), (0, 16), (5, 3), (255, 2), (256, 16), (500, 13), (8990, 10)])
@pytest.mark.parametrize("group,hd", [(1, 64), (4, 128)])
def test_q8_prefill_attention_same_bits_as_decode(pos0, n, group, hd):
    """n queries at once over a Q8_0 cache (tiles, the masked diagonal, lengths to 9,000): each query's
    output is one decode step at its position bit for bit, on every path and thread count."""
    r = rng()
    n_kv = 2
    n_heads, n_pos = group * n_kv, pos0 + n
    q = (r.standard_normal((n, n_heads * hd)) * 2).astype(F32)
    kraw, kv = q8_cache((r.standard_normal((n_pos, n_kv * hd)) * 2).astype(F32))
    vraw, vv = q8_cache(r.standard_normal((n_pos, n_kv * hd)).astype(F32))
    t = n - 1
    np.testing.assert_allclose(
        _cpu.attention(q[t], kraw, vraw, n_heads, n_kv, hd, ISAS[0], 1, "q8"),
        ref_attention(q[t], kv, vv, n_heads, n_kv, hd),
        rtol=1e-4,
        atol=1e-5,
    )
    for isa in ISAS:
        want = np.stack(
            [_cpu.attention(q[t], kraw[: pos0 + t + 1], vraw[: pos0 + t + 1], n_heads, n_kv, hd, isa, 1, "q8")
             for t in range(n)]
        )  # fmt: skip
        for threads in (1, 3):
            got = _cpu.attention(q.reshape(-1), kraw, vraw, n_heads, n_kv, hd, isa, threads, "q8", n)
            np.testing.assert_array_equal(got.reshape(n, -1), want, err_msg=f"{ISA_NAMES[isa]} threads={threads}")


def test_q8_attention_rejects_bad_rows():
    q = np.zeros(64, F32)
    with pytest.raises(ValueError, match="34-byte blocks"):
        _cpu.attention(q, np.zeros((3, 33), np.uint8), np.zeros((3, 33), np.uint8), 1, 1, 64, 0, 1, "q8")
    with pytest.raises(ValueError, match="KV cache type"):
        _cpu.attention(q, np.zeros((3, 64), F32), np.zeros((3, 64), F32), 1, 1, 64, 0, 1, "q4")


# ---- the engines with a q8 cache ----
@pytest.fixture(scope="module")
def q8_model(tmp_path_factory):
    """A tiny random Llama with heads of 32 (Q8_0 blocks need whole blocks per head), 4,096 positions."""
    from _helpers_convert import make_hf_model

    from qora.convert import convert

    d = tmp_path_factory.mktemp("kv-q8")
    make_hf_model(
        d / "hf", n_layers=3, head_dim=32, n_heads=4, n_kv_heads=2, hf_extra={"max_position_embeddings": 4096}
    )
    return convert(d / "hf", d / "kvq8-q8.qora", quant="q8", progress=False)


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


# of the largest logit, with float activations (8-bit ones add their own rounding flips: f16 vs f32 KV
# alone then differs by 1.6 %): measured 0.68 % at 1,500 positions on this model, f16 vs f32 KV 0.045 %
KV_Q8_LOGIT_TOL = 2e-2


def test_q8_cache_logits_near_f16(q8_model, monkeypatch):
    """A 1,500-token prompt and decode steps after it: logits with a q8 cache within KV_Q8_LOGIT_TOL of
    an f16 cache's; the q8 engine's prefill gives its own decode steps bit for bit."""
    import qora

    monkeypatch.setenv("QORA_PRECISION", "f32")
    ids = np.random.default_rng(3).integers(3, 300, 1504)
    out = {}
    for kv in ("f16", "q8"):
        with qora.load(q8_model, device="cpu", threads=2, max_seq_len=2048, kv_type=kv) as m:
            assert m.engine.kv_dtype == kv
            pre = m.engine.forward(ids[:1500], 0, all_logits=True)
            dec = np.concatenate([m.engine.forward(ids[i : i + 1], i) for i in range(1500, 1504)])
            out[kv] = np.concatenate([pre[-64:], dec])
            if kv == "q8":
                again = m.engine.forward(ids, 0, all_logits=True)[-4:]
                np.testing.assert_array_equal(again, dec)
    assert rel(out["q8"], out["f16"]) < KV_Q8_LOGIT_TOL
    assert not np.array_equal(out["q8"], out["f16"])  # the cache really is another type


def test_q8_cache_batched_step_same_bits(q8_model):
    """The server's batched step over q8 slots gives each sequence's own forward bit for bit, and a
    copied q8 prefix serves a second sequence."""
    import qora

    r = np.random.default_rng(5)
    a, b = r.integers(3, 300, 40), r.integers(3, 300, 33)
    with qora.load(q8_model, device="cpu", threads=2, max_seq_len=256, kv_type="q8") as m:
        e = m.engine
        want_a, want_b = e.forward(a, 0)[-1], e.forward(b, 0)[-1]
        assert e.open_slots(2, 128) == 2
        e.forward_batch([(0, a[:-1], 0)])
        e.copy_slot(0, 1, 20)
        got = e.forward_batch([(0, a[-1:], len(a) - 1), (1, a[20:], 20)])
        np.testing.assert_array_equal(got[0], want_a)
        np.testing.assert_array_equal(got[1], want_a)
        np.testing.assert_array_equal(e.forward_batch([(1, b, 0)])[0], want_b)


def test_kv_type_policy(q8_model, tiny_model, monkeypatch):
    """--kv-type / kv_type= / QORA_KV choose the cache; q8 needs heads of whole 32-value blocks; the
    RAM pre-flight counts a q8 cache at 34 bytes per 32 values."""
    import qora
    from qora.engine import base
    from qora.errors import QoraError

    monkeypatch.setenv("QORA_KV", "q8")
    with qora.load(q8_model, device="cpu", max_seq_len=64) as m:
        assert m.engine.kv_dtype == "q8"
    with qora.load(q8_model, device="cpu", max_seq_len=64, kv_type="f32") as m:  # the argument wins
        assert m.engine.kv_dtype == "f32"
    monkeypatch.delenv("QORA_KV")
    with pytest.raises(QoraError, match="multiple of 32; this model's is 16"):
        qora.load(tiny_model("tiny-smollm3", "q8"), device="cpu", kv_type="q8")
    with pytest.raises(QoraError, match="not one of f32, f16, q8"):
        qora.load(q8_model, device="cpu", kv_type="q4")
    cfg = {"n_layers": 36, "n_kv_heads": 4, "head_dim": 128, "n_heads": 16}
    kv = {t: base.context_bytes_per_token(cfg, t) for t in base.KV_TYPES}
    per_token_kv = 2 * 36 * 4 * 128  # values of K and V per token
    assert kv["f16"] - kv["q8"] == pytest.approx(per_token_kv * (2 - 34 / 32))
    assert kv["f32"] - kv["f16"] == pytest.approx(per_token_kv * 2)


def test_demo_readme_prompt_unchanged_with_q8_cache(demo_model):
    """The README's first command answers the same text, token for token, with a q8 cache."""
    import qora

    texts = {}
    for kv in ("f16", "q8"):
        with qora.load(demo_model, device="cpu", threads=2, max_seq_len=512, kv_type=kv) as m:
            texts[kv] = str(m.generate("What is the capital of France?", max_tokens=40, greedy=True))
    assert "Paris" in texts["q8"]
    assert texts["q8"] == texts["f16"]


# ---- the Vulkan backend's q8 cache (kvq8.glsl: per position the int8 values, then the f16 scales) ----
def gpu_q8_rows(x):
    """(the device's Q8_0 rows as uint32 words, the float32 values they hold) of (n_pos, kv_dim) floats."""
    n_pos, kv_dim = x.shape
    nb = kv_dim // 32
    words = (kv_dim // 4 + (nb + 1) // 2 + 3) & ~3
    d, q = ref_quantize_q8(x.reshape(-1))
    rows = np.zeros((n_pos, words * 4), np.uint8)
    rows[:, :kv_dim] = q.reshape(n_pos, kv_dim).view(np.uint8)
    rows[:, kv_dim : kv_dim + 2 * nb] = d.reshape(n_pos, nb).view(np.uint8)
    vals = (q.astype(F32) * d.astype(F32)[:, None]).reshape(n_pos, kv_dim)
    return rows.view(np.uint32).reshape(-1), vals


@needs_gpu
@pytest.mark.parametrize(
    "n_pos,n_heads,n_kv,hd,hg,ch,cmin",
    [
        (1, 4, 2, 32, 2, 8, 64),
        (257, 4, 1, 64, 4, 16, 256),  # two chunks, the second with one position
        (1000, 6, 3, 64, 2, 16, 64),  # SmolLM2's GQA group of 3, 3 KV heads (odd block count per row)
        (3001, 8, 2, 128, 4, 32, 256),
        (1500, 2, 1, 256, 2, 7, 128),
    ],
)
@pytest.mark.parametrize("kernel", [1, 2])
def test_vulkan_attn_decode_q8(ctx, n_pos, n_heads, n_kv, hd, hg, ch, cmin, kernel):
    """Split-K decode attention (both kernels) over a Q8_0 cache (one chunk, ragged chunks, many)
    against exact attention on the dequantized values."""
    from test_vulkan_attention import ref_attention as ref_gpu
    from test_vulkan_attention import run_decode

    r = np.random.default_rng(n_pos + hd)
    kc, kv = gpu_q8_rows(r.standard_normal((n_pos, n_kv * hd)).astype(F32))
    vc, vv = gpu_q8_rows(r.standard_normal((n_pos, n_kv * hd)).astype(F32))
    q = r.standard_normal(n_heads * hd).astype(F32)
    out, _, _, done, cnt = run_decode(ctx, q, kc, vc, n_pos, n_heads, n_kv, hd, hg, ch, cmin, 128, 2, kernel)
    assert not done.any() and not cnt.any()
    ref = ref_gpu(q[None], kv, vv, n_pos - 1, n_heads, n_kv, hd)[0]
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5


@needs_gpu
@pytest.mark.parametrize(
    "start,n_tok,n_heads,n_kv,hd,hg",
    [
        (0, 1, 4, 2, 32, 2),
        (0, 257, 8, 2, 128, 4),
        (1, 256, 6, 3, 64, 2),
        (200, 57, 4, 1, 64, 4),
        (2990, 11, 2, 2, 256, 1),
    ],
)
def test_vulkan_attn_prefill_q8(ctx, start, n_tok, n_heads, n_kv, hd, hg):
    """Flash-attention prefill staging Q8_0 tiles (ragged tiles, a cached prefix) against exact attention."""
    import struct

    from _helpers_vulkan import DEVICE
    from test_vulkan_attention import flash_shape
    from test_vulkan_attention import ref_attention as ref_gpu

    r = np.random.default_rng(start + n_tok + hd)
    n_pos, q_dim = start + n_tok, n_heads * hd
    kc, kv = gpu_q8_rows(r.standard_normal((n_pos, n_kv * hd)).astype(F32))
    vc, vv = gpu_q8_rows(r.standard_normal((n_pos, n_kv * hd)).astype(F32))
    ld_q = q_dim + 2 * n_kv * hd
    q = r.standard_normal((n_tok, ld_q)).astype(F32)
    out = np.zeros((n_tok, q_dim), F32)
    threads, bk, ts, bq = flash_shape(hd, hg, DEVICE["max_shared_memory"])
    params = np.array([start, n_tok, 0, 0], np.uint32)
    push = struct.pack("<7I", n_heads, n_kv, hd, ld_q, q_dim, 0, 0)
    spec = [threads, 2, hd, hg, bk, ts]
    ctx.run_kernel("attn_prefill", spec, [None, q, None, out, kc, vc, params], push, n_heads // hg, -(-n_tok // bq))
    ref = ref_gpu(q, kv, vv, start, n_heads, n_kv, hd)
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5


@needs_gpu
@pytest.mark.parametrize("use_rope,n_kv,hd", [(1, 2, 32), (0, 3, 64), (1, 1, 128)])
def test_vulkan_rope_kv_q8(ctx, use_rope, n_kv, hd):
    """rope_kv into a Q8_0 cache: q rotated in place as before, k (rotated) and v stored as the CPU
    engine's quantizer stores them (the rotated k taken from the f32-cache run of the same kernel)."""
    import struct

    from test_vulkan import rope_table

    n_heads, n_tok, start, max_pos = 4, 3, 2, 8
    q_dim, kv_dim = n_heads * hd, n_kv * hd
    ld = q_dim + 2 * kv_dim
    r = np.random.default_rng(hd + n_kv)
    qkv = r.standard_normal((n_tok, ld)).astype(F32)
    cs = rope_table(np.arange(start, start + n_tok), hd)
    params = np.array([start, n_tok, 0, 0], np.uint32)
    push = struct.pack("<5I", n_heads, n_kv, hd, ld, use_rope)
    words = (kv_dim // 4 + (kv_dim // 32 + 1) // 2 + 3) & ~3
    kf, vf, out_f = np.zeros(max_pos * kv_dim, F32), np.zeros(max_pos * kv_dim, F32), qkv.copy()
    ctx.run_kernel("rope_kv", [0, 0], [None, None, None, out_f, kf, vf, params, cs.reshape(-1)], push, n_tok)
    kq, vq, out = np.zeros(max_pos * words, np.uint32), np.zeros(max_pos * words, np.uint32), qkv.copy()
    ctx.run_kernel("rope_kv", [0, 2], [None, None, None, out, kq, vq, params, cs.reshape(-1)], push, n_tok)
    np.testing.assert_array_equal(out[:, :q_dim], out_f[:, :q_dim])  # q rotated in place, the same bits
    for cache, ref in ((kq, kf), (vq, vf)):
        want, _ = gpu_q8_rows(ref.reshape(max_pos, kv_dim)[start : start + n_tok])
        np.testing.assert_array_equal(cache.reshape(max_pos, words)[start : start + n_tok].reshape(-1), want)


@needs_gpu
def test_vulkan_engine_q8_cache_matches_cpu(tmp_path, monkeypatch):
    """The GPU engine with a q8 cache (prefill through rope_kv, decode through the QKV product and
    rope_kv, split-K decode over several chunks) against the CPU engine with a q8 cache."""
    from _helpers_convert import make_hf_model

    import qora
    from qora.convert import convert

    monkeypatch.setenv("QORA_VK_ATT_SPLITS", "4")  # decode over 96.. positions: 4 chunks, merged
    monkeypatch.setenv("QORA_VK_ATT_SHORT", "16")
    make_hf_model(tmp_path / "hf", n_layers=2, head_dim=32, n_heads=4, n_kv_heads=2)
    path = convert(tmp_path / "hf", tmp_path / "m-f16.qora", quant="f16", progress=False)
    ids = np.random.default_rng(9).integers(3, 300, 100).tolist()
    with (
        qora.load(path, device="gpu", max_seq_len=128, kv_type="q8") as g,
        qora.load(path, device="cpu", max_seq_len=128, kv_type="q8") as c,
    ):
        assert g.engine.device == "vulkan" and g.engine.kv_dtype == c.engine.kv_dtype == "q8"
        assert rel(g.engine.forward(ids[:96], 0), c.engine.forward(ids[:96], 0)) < 2e-3
        for i in range(96, 100):
            assert rel(g.engine.forward([ids[i]], i), c.engine.forward([ids[i]], i)) < 2e-3
