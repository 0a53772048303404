"""A whole model whose tensors are of many GGUF types at once (as llama-quantize's Q4_K_M mixes Q4_K,
Q6_K and Q5_0 / Q8_0 fallbacks): the CPU engine runs each in its stored type, with 8-bit activations
(each type's partner) and with float activations; every ISA path and thread count gives the same
logits bit for bit, prefill and decode alike, and the float path matches a float64 NumPy forward over
gguf-py's dequantized weights."""

import json

import numpy as np
import pytest
from _helpers_convert import qora_config
from reference import ReferenceModel
from test_quants_native import effective_inputs, random_blocks

from qora.engine import ISA_NAMES
from qora.engine.cpu import CpuEngine
from qora.format import QoraWriter, expected_tensors, read_qora

FEATS = __import__("qora._core._cpu", fromlist=["_cpu"]).cpu_features()
ISAS = [n for n in ISA_NAMES if n in FEATS["cpu_supports"] and n in FEATS["compiled"]]
TOKENIZER = json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}})
CFG = qora_config(n_layers=2, dim=256, n_heads=4, n_kv_heads=2, head_dim=64, hidden_dim=512, vocab_size=300)
# per layer, the type of each matrix: K types, their 32-element fallbacks, floats
LAYER_TYPES = [
    {"wq": "q4_k", "wk": "q5_k", "wv": "q6_k", "wo": "q5_0", "w_gate": "q4_k", "w_up": "q4_1", "w_down": "q6_k"},
    {"wq": "q5_1", "wk": "bf16", "wv": "f16", "wo": "q4_k", "w_gate": "q4", "w_up": "q5_k", "w_down": "q8"},
]
TOP_TYPES = {"tok_embeddings": "q6_k", "output": "q4_k"}
TOKENS = [5, 17, 250, 3, 99, 42, 7, 130]
DECODE = 3


def dtype_of(name):
    if name in TOP_TYPES:
        return TOP_TYPES[name]
    if name.endswith("norm"):
        return "f32"
    _, layer, kind = name.split(".")
    return LAYER_TYPES[int(layer)][kind]


@pytest.fixture(scope="module")
def mixed_model(tmp_path_factory):
    r = np.random.default_rng(3)
    path = tmp_path_factory.mktemp("mixed") / "mixed.qora"
    plan = [(n, dtype_of(n), shape) for n, (shape, _) in expected_tensors(CFG).items()]
    with QoraWriter(path, CFG, TOKENIZER, tensors=plan) as w:
        for name, dtype, shape in plan:
            if len(shape) == 1:
                data = (1 + 0.1 * r.standard_normal(shape)).astype(np.float32)
            elif dtype in ("f16", "bf16"):
                data = random_blocks(r, dtype, *shape)
                data = (data.astype(np.float32) * 0.05).astype(np.float16) if dtype == "f16" else data
            else:
                data = random_blocks(r, dtype, *shape)
            w.add_tensor(name, dtype, shape, np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    return path


def run(path, isa, threads, precision):
    """Logits of the prompt (every position) and of DECODE greedy steps after it."""
    with read_qora(path) as f:
        eng = CpuEngine(f, n_threads=threads, max_seq_len=32, isa=isa, precision=precision)
        try:
            prefill = eng.forward(TOKENS, 0, all_logits=True)
            steps, pos = [], len(TOKENS)
            tok = int(prefill[-1].argmax())
            for _ in range(DECODE):
                steps.append(eng.forward([tok], pos)[-1])
                tok, pos = int(steps[-1].argmax()), pos + 1
            decode_as_prefill = eng.forward(TOKENS[:3], 0, all_logits=False)
            one_by_one = [eng.forward([t], p)[-1] for p, t in enumerate(TOKENS[:3])]
        finally:
            eng.close()
    return prefill, np.stack(steps), decode_as_prefill[-1], one_by_one[-1]


@pytest.mark.parametrize("precision", ["q8", "f32"])
def test_every_path_and_thread_count_gives_the_same_bits(mixed_model, precision):
    want = run(mixed_model, "scalar", 1, precision)
    assert np.isfinite(want[0]).all()
    np.testing.assert_array_equal(want[2], want[3], err_msg="prefill vs decode of the same tokens")
    for isa in ISAS:
        for threads in (1, 2, 3):
            if (isa, threads) == ("scalar", 1):
                continue
            got = run(mixed_model, isa, threads, precision)
            for a, b in zip(got, want, strict=True):
                np.testing.assert_array_equal(a, b, err_msg=f"{isa}, {threads} threads, {precision}")


def test_float_activations_match_a_float64_forward(mixed_model, monkeypatch):
    monkeypatch.setenv("QORA_KV", "f32")  # the f16 cache's rounding is not what this measures
    with read_qora(mixed_model) as f:
        ref = ReferenceModel(f, quantize_activations=False).forward(TOKENS)
    got = run(mixed_model, ISAS[-1], 2, "f32")[0]
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < 1e-4, err
    assert (got.argmax(axis=1) == ref.argmax(axis=1)).all()


class Reference8bit(ReferenceModel):
    """The float64 forward with each product's input rounded to its weight type's 8-bit partner (Q8_0 or
    Q8_K, by the engine's quantizers, whose rounding test_quants_native checks against llama.cpp's)."""

    def mm(self, name, x):
        if self.dtypes[name] not in ("f32", "f16", "bf16"):
            x = effective_inputs(self.dtypes[name], x.astype(np.float32)[None])[0]
        return self.w[name] @ x


def test_8bit_activations_match_a_float64_forward_that_rounds_them_alike(mixed_model, monkeypatch):
    """(On this random model the rounding itself moves the logits by ~10% of their range against the
    float forward: it is a chaotic function; the engine adds nothing to that.)"""
    monkeypatch.setenv("QORA_KV", "f32")
    with read_qora(mixed_model) as f:
        ref = Reference8bit(f).forward(TOKENS)
    got = run(mixed_model, ISAS[-1], 2, "q8")[0]
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-5


def test_the_gpu_engine_runs_it_and_matches_the_cpu(mixed_model, monkeypatch):
    """Every type on the Vulkan backend too (q|k|v in three types, gate and up in two): float activations
    on both engines, the same logits to float rounding (needs a Vulkan device; CI: lavapipe)."""
    from qora.engine.vulkan import GpuUnavailable, VulkanEngine

    monkeypatch.setenv("QORA_KV", "f32")
    monkeypatch.setenv("QORA_PRECISION", "f32")
    with read_qora(mixed_model) as f:
        try:
            gpu = VulkanEngine(f, max_seq_len=32, required=True)
        except GpuUnavailable as e:
            pytest.skip(f"no usable Vulkan device ({e})")
        try:
            got = gpu.forward(TOKENS, 0, all_logits=True)
            step = gpu.forward([3], len(TOKENS))
        finally:
            gpu.close()
    want = run(mixed_model, ISAS[-1], 2, "f32")[0]
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
    assert np.isfinite(step).all()


def test_the_gpu_engine_refuses_a_type_it_lacks_and_the_cpu_runs_it(mixed_model, monkeypatch):
    """A type without Vulkan kernels (every GGUF type qora runs has them; pretend q6_k had none): a
    message naming the tensor and the type, and make_engine falls back to the CPU engine (device="gpu"
    makes it an error)."""
    from qora import dtypes
    from qora.engine import make_engine
    from qora.engine.vulkan import GpuUnavailable, VulkanEngine, _core
    from qora.errors import QoraError

    monkeypatch.setattr(dtypes, "VULKAN", tuple(n for n in dtypes.VULKAN if n != "q6_k"))
    with read_qora(mixed_model) as f:
        if _core() is not None:
            with pytest.raises(GpuUnavailable, match="tensor tok_embeddings is q6_k, which the Vulkan backend"):
                VulkanEngine(f)
            with pytest.raises(QoraError, match="q6_k"):
                make_engine(f, device="gpu")
        eng = make_engine(f, device="auto", max_seq_len=16)
        try:
            assert eng.device == "cpu" and np.isfinite(eng.forward(TOKENS[:2], 0)).all()
        finally:
            eng.close()
