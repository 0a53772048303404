"""Long context on the CPU engine (issue 13): a tiny model with SmolLM3's 65,536 positions runs at
its last position, prefill (flash attention over key chunks) matches decode bit for bit far into the
context and the NumPy reference at depth 3,000, and the RAM pre-flight counts the KV cache by type."""

import numpy as np
import pytest
from _helpers_convert import make_hf_model
from reference import ReferenceModel

import qora
from qora.convert import convert
from qora.engine import base
from qora.errors import ContextOverflowError
from qora.format import read_qora

FULL = 65536  # SmolLM3's max_position_embeddings


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """A tiny random model (2 layers, 4 heads of 16, 2 KV heads) whose config allows 65,536 positions."""
    d = tmp_path_factory.mktemp("long-context")
    make_hf_model(d / "hf", hf_extra={"max_position_embeddings": FULL})
    return {q: convert(d / "hf", d / f"long-{q}.qora", quant=q, progress=False) for q in ("q8", "f32")}


def test_full_context_last_position(long_model):
    """The whole 65,536-position cache is usable: a prompt at the start, then tokens written at the
    very end attend over every position (the untouched middle included), as a prefill and as decode
    steps with the same bits; one position more is a clear error."""
    with qora.load(long_model["q8"], device="cpu", threads=2, max_seq_len=FULL) as m:
        eng = m.engine
        assert eng.max_seq_len == FULL
        rng = np.random.default_rng(0)
        eng.forward(rng.integers(3, 300, 40), 0)
        tail = rng.integers(3, 300, 6)
        pre = eng.forward(tail, FULL - 6, all_logits=True)
        dec = np.concatenate([eng.forward(tail[i : i + 1], FULL - 6 + i) for i in range(6)])
        assert np.isfinite(pre).all()
        np.testing.assert_array_equal(pre, dec)
        with pytest.raises(ContextOverflowError):
            eng.forward(tail[:1], FULL)


def test_depth_3000_matches_reference(long_model):
    """f32 weights and KV: the last logits of a 3,000-token prompt (12 key chunks, a ragged last one,
    prefill tiles of 16 queries) against the float64 NumPy forward pass, and decode steps after it
    against the same prompt prefilled in one go."""
    path = long_model["f32"]
    ids = np.random.default_rng(1).integers(3, 300, 3000)
    ref = np.asarray(ReferenceModel(read_qora(path)).forward(ids.tolist()))
    with qora.load(path, device="cpu", threads=2, max_seq_len=4096) as m:
        got = m.engine.forward(ids[:-2], 0, all_logits=True)
        np.testing.assert_allclose(got[-1], ref[-3], rtol=2e-3, atol=2e-3)
        last = [m.engine.forward(ids[i : i + 1], i)[0] for i in (2998, 2999)]
        np.testing.assert_allclose(np.stack(last), ref[-2:], rtol=2e-3, atol=2e-3)
        whole = m.engine.forward(ids, 0, all_logits=True)
        np.testing.assert_array_equal(whole[-2:], np.stack(last))


def test_preflight_counts_the_kv_type(monkeypatch):
    """The RAM check before allocating counts the KV cache in the type it will have (f16 half of f32)
    and, when a requested context does not fit, says how many tokens would."""
    cfg = {"max_seq_len": FULL, "n_layers": 36, "n_kv_heads": 4, "head_dim": 128, "n_heads": 16}
    f16, f32 = base.context_bytes_per_token(cfg, "f16"), base.context_bytes_per_token(cfg, "f32")
    kv16 = 2 * 36 * 4 * 128 * 2
    assert kv16 < f16 < kv16 * 1.03 and f32 - f16 == kv16  # the KV cache and ~2 % of attention scratch
    # SmolLM3-3B at 64K with an f16 cache: 4.5 GiB of keys and values (4.8 GB)
    assert abs(FULL * kv16 / 2**30 - 4.5) < 0.01

    class Mem:
        available = 3 << 30

    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Mem)
    fits16 = int(0.9 * (3 << 30) // f16)
    assert base.default_context(cfg, fits16 - 1, "f16") == fits16 - 1
    with pytest.raises(ContextOverflowError, match=f"about {fits16} tokens fit"):
        base.default_context(cfg, FULL, "f16")
    with pytest.raises(ContextOverflowError, match="f32 KV cache"):
        base.default_context(cfg, fits16 - 1, "f32")  # the same length in f32 needs twice the memory
    with pytest.raises(qora.QoraError, match="KV cache type"):
        base.context_bytes_per_token(cfg, "q3")


def smollm3_cfg(**over):
    return dict({"head_dim": 128, "rope_theta": 5e6, "max_seq_len": FULL, "rope_scaling": None}, **over)


def test_yarn_factor_2_as_the_model_card_says():
    """--rope-scaling yarn (factor 2) on SmolLM3's config, and the YaRN block SmolLM3's card tells
    users to add, both give 131,072 positions with transformers' frequencies and attention factor for
    factor 2 over 65,536 (tests/fixtures/rope_cases.json, made by transformers)."""
    import json
    from pathlib import Path

    cases = json.loads((Path(__file__).parent / "fixtures" / "rope_cases.json").read_text())
    want = next(c for c in cases if c["max_seq_len"] == 2 * FULL and c["rope_scaling"]["rope_type"] == "yarn")
    card = {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": FULL}
    for cfg in (base.with_rope_scaling(smollm3_cfg(), "yarn"), base.with_rope_scaling(smollm3_cfg(rope_scaling=card))):
        assert cfg["max_seq_len"] == 2 * FULL
        inv, attn = base.rope_parameters(cfg)
        np.testing.assert_allclose(inv, np.float32(want["inv_freq"]), rtol=1e-6)
        assert abs(attn - want["attention_factor"]) < 1e-6
    assert base.with_rope_scaling(smollm3_cfg(), "yarn:4")["max_seq_len"] == 4 * FULL
    plain = smollm3_cfg()
    assert base.with_rope_scaling(plain) is plain  # no YaRN asked for, none in the config: unchanged


@pytest.mark.parametrize("spec", ["linear", "yarn:1", "yarn:0.5", "yarn:abc", "yarn:1000", "yarn:nan"])
def test_rope_scaling_flag_errors(spec):
    with pytest.raises(qora.QoraError, match="rope-scaling"):
        base.with_rope_scaling(smollm3_cfg(), spec)


def test_yarn_context_runs(long_model):
    """qora.load(rope_scaling="yarn") doubles the tiny model's 65,536 positions; the last one runs."""
    with qora.load(long_model["q8"], device="cpu", threads=2, max_seq_len=2 * FULL, rope_scaling="yarn") as m:
        assert m.engine.max_seq_len == 2 * FULL
        assert np.isfinite(m.engine.forward([5, 6], 2 * FULL - 2)).all()
        with pytest.raises(ContextOverflowError):
            m.engine.forward([5], 2 * FULL)
