"""Sampling where the logits are (sample_topk.comp + include/qora/sample.h's sparse choice) against the
NumPy Sampler on the whole row: the same token, on random logits up to SmolLM3's 128,256-token
vocabulary and on the tiny model's decode steps through VulkanEngine.forward_lazy. CI runs it on
lavapipe."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from _helpers_vulkan import needs_gpu

from qora import sampling
from qora.errors import QoraError
from qora.sampling import Sampler

pytestmark = [needs_gpu, pytest.mark.skipif(sampling._c_core() is None, reason="no compiled C sampler")]

CAP, GATHER = 1024, 512  # QVK_SAMPLE_CAP, QVK_SAMPLE_MAX_GATHER (include/qora/vk_backend.h)


class Row:
    """A DeviceLogits stand-in: the shader's candidates of x, and x itself when asked for."""

    def __init__(self, ctx, x: np.ndarray, need: int):
        sin = np.zeros(4, np.uint32)
        sin[0] = need
        out = np.zeros(4 + 2 * CAP + GATHER, np.uint32)
        ctx.run_kernel("sample_topk", [], [x, sin, out], struct.pack("II", x.size, CAP), 1)
        self.candidates, self.vocab_size, self.x, self.read = out, x.size, x, 0

    def __array__(self, dtype=None, copy=None):
        self.read += 1
        return self.x


def test_candidates_hold_every_logit_above_the_threshold(ctx):
    rng = np.random.default_rng(0)
    for vocab in (3, 100, 1000, 49_152, 128_256):
        for need in (1, 21, 128, 300):
            x = (rng.standard_normal(vocab) * 4).astype(np.float32)
            out = Row(ctx, x, need).candidates
            count, flags, total = int(out[0]), int(out[1]), int(out[3])
            assert flags == 0 and count == total and min(need, vocab) <= count <= max(2 * need, 64)
            ids = out[5 : 5 + 2 * count : 2]
            vals = out[4 : 4 + 2 * count : 2].view(np.float32)
            np.testing.assert_array_equal(x[ids], vals)
            # every logit not returned is below every one returned
            rest = np.delete(x, ids)
            assert rest.size == 0 or rest.max() < vals.min()


def test_ties_and_nan_are_flagged(ctx):
    flat = np.zeros(5000, np.float32)
    out = Row(ctx, flat, 21).candidates
    assert out[1] & 1 and out[3] == 5000  # every logit ties at the threshold: more than fit
    flat[7] = np.nan
    assert Row(ctx, flat, 21).candidates[1] & 2


def _lowering_settings(rng) -> dict:
    """Settings whose adjustments only ever lower a logit (the candidates' path takes them)."""
    s = dict(
        temperature=float(rng.choice([0.0, 0.05, 0.3, 0.7, 1.0, 1.7])),
        top_k=int(rng.choice([1, 2, 5, 20, 40, 100])),
        top_p=float(rng.choice([1.0, 0.95, 0.5, 0.01])),
        min_p=float(rng.choice([0.0, 0.05, 0.3])),
        repeat_penalty=float(rng.choice([1.0, 1.1, 2.0])),
        repeat_window=int(rng.choice([0, 8, 64])),
        presence_penalty=float(rng.choice([0.0, 1.5])),
        frequency_penalty=float(rng.choice([0.0, 0.3])),
        greedy=bool(rng.random() < 0.15),
    )
    if rng.random() < 0.3:
        s["logit_bias"] = {int(i): -float(rng.uniform(0, 100)) for i in rng.integers(0, 1000, 4)}
    if rng.random() < 0.2:
        s["banned"] = frozenset(rng.integers(0, 1000, 3).tolist())
    return s


@pytest.mark.parametrize("vocab", [300, 4097, 128_256])
def test_device_choice_is_the_reference_choice(ctx, vocab):
    rng = np.random.default_rng(vocab)
    whole = 0
    for case in range(40 if vocab < 100_000 else 16):
        x = (rng.standard_normal(vocab) * rng.uniform(0.5, 4)).astype(np.float32)
        if case % 4 == 1:
            x = np.round(x * 4) / 4  # ties
        # the recent tokens are among the likeliest, as in a generation
        history = np.argsort(-x)[: int(rng.integers(0, 40))].tolist() + rng.integers(0, vocab, 10).tolist()
        settings = _lowering_settings(rng) if case else {}
        fast, ref = Sampler(**settings, seed=case), Sampler(**settings, seed=case, fast=False)
        for _ in range(2):
            row = Row(ctx, x, 128)
            got = fast(row, history)
            assert got == ref(x, history), (settings, vocab)
            whole += row.read
            history = history + [got]
        assert fast.rng.random() == ref.rng.random()
    assert whole <= 8  # the candidates decide nearly always; the whole row only where a tie is left open


def test_ties_fall_back_to_the_whole_row(ctx):
    x = np.zeros(5000, np.float32)
    x[:300] = 1.0  # 300 tied at the top: all of them come back, and the lowest ids win on the host
    row = Row(ctx, x, 21)
    assert Sampler(top_k=20, seed=1)(row, []) == Sampler(top_k=20, seed=1, fast=False)(x, [])
    assert row.read == 0
    x[:2000] = 1.0  # more tied than the candidates' room: the whole row decides
    row = Row(ctx, x, 21)
    assert Sampler(top_k=20, seed=1)(row, []) == Sampler(top_k=20, seed=1, fast=False)(x, [])
    assert row.read == 1


@pytest.fixture(scope="module")
def vk_engine(tiny_model):
    from qora.engine.vulkan import VulkanEngine
    from qora.format import read_qora

    q = read_qora(tiny_model("tiny-smollm3", "q8"))
    e = VulkanEngine(q, max_seq_len=256, required=True)
    yield e
    e.close()
    q.close()


def test_engine_steps_sample_on_the_device(vk_engine):
    from qora.engine.vulkan import DeviceLogits

    e = vk_engine
    prompt = np.array([1, 5, 9, 13, 2], dtype=np.int32)
    for seed in range(3):
        e.forward(prompt, 0)
        fast, ref = Sampler(seed=seed, top_k=40), Sampler(seed=seed, top_k=40, fast=False)
        token, history = 7, []
        for pos in range(len(prompt), len(prompt) + 12):
            row = e.forward_lazy(token, pos)
            assert isinstance(row, DeviceLogits)
            whole = np.asarray(row)
            want = e.forward(np.array([token], np.int32), pos)[-1]  # the same step again, its row read back
            np.testing.assert_array_equal(whole, want)
            history.append(token)
            token = fast(row, history)  # the candidates of the lazy step (its row is cached)
            assert token == ref(want, history)
    with pytest.raises(QoraError, match="overwritten"):
        stale = e.forward_lazy(3, 0)
        e.forward_lazy(4, 1)
        np.asarray(stale)


def test_generation_on_the_device_matches_the_cpu_sampler(vk_engine, tiny_model):
    """generate_tokens over the Vulkan engine samples from device rows: the same tokens as choosing
    from the whole rows the engine's plain forward returns."""
    from qora.generate import generate_tokens

    e = vk_engine
    prompt = [1, 5, 9, 13, 2]
    lazy = e.forward_lazy

    def run(sampler, use_lazy):
        history: list[int] = []

        def choose(logits):
            t = sampler(logits, history)
            history.append(t)
            return t

        if not use_lazy:
            e.forward_lazy = None  # engine_step then takes the plain forward
        try:
            gen = generate_tokens(e, prompt, choose)
            return [next(gen) for _ in range(16)]
        finally:
            if not use_lazy:
                del e.forward_lazy

    assert lazy is not None
    assert run(Sampler(seed=5), True) == run(Sampler(seed=5, fast=False), False)
