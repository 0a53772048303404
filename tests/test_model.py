"""The whole model against transformers: tiny random SmolLM3 (RoPE + NoPE layers,
GQA, tied embeddings) and Llama (untied, bf16) checkpoints, converted from their
HF folders; expected logits and greedy tokens were computed with transformers by
tests/fixtures/make_fixtures.py and committed."""

from pathlib import Path

import numpy as np
import pytest
from reference import ReferenceModel

import qora
from qora._core import _cpu
from qora.engine import ISA_NAMES
from qora.format import read_qora

FIX = Path(__file__).parent / "fixtures"
FEATS = _cpu.cpu_features()
ISAS = [n for n in ISA_NAMES if n in FEATS["cpu_supports"] and n in FEATS["compiled"]]
MODELS = ["tiny-smollm3", "tiny-llama"]

# Float weights: max |qora - transformers| / max |transformers logit|. Quantized weights
# change the function itself (and these tiny random models amplify it), so against
# transformers they are bounded by the mean cosine similarity of the logit rows, and
# held tightly to the NumPy reference over the very weights the file stores.
TOL = {"f32": 1e-3, "f16": 1e-2}
MIN_COSINE = {"q8": 0.99, "q4": 0.8}
QUANTS = ["f32", "f16", "q8", "q4"]
# engine vs NumPy reference on the stored weights; for Q4/Q8 a Q8 rounding of an
# activation can land on the other side of a tie and the tiny model amplifies it
REF_TOL = {"f32": 1e-4, "f16": 1e-4, "q8": 5e-2, "q4": 5e-2}


@pytest.fixture(scope="module")
def converted(tiny_model):
    """(name, quant) -> path, from the session's shared conversions (conftest.py)."""
    return {(name, quant): tiny_model(name, quant) for name in MODELS for quant in QUANTS}


def expected(name):
    return np.load(FIX / f"{name}.expected.npz")


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def mean_cosine(a, b):
    return float(np.mean(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("name", MODELS)
def test_prefill_logits_match_transformers(converted, monkeypatch, name, quant, isa):
    monkeypatch.setenv("QORA_ISA", isa)
    exp = expected(name)
    with qora.load(converted[name, quant], threads=2) as m:
        logits = m.forward(exp["prompt_ids"])
    assert logits.shape == exp["logits"].shape
    if quant in TOL:
        assert rel_err(logits, exp["logits"]) < TOL[quant]
        np.testing.assert_array_equal(logits.argmax(-1), exp["logits"].argmax(-1))
    else:
        assert mean_cosine(logits, exp["logits"]) > MIN_COSINE[quant]


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("name", MODELS)
def test_logits_match_numpy_reference_on_stored_weights(converted, name, quant):
    exp = expected(name)
    ids = [int(t) for t in exp["prompt_ids"]]
    with read_qora(converted[name, quant]) as qf:
        ref = ReferenceModel(qf).forward(ids)
    with qora.load(converted[name, quant], threads=2) as m:
        logits = m.forward(ids)
    assert rel_err(logits, ref) < REF_TOL[quant]


@pytest.mark.parametrize("quant", ["f32", "f16", "q8"])
@pytest.mark.parametrize("name", MODELS)
def test_greedy_decode_matches_transformers(converted, name, quant):
    """Prefill, then one token per step through the KV cache: same tokens as HF generate."""
    exp = expected(name)
    prompt = [int(t) for t in exp["prompt_ids"]]
    with qora.load(converted[name, quant], threads=2) as m:
        logits = m.forward(prompt)[-1]
        got, step_logits = [], []
        for i in range(len(exp["greedy_ids"])):
            tok = int(logits.argmax())
            got.append(tok)
            step_logits.append(logits)
            logits = m.forward([tok], start_pos=len(prompt) + i)[-1]
    step_logits = np.stack(step_logits)
    if quant == "q8":  # quantized weights: the first tokens agree, logits stay close
        assert got[:4] == list(exp["greedy_ids"][:4])
        assert mean_cosine(step_logits[:4], exp["greedy_logits"][:4]) > MIN_COSINE[quant]
    else:
        assert got == list(exp["greedy_ids"])
        assert rel_err(step_logits, exp["greedy_logits"]) < TOL[quant]


def test_incremental_equals_batch(converted):
    """Token-by-token through the cache gives the same logits as one prefill call."""
    exp = expected("tiny-smollm3")
    ids = [int(t) for t in exp["prompt_ids"]]
    with qora.load(converted["tiny-smollm3", "q4"], threads=2) as m:
        full = m.forward(ids)
        m.reset()
        steps = np.concatenate([m.forward([t], start_pos=i) for i, t in enumerate(ids)])
        # a second sequence overwrites the cache from position 0
        m.reset()
        again = m.forward(ids)
    np.testing.assert_allclose(steps, full, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(again, full)


@pytest.mark.parametrize("quant,tol", [("f32", 1e-5), ("q4", 2e-2)])
def test_isa_paths_agree(converted, monkeypatch, quant, tol):
    exp = expected("tiny-smollm3")
    results = []
    for isa in ISAS:
        monkeypatch.setenv("QORA_ISA", isa)
        with qora.load(converted["tiny-smollm3", quant], threads=1, device="cpu") as m:
            assert m.engine.isa == isa
            results.append(m.forward(exp["prompt_ids"]))
    for r in results[1:]:
        assert rel_err(r, results[0]) < tol


def test_context_overflow_is_a_clear_error(converted):
    with qora.load(converted["tiny-smollm3", "q4"], threads=1, max_seq_len=8) as m:
        assert m.engine.max_seq_len == 8
        with pytest.raises(qora.ContextOverflowError, match="8-token context"):
            m.forward(list(range(9)))
        with pytest.raises(qora.QoraError, match="out of range"):
            m.forward([m.config["vocab_size"]])
        m.forward([1, 2, 3])  # still usable afterwards


def test_forced_isa_the_cpu_lacks_is_an_error(converted, monkeypatch):
    from qora.engine.cpu import ISA_NAMES_BY_ARCH, MACHINE

    other = next(n for m, names in ISA_NAMES_BY_ARCH.items() if m != MACHINE for n in names if n != "scalar")
    monkeypatch.setenv("QORA_ISA", other)  # a path of the other architecture
    with pytest.raises(qora.QoraError, match=f"QORA_ISA={other} is an .* path; this {MACHINE} build runs"):
        qora.load(converted["tiny-smollm3", "q4"])
    missing = [n for n in ISA_NAMES if n not in _cpu.cpu_features()["cpu_supports"]]
    if missing:  # a path of this architecture the CPU lacks
        monkeypatch.setenv("QORA_ISA", missing[-1])
        with pytest.raises(qora.QoraError, match="does not support"):
            qora.load(converted["tiny-smollm3", "q4"])


def test_rope_layers_come_from_the_config(converted, tmp_path):
    """A different NoPE pattern in the config changes the engine exactly as the reference says
    (the fixture's [1,1,1,0] is also the default pattern, so this catches a hard-coded rule)."""
    from qora.format import QoraWriter

    src = converted["tiny-smollm3", "f32"]
    ids = [int(t) for t in expected("tiny-smollm3")["prompt_ids"]]
    with read_qora(src) as qf:
        cfg = dict(qf.config, rope_layers=[0, 1, 0, 1])
        tensors = [(n, i["dtype"], i["shape"]) for n, i in qf.tensor_info.items()]
        out = tmp_path / "nope-variant.qora"
        w = QoraWriter(
            out,
            cfg,
            qf.tokenizer_json,
            qf.chat_template,
            qf.generation,
            qf.special_tokens,
            {"from": "test"},
            tensors=tensors,
        )
        for n, dtype, shape in tensors:
            w.add_tensor(n, dtype, shape, np.array(qf.tensor(n)))
        w.finish()
    with read_qora(out) as qf:
        ref = ReferenceModel(qf).forward(ids)
    with qora.load(out, threads=1) as m, qora.load(src, threads=1) as base:
        got, orig = m.forward(ids), base.forward(ids)
    assert rel_err(got, ref) < 1e-4
    assert rel_err(got, orig) > 1e-2  # the pattern really matters


def test_repacked_q4_matches_file_layout(converted, monkeypatch):
    """Q4 matrices interleaved at load give the same logits as the file layout."""
    ids = [int(t) for t in expected("tiny-smollm3")["prompt_ids"]]
    out = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("QORA_REPACK", flag)
        with qora.load(converted["tiny-smollm3", "q4"], threads=2) as m:
            out[flag] = m.forward(ids)
    # the products agree to ~1e-7 (test_kernels); through this tiny random model a Q8 rounding
    # tie of an activation may flip, which it amplifies (same bound as across ISA paths)
    assert rel_err(out["1"], out["0"]) < 2e-2
