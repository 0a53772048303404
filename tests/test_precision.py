"""The CPU engine's arithmetic chosen by the caller: qora.load(precision=) and --precision ("q8": activations
rounded to each weight type's 8-bit partner, integer products; "f32": float activations), over the default by
model size (engine.cpu.default_precision) and QORA_PRECISION."""

from pathlib import Path

import numpy as np
import pytest

import qora
from qora import bench, perplexity, server

GGUF = Path(__file__).parent / "fixtures" / "tiny-smollm3.q8_0.gguf"


@pytest.mark.parametrize("precision", ["q8", "f32"])
def test_load_runs_the_precision_asked_for(precision, monkeypatch):
    monkeypatch.setenv("QORA_PRECISION", "f32" if precision == "q8" else "q8")  # the argument wins over it
    with qora.load(GGUF, device="cpu", threads=1, max_seq_len=16, precision=precision) as m:
        assert m.engine.precision == precision
        logits = m.engine.forward(np.array([1, 2, 3], np.int32), 0)
        assert np.isfinite(logits).all()


def test_the_two_precisions_differ_only_by_the_activation_rounding():
    runs = {}
    for p in ("q8", "f32"):
        with qora.load(GGUF, device="cpu", threads=1, max_seq_len=16, precision=p) as m:
            runs[p] = m.engine.forward(np.array([5, 6, 7, 8], np.int32), 0)[0]
    diff = np.abs(runs["q8"] - runs["f32"]).max()
    assert 0 < diff < 0.1 * np.abs(runs["f32"]).max()


def test_default_is_by_model_size_and_env(monkeypatch):
    monkeypatch.delenv("QORA_PRECISION", raising=False)
    with qora.load(GGUF, device="cpu", threads=1, max_seq_len=16) as m:
        assert m.engine.precision == "f32"  # a GGUF of up to 1B weights
    monkeypatch.setenv("QORA_PRECISION", "q8")
    with qora.load(GGUF, device="cpu", threads=1, max_seq_len=16) as m:
        assert m.engine.precision == "q8"


def test_unknown_precision_is_a_clear_error():
    with pytest.raises(qora.QoraError, match="precision must be one of q8, f32"):
        qora.load(GGUF, device="cpu", threads=1, max_seq_len=16, precision="int4")


@pytest.mark.parametrize("module", [bench, server, perplexity])
def test_every_command_that_loads_a_model_has_the_flag(module):
    p = module.build_parser()
    action = next(a for a in p._actions if "--precision" in a.option_strings)
    assert tuple(action.choices) == ("q8", "f32")
