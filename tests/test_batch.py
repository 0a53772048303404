"""The batched multi-sequence step (CpuEngine.forward_batch, include/qora/forward.h qora_forward_batch):
one pass over rows of several sequences, each with its own KV slot, gives the same logits bit for bit
as running each sequence alone through `forward` (the CPU paths are deterministic), for decode rows,
prefill chunks, ragged lengths, passes split over the row capacity, every weight type and ISA path."""

from __future__ import annotations

import numpy as np
import pytest

from qora import engine as eng
from qora.errors import QoraError
from qora.format import read_qora

_CASES = [
    ("tiny-smollm3", "q4"),
    ("tiny-smollm3", "q8"),
    ("tiny-llama", "f16"),
    ("tiny-llama", "q4"),
    ("tiny-llama", "q4_k"),
]


def _alone(e, prompt, n_decode):
    """Reference: the prompt prefilled, then greedy tokens fed one by one; (tokens, logits per step)."""
    logits = [e.forward(np.asarray(prompt, np.int32), 0)[-1]]
    toks = [int(t) for t in prompt]
    for _ in range(n_decode):
        toks.append(int(np.argmax(logits[-1])))
        logits.append(e.forward(np.array([toks[-1]], np.int32), len(toks) - 1)[-1])
    return toks, logits


def _engine(path, rows=None, slots=4, threads=2, kv=None, monkeypatch=None):
    if kv and monkeypatch:
        monkeypatch.setenv("QORA_KV", kv)
    qf = read_qora(path)
    e = eng.make_engine(qf, "cpu", threads=threads, max_seq_len=96)
    assert e.open_slots(slots, rows=rows) == slots
    return qf, e


@pytest.mark.parametrize("name,quant", _CASES)
@pytest.mark.parametrize("rows", [None, 3])  # 3: every step is split into several passes
def test_batched_step_equals_each_sequence_alone(tiny_model, name, quant, rows):
    qf, e = _engine(tiny_model(name, quant), rows=rows)
    try:
        rng = np.random.default_rng(7)
        prompts = [rng.integers(0, e.vocab_size, size=n) for n in (1, 5, 19, 40)]
        refs = [_alone(e, p, 5) for p in prompts]
        # step 1: slot 0 and 1 prefill whole, slot 2 the first 7 tokens of its prompt; slot 3 waits
        out = e.forward_batch([(0, prompts[0], 0), (1, prompts[1], 0), (2, prompts[2][:7], 0)])
        assert len(out) == 3 and out[0].shape == (e.vocab_size,)
        assert np.array_equal(out[0], refs[0][1][0]) and np.array_equal(out[1], refs[1][1][0])
        # step 2: two decoders, the rest of slot 2's prompt, slot 3 joins with its whole prompt
        t0, t1 = refs[0][0], refs[1][0]
        out = e.forward_batch([(0, [t0[1]], 1), (1, [t1[5]], 5), (2, prompts[2][7:], 7), (3, prompts[3], 0)])
        for got, want in zip(out, (refs[0][1][1], refs[1][1][1], refs[2][1][0], refs[3][1][0]), strict=True):
            assert np.array_equal(got, want)
        # steps 3..: everyone decodes, in a shuffled row order
        pos = {0: 2, 1: 6, 2: 19, 3: 40}
        step = {0: 2, 1: 2, 2: 1, 3: 1}
        for _ in range(3):
            order = rng.permutation(4)
            entries = [(int(s), [refs[s][0][pos[s]]], pos[s]) for s in order]
            out = e.forward_batch(entries)
            for s, got in zip(order, out, strict=True):
                assert np.array_equal(got, refs[s][1][step[s]]), (s, step[s])
                pos[s] += 1
                step[s] += 1
    finally:
        e.close()
        qf.close()


def test_batched_step_f32_cache_and_one_thread(tiny_model, monkeypatch):
    qf, e = _engine(tiny_model("tiny-llama", "q8"), threads=1, kv="f32", monkeypatch=monkeypatch)
    try:
        assert e.kv_dtype == "f32"
        a, b = [3, 1, 4, 1, 5], [9, 2, 6]
        ra, rb = _alone(e, a, 2), _alone(e, b, 2)
        out = e.forward_batch([(1, a, 0), (3, b, 0)])
        assert np.array_equal(out[0], ra[1][0]) and np.array_equal(out[1], rb[1][0])
        out = e.forward_batch([(3, [rb[0][3]], 3), (1, [ra[0][5]], 5)])
        assert np.array_equal(out[0], rb[1][1]) and np.array_equal(out[1], ra[1][1])
    finally:
        e.close()
        qf.close()


def test_copy_slot_shares_a_prefix(tiny_model):
    qf, e = _engine(tiny_model("tiny-smollm3", "q4"))
    try:
        prefix, tail = [5, 8, 13, 21, 34, 55], [2, 3]
        ref = _alone(e, prefix + tail, 0)[1][0]
        e.forward_batch([(0, prefix + [1, 1], 0)])  # slot 0 holds the prefix (and more past it)
        e.copy_slot(0, 2, len(prefix))
        (got,) = e.forward_batch([(2, tail, len(prefix))])
        assert np.array_equal(got, ref)
        with pytest.raises(QoraError):
            e.copy_slot(0, 9, 3)
    finally:
        e.close()
        qf.close()


def test_bad_batches_are_refused(tiny_model):
    qf = read_qora(tiny_model("tiny-llama", "q8"))
    e = eng.make_engine(qf, "cpu", threads=1, max_seq_len=16)
    try:
        with pytest.raises(QoraError, match="open_slots"):
            e.forward_batch([(0, [1], 0)])
        e.open_slots(2)
        with pytest.raises(QoraError, match="slot 2"):
            e.forward_batch([(2, [1], 0)])
        with pytest.raises(QoraError, match="out of range"):
            e.forward_batch([(0, [e.vocab_size], 0)])
        with pytest.raises(QoraError, match="context"):
            e.forward_batch([(0, [1, 2], 15)])
        with pytest.raises(QoraError, match="at least one"):
            e.forward_batch([])
        with pytest.raises(QoraError, match="n_slots"):
            e.open_slots(0)
    finally:
        e.close()
        qf.close()
    with pytest.raises(QoraError, match="closed"):
        e.forward_batch([(0, [1], 0)])


@pytest.mark.parametrize("isa", eng.ISA_NAMES)
def test_batched_step_on_each_isa_path(tiny_model, isa):
    if isa not in eng.cpu_info()["cpu_supports"]:
        pytest.skip(f"{isa} does not run here")
    qf = read_qora(tiny_model("tiny-smollm3", "q4"))
    e = eng.CpuEngine(qf, n_threads=2, max_seq_len=64, isa=isa)
    try:
        e.open_slots(2)
        a, b = [7, 7, 1, 2, 9, 4, 4, 3, 1], [11, 5]
        ra, rb = _alone(e, a, 1), _alone(e, b, 1)
        out = e.forward_batch([(0, a, 0), (1, b, 0)])
        assert np.array_equal(out[0], ra[1][0]) and np.array_equal(out[1], rb[1][0])
        out = e.forward_batch([(1, [rb[0][2]], 2), (0, [ra[0][9]], 9)])
        assert np.array_equal(out[0], rb[1][1]) and np.array_equal(out[1], ra[1][1])
    finally:
        e.close()
        qf.close()
