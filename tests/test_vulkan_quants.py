"""The Vulkan kernels of the GGUF types past Q4_0 / Q8_0 (Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, BF16, and
Q4_0 / Q8_0 with float activations): the device layout, dequantization bit for bit against gguf-py,
decode and prefill products against a float64 NumPy reference on random blocks and ragged shapes, the
q|k|v product split by type, and a model of mixed types (as llama-quantize's Q4_K_M writes them) on
the GPU against the CPU engine. Needs a Vulkan device (CI: lavapipe) but for the layout test."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from _helpers_vulkan import matmul_want, needs_gpu, run_matmul
from test_quants_native import random_blocks, reference_values
from test_vulkan import ADD, QKV, STORE, SWIGLU, ref_rope, rel_err, rope_table, run_matvec

import qora
from qora._core import _vulkan
from qora.dtypes import WEIGHT_TYPES

NEW = ["q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k", "bf16"]
FLOAT_ACT = [*NEW, "q4", "q8"]  # every type whose products take float activations (q4 / q8: the "_f" variants)


def suffix(dtype):
    return "_f" if dtype in ("q4", "q8") else ""


def matrix(r, dtype, rows, cols):
    """(stored bytes, float64 values) of a random matrix in dtype's GGUF layout."""
    raw = random_blocks(r, dtype, rows, cols)
    if dtype == "bf16":
        vals = (raw.astype(np.uint32) << 16).view(np.float32)
    else:
        vals = reference_values(raw, dtype, rows, cols)
    return np.ascontiguousarray(raw), vals.astype(np.float64)


def shapes(dtype):
    """(rows, cols): rows not a multiple of any tile; cols ragged where the type allows (K types: whole
    super-blocks only)."""
    b = WEIGHT_TYPES[dtype].block
    if b == 256:
        return [(1, 256), (37, 768), (130, 512)]
    if b == 32:
        return [(1, 32), (37, 96), (130, 352), (9, 2080)]
    return [(1, 8), (37, 88), (130, 352)]


# ───── device-free: the layout qora_vk.c packs ─────


def ref_pack(dtype, raw, rows, cols):
    """The device layout of dequant.glsl in NumPy: each block's main part, then the meta parts."""
    t = WEIGHT_TYPES[dtype]
    blocks = raw.reshape(-1, t.block_bytes)
    z2 = np.zeros((len(blocks), 2), np.uint8)
    main, meta = {
        "q4": (blocks[:, 2:], blocks[:, :2]),
        "q8": (blocks[:, 2:], blocks[:, :2]),
        "q4_1": (blocks[:, 4:], blocks[:, :4]),
        "q5_0": (blocks[:, 6:], np.hstack([blocks[:, 2:6], blocks[:, :2], z2])),
        "q5_1": (blocks[:, 8:], np.hstack([blocks[:, 4:8], blocks[:, :4]])),
        "q4_k": (blocks, blocks[:, :0]),
        "q5_k": (blocks, blocks[:, :0]),
        "q6_k": (blocks[:, :208], np.hstack([blocks[:, 208:], z2])),
    }[dtype]
    out = np.concatenate([main.reshape(-1), meta.reshape(-1)])
    return np.concatenate([out, np.zeros(-len(out) % 16, np.uint8)])


@pytest.mark.parametrize("dtype", ["q4", "q8", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"])
def test_pack_layout(dtype):
    r = np.random.default_rng()
    rows, cols = 3, 512
    raw, _ = matrix(r, dtype, rows, cols)
    packed = _vulkan.pack(dtype, rows, cols, raw)
    assert packed.shape[0] == _vulkan.packed_bytes(dtype, rows, cols)
    np.testing.assert_array_equal(packed, ref_pack(dtype, raw, rows, cols))
    bad = 96 if WEIGHT_TYPES[dtype].block == 256 else 48  # not whole blocks
    with pytest.raises(ValueError):
        _vulkan.pack(dtype, 1, bad, np.zeros(WEIGHT_TYPES[dtype].block_bytes, np.uint8))


# ───── shaders against NumPy ─────


@needs_gpu
@pytest.mark.parametrize("dtype", [*NEW, "q4", "q8"])
def test_embed_is_gguf_bit_for_bit(ctx, dtype):
    """The embedding rows as floats: gguf-py's dequantization bit for bit (no fused multiply-add)."""
    rows, cols = 21, 768 if WEIGHT_TYPES[dtype].block == 256 else 352
    r = np.random.default_rng()
    raw, vals = matrix(r, dtype, rows, cols)
    toks = [3, 17, 20, 3, 0]
    params = np.array([0, len(toks), 0, 0, *toks], np.uint32)
    out = np.zeros((len(toks), cols), np.float32)
    packed = _vulkan.pack(dtype, rows, cols, raw)
    ctx.run_kernel(
        f"embed_{dtype}",
        [],
        [packed, None, None, out, None, None, params],
        struct.pack("<4I", rows, cols, 0, cols),
        len(toks),
    )
    np.testing.assert_array_equal(out.view(np.uint32), vals[toks].astype(np.float32).view(np.uint32))


@needs_gpu
@pytest.mark.parametrize("dtype", FLOAT_ACT)
def test_matvec(ctx, dtype):
    r = np.random.default_rng()
    for rows, cols in shapes(dtype):
        raw, vals = matrix(r, dtype, rows, cols)
        x = r.standard_normal(cols).astype(np.float32)
        for rows_per, threads in ((1 + rows % 5, 32), (4, 64)):
            y, _, _, _ = run_matvec(
                ctx, dtype, raw, rows, cols, x, rows_per=rows_per, threads=threads, suffix=suffix(dtype)
            )
            assert rel_err(y, vals @ x.astype(np.float64)) < 2e-5, (rows, cols, rows_per)


@needs_gpu
@pytest.mark.parametrize("dtype", ["q4_k", "q6_k", "q5_1"])
def test_matvec_add_and_swiglu(ctx, dtype):
    rows, cols = 45, 512
    r = np.random.default_rng()
    x = r.standard_normal(cols).astype(np.float32)
    raw, vals = matrix(r, dtype, rows, cols)
    y0 = r.standard_normal(rows).astype(np.float32)
    y, _, _, _ = run_matvec(ctx, dtype, raw, rows, cols, x, mode=ADD, y=y0.copy())
    assert rel_err(y, y0 + vals @ x.astype(np.float64)) < 2e-5
    raw, vals = matrix(r, dtype, 2 * rows, cols)
    gu = vals @ x.astype(np.float64)
    g, u = gu[:rows], gu[rows:]
    h, _, _, _ = run_matvec(ctx, dtype, raw, rows, cols, x, mode=SWIGLU, rows_per=6)
    assert rel_err(h, g / (1 + np.exp(-g)) * u) < 2e-5


@needs_gpu
def test_matvec_qkv_split_by_type(ctx):
    """q|k in Q4_K and v in Q6_K (Q4_K_M's attn_v): two QKV dispatches, the second from row q_dim + kv_dim
    (row0), each writing its part: q rotated, k rotated into the cache, v into the cache."""
    n_heads, n_kv, hd, cols, pos, max_pos = 4, 2, 16, 256, 3, 6
    q_dim, kv_dim = n_heads * hd, n_kv * hd
    r = np.random.default_rng()
    x = r.standard_normal(cols).astype(np.float32)
    cs = rope_table(np.array([pos]), hd, scale=1.1)[0]
    raw_qk, vals_qk = matrix(r, "q4_k", q_dim + kv_dim, cols)
    raw_v, vals_v = matrix(r, "q6_k", kv_dim, cols)
    common = dict(
        mode=QKV,
        rows_per=8,
        pos=pos,
        rope=cs.reshape(-1),
        q_dim=q_dim,
        kv_dim=kv_dim,
        head_dim=hd,
        use_rope=1,
        kv_words=max_pos * kv_dim // 2,
    )
    y, kc, _, _ = run_matvec(ctx, "q4_k", raw_qk, q_dim + kv_dim, cols, x, y=np.zeros(q_dim, np.float32), **common)
    _, _, vc, _ = run_matvec(
        ctx, "q6_k", raw_v, kv_dim, cols, x, y=np.zeros(4, np.float32), row0=q_dim + kv_dim, **common
    )
    xd = x.astype(np.float64)
    qk, v = vals_qk @ xd, vals_v @ xd
    q = ref_rope(qk[:q_dim], n_heads, hd, cs[:, 0], cs[:, 1])
    k = ref_rope(qk[q_dim:], n_kv, hd, cs[:, 0], cs[:, 1])
    assert rel_err(y, q) < 2e-5
    kc16, vc16 = kc.view(np.float16).reshape(max_pos, kv_dim), vc.view(np.float16).reshape(max_pos, kv_dim)
    assert rel_err(kc16[pos], k) < 1e-3 and rel_err(vc16[pos], v) < 1e-3
    assert not vc16[:pos].any() and not vc16[pos + 1 :].any()


@needs_gpu
@pytest.mark.parametrize("dtype", FLOAT_ACT)
@pytest.mark.parametrize("mode", [STORE, ADD])
def test_matmul(ctx, dtype, mode):
    """Prefill product on float activations over a batch of tokens, tile edges crossed in rows, tokens
    and columns (a K not a multiple of the 32-wide tile slice for the float types)."""
    rows, n_tok = 70, 67
    cols = {256: 512, 32: 160, 1: 88}[WEIGHT_TYPES[dtype].block]
    r = np.random.default_rng()
    raw, vals = matrix(r, dtype, rows, cols)
    x = r.standard_normal((n_tok, cols)).astype(np.float32)
    w = _vulkan.pack(dtype, rows, cols, raw)
    y, y0 = run_matmul(ctx, f"matmul_{dtype}{suffix(dtype)}", mode, w, x, np.zeros(4, np.float32), rows, cols, 64, r)
    want = matmul_want(y0, x.astype(np.float64) @ vals.T, mode == ADD)
    assert rel_err(y, want) < 2e-5


# ───── a model of mixed types: the GPU against the CPU engine ─────


MIXES = {
    # llama-quantize Q4_K_M's choices: Q6_K for attn_v / ffn_down (use_more_bits layers) and the LM head
    "q4_k_m": {
        "q_proj": "Q4_K",
        "k_proj": "Q4_K",
        "v_proj": "Q6_K",
        "o_proj": "Q4_K",
        "gate_proj": "Q4_K",
        "up_proj": "Q4_K",
        "down_proj": "Q6_K",
        "model.embed_tokens.weight": "Q4_K",
        "lm_head.weight": "Q6_K",
    },
    # q | k | v and gate | up split by type, Q8 activations on the Q4_0 / Q8_0 pieces, float on the F16 ones
    # (under the "q8" precision both engines then do the same arithmetic)
    "split_q8": {
        "q_proj": "Q4_0",
        "k_proj": "Q4_0",
        "v_proj": "F16",
        "o_proj": "Q8_0",
        "gate_proj": "Q8_0",
        "up_proj": "F16",
        "down_proj": "Q4_0",
        "model.embed_tokens.weight": "Q8_0",
        "lm_head.weight": "Q4_0",
    },
    # every other type somewhere, q / k / v in three types, gate and up in two
    "others": {
        "q_proj": "Q5_K",
        "k_proj": "Q8_0",
        "v_proj": "Q5_0",
        "o_proj": "Q5_1",
        "gate_proj": "Q4_1",
        "up_proj": "Q4_1",
        "down_proj": "BF16",
        "model.embed_tokens.weight": "Q4_0",
        "lm_head.weight": "F16",
    },
}


def _quantize_any(a, t, quantize):
    """gguf-py's quantizer `quantize`, with qora's for Q4_K / Q6_K (gguf-py has none) and random blocks of
    a model's size for Q5_K (no quantizer anywhere here; the test compares two engines on the same bytes)."""
    import gguf

    from qora import quant

    T = gguf.GGMLQuantizationType
    if t in (T.Q4_K, T.Q6_K):
        return quant.quantize(a, "q4_k" if t == T.Q4_K else "q6_k")
    if t == T.Q5_K:
        return random_blocks(np.random.default_rng(5), "q5_k", *a.shape)
    return quantize(a, t)


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory):
    """mixed_gguf(mix) -> a 2-layer GGUF of dim 256 (whole K super-blocks), its tensors in the mix's types."""
    import gguf
    import gguf.quants
    from _helpers_convert import hf_weights, make_gguf, qora_config

    folder = tmp_path_factory.mktemp("vk-mixes")
    made = {}

    def get(mix):
        if mix not in made:
            cfg = qora_config(
                "llama", n_layers=2, dim=256, hidden_dim=512, n_heads=4, n_kv_heads=2, head_dim=64, vocab_size=300
            )
            types = {k: gguf.GGMLQuantizationType[v] for k, v in MIXES[mix].items()}
            orig = gguf.quants.quantize
            gguf.quants.quantize = lambda a, t: _quantize_any(a, t, orig) if a.ndim == 2 else orig(a, t)
            try:
                make_gguf(folder / f"{mix}.gguf", hf_weights(cfg, seed=3), cfg, types=types)
            finally:
                gguf.quants.quantize = orig
            made[mix] = folder / f"{mix}.gguf"
        return made[mix]

    return get


@needs_gpu
@pytest.mark.parametrize(
    "mix,precision", [("q4_k_m", "f32"), ("others", "f32"), ("split_q8", "f32"), ("split_q8", "q8")]
)
def test_mixed_model_matches_cpu(mixed_gguf, mix, precision, monkeypatch):
    """The same arithmetic on both engines (f32: float activations everywhere, the GGUF default of a small
    model; q8 on this mix: Q8 ones for the Q4_0 / Q8_0 products), an f32 KV cache: prefill with every row
    of logits, decode steps and a later batched prefill agree to float rounding, and so does the greedy
    text. With q8, a float product (F16 here) summed in another order on each side can put a later Q8
    rounding on the other side of a tie (test_vulkan's f16-cache case): the tolerance is that one's."""
    tol = 1e-4 if precision == "f32" else 5e-2
    monkeypatch.setenv("QORA_KV", "f32")
    path = mixed_gguf(mix)
    gpu = qora.load(path, device="gpu", max_seq_len=64, precision=precision)
    cpu = qora.load(path, device="cpu", max_seq_len=64, precision=precision)
    try:
        assert gpu.engine.device == "vulkan" and cpu.engine.device == "cpu"
        assert gpu.engine.precision == cpu.engine.precision == precision
        kinds = {i["dtype"] for i in gpu.engine._qfile.tensor_info.values()}
        want = {
            "q4_k_m": {"q4_k", "q6_k"},
            "others": set(NEW) - {"q4_k", "q6_k"} | {"q4", "q8", "f16"},
            "split_q8": {"q4", "q8", "f16"},
        }
        assert want[mix] <= kinds, kinds
        toks = np.random.default_rng(11).integers(0, 300, 30).tolist()
        lg, lc = gpu.forward(toks[:24]), cpu.forward(toks[:24])
        assert lg.shape == lc.shape == (24, 300) and rel_err(lg, lc) < tol
        for i in range(24, 27):
            assert rel_err(gpu.engine.forward([toks[i]], i), cpu.engine.forward([toks[i]], i)) < tol
        lg, lc = gpu.engine.forward(toks[27:30], 27), cpu.engine.forward(toks[27:30], 27)
        assert rel_err(lg, lc) < tol
        opts = dict(raw=True, greedy=True, max_tokens=12)
        if precision == "f32":
            assert gpu.generate("hello world", **opts) == cpu.generate("hello world", **opts)
        else:
            assert gpu.generate("hello world", **opts)  # runs; the q8 texts may part at a tie
    finally:
        gpu.close()
        cpu.close()


@needs_gpu
def test_demo_q4_1_gguf_first_answer_token_on_the_gpu(demo_gguf, monkeypatch):
    """The demo's own Q4_1 GGUF on the GPU: its chat prompt's logits are the CPU engine's (both with float
    activations, the GGUF default of a 135M model), so the near tie of its first answer token ("The"
    25.33 against "L" 25.24) goes the same way: "The"."""
    monkeypatch.setenv("QORA_KV", "f32")
    gpu = qora.load(demo_gguf, device="gpu", max_seq_len=64)
    cpu = qora.load(demo_gguf, device="cpu", max_seq_len=64)
    try:
        assert gpu.engine.device == "vulkan" and gpu.engine.precision == cpu.engine.precision == "f32"
        ids = gpu.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
        lg, lc = gpu.engine.forward(ids, 0), cpu.engine.forward(ids, 0)
        assert rel_err(lg, lc) < 1e-4
        assert int(lg[-1].argmax()) == int(lc[-1].argmax())
        assert gpu.tokenizer.decode([int(lg[-1].argmax())]).strip() == "The"
    finally:
        gpu.close()
        cpu.close()
