"""Sampling functions against plain NumPy reasoning on small vectors."""

from __future__ import annotations

import numpy as np
import pytest

from qora import sampling
from qora.errors import QoraError
from qora.sampling import Sampler

L = np.array([2.0, -1.0, 0.5, 3.0, -3.0, 1.0], dtype=np.float32)  # order by value: 3, 0, 5, 2, 1, 4


def probs(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.where(np.isfinite(x), np.exp(x - np.max(x[np.isfinite(x)])), 0.0)
    return e / e.sum()


def kept(x):
    return set(np.flatnonzero(np.isfinite(x)).tolist())


def test_greedy_and_temperature():
    assert sampling.greedy(L) == 3
    assert sampling.greedy(L[None, :]) == 3  # (1, vocab) as the engine returns it
    assert sampling.greedy(np.array([1, 5, 5], np.float32)) == 1  # first on ties
    np.testing.assert_allclose(sampling.apply_temperature(L, 0.5), L * 2)
    assert sampling.apply_temperature(L, 0.5).dtype == np.float32
    np.testing.assert_array_equal(sampling.apply_temperature(L, 1.0), L)
    with pytest.raises(QoraError):
        sampling.apply_temperature(L, 0.0)


def test_top_k_keeps_k():
    for k in range(1, 6):
        out = sampling.apply_top_k(L, k)
        assert kept(out) == set(np.argsort(-L)[:k].tolist())
        np.testing.assert_array_equal(out[list(kept(out))], L[list(kept(out))])
    assert kept(sampling.apply_top_k(L, 0)) == set(range(6))
    assert kept(sampling.apply_top_k(L, 100)) == set(range(6))
    assert len(kept(sampling.apply_top_k(np.zeros(10, np.float32), 3))) == 3  # exactly k on ties


def test_top_p_mass():
    p = probs(L)
    order = np.argsort(-p)
    cum = np.cumsum(p[order])
    for top_p in (0.1, 0.5, 0.8, 0.9, 0.99, 0.999999):
        n = int(np.searchsorted(cum, top_p) + 1)  # the smallest prefix whose mass reaches top_p
        out = sampling.apply_top_p(L, top_p)
        assert kept(out) == set(order[:n].tolist()), top_p
        assert p[list(kept(out))].sum() >= top_p - 1e-9
    assert kept(sampling.apply_top_p(L, 1.0)) == set(range(6))
    assert kept(sampling.apply_top_p(L, 1e-6)) == {3}  # never empty


def test_min_p():
    p = probs(L)
    for min_p in (0.05, 0.2, 0.5, 0.9):
        out = sampling.apply_min_p(L, min_p)
        assert kept(out) == set(np.flatnonzero(p >= min_p * p.max() * (1 - 1e-6)).tolist()), min_p
    assert kept(sampling.apply_min_p(L, 0.0)) == set(range(6))


def test_repetition_penalty_hf_semantics():
    out = sampling.apply_repetition_penalty(L, [0, 1, 1, 3], 2.0, window=64)
    expected = L.copy()
    expected[0], expected[1], expected[3] = 1.0, -2.0, 1.5  # positive / 2, negative * 2, once per id
    np.testing.assert_allclose(out, expected)
    # Only the last `window` tokens count.
    out = sampling.apply_repetition_penalty(L, [0, 1, 3], 2.0, window=1)
    np.testing.assert_allclose(out, np.where(np.arange(6) == 3, L / 2, L))
    np.testing.assert_array_equal(sampling.apply_repetition_penalty(L, [0], 2.0, window=0), L)
    # Exempt ids are never penalised (e.g. the end-of-turn token).
    np.testing.assert_array_equal(sampling.apply_repetition_penalty(L, [3], 2.0, exempt={3}), L)
    np.testing.assert_array_equal(L, [2.0, -1.0, 0.5, 3.0, -3.0, 1.0])  # input untouched


def test_presence_and_frequency_penalties():
    out = sampling.apply_presence_penalty(L, [2, 2, 2, 5], 1.5)
    np.testing.assert_allclose(out, L - 1.5 * np.isin(np.arange(6), [2, 5]))
    out = sampling.apply_frequency_penalty(L, [2, 2, 2, 5], 0.5)
    np.testing.assert_allclose(out, L - 0.5 * np.bincount([2, 2, 2, 5], minlength=6))
    with pytest.raises(QoraError):
        sampling.apply_presence_penalty(L, [6], 1.0)  # out of the vocabulary
    with pytest.raises(QoraError):
        sampling.apply_presence_penalty(L, [-1], 1.0)


def test_validation():
    for bad in (-0.1, float("nan"), float("inf"), "hot", None):
        with pytest.raises(QoraError):
            sampling.check_temperature(bad)
    for bad in (0.0, -0.5, 1.01, float("nan")):
        with pytest.raises(QoraError):
            sampling.check_top_p(bad)
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(QoraError):
            sampling.check_top_k(bad)
    for bad in (-0.01, 1.0):
        with pytest.raises(QoraError):
            sampling.check_min_p(bad)
    for bad in (0.0, -1.0):
        with pytest.raises(QoraError):
            sampling.check_repeat_penalty(bad)
    with pytest.raises(QoraError):
        sampling.check_penalty("presence_penalty", float("inf"))
    with pytest.raises(QoraError):
        Sampler(top_p=0.0)
    with pytest.raises(QoraError):
        Sampler(seed=-1)
    with pytest.raises(QoraError):
        sampling.greedy(np.zeros((2, 3), np.float32))
    with pytest.raises(QoraError):
        sampling.greedy(np.zeros(0, np.float32))
    with pytest.raises(QoraError, match="NaN"):
        Sampler()(np.array([0.0, np.nan], np.float32))
    assert sampling.check_top_p(1) == 1.0 and sampling.check_top_k(3.0) == 3


def test_sampler_seeded_reproducible_and_distribution():
    rng_logits = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    a = Sampler(temperature=1.0, top_k=0, top_p=1.0, repeat_penalty=1.0, presence_penalty=0.0, seed=42)
    b = Sampler(temperature=1.0, top_k=0, top_p=1.0, repeat_penalty=1.0, presence_penalty=0.0, seed=42)
    c = Sampler(temperature=1.0, top_k=0, top_p=1.0, repeat_penalty=1.0, presence_penalty=0.0, seed=43)
    draws_a = [a(rng_logits) for _ in range(50)]
    assert draws_a == [b(rng_logits) for _ in range(50)]
    assert draws_a != [c(rng_logits) for _ in range(50)]
    # The draws follow softmax(logits / T): a chi-square-free check on a 3-token vector.
    s = Sampler(temperature=0.5, top_k=0, top_p=1.0, repeat_penalty=1.0, presence_penalty=0.0, seed=1)
    x = np.array([1.0, 0.0, -1.0], np.float32)
    counts = np.bincount([s(x) for _ in range(20000)], minlength=3) / 20000
    np.testing.assert_allclose(counts, probs(x / 0.5), atol=0.015)


def test_sampler_filters_are_applied():
    x = np.array([5.0, 4.9, 4.8, -10.0, 4.7], np.float32)
    s = Sampler(temperature=1.0, top_k=2, top_p=1.0, repeat_penalty=1.0, presence_penalty=0.0, seed=0)
    assert {s(x) for _ in range(300)} == {0, 1}
    s = Sampler(temperature=1.0, top_k=0, top_p=0.3, repeat_penalty=1.0, presence_penalty=0.0, seed=0)
    assert {s(x) for _ in range(300)} == {0, 1}  # p(0) ~ 0.28 < 0.3: the second token is needed
    s = Sampler(temperature=1.0, top_k=0, top_p=1.0, min_p=0.95, repeat_penalty=1.0, presence_penalty=0.0, seed=0)
    assert {s(x) for _ in range(300)} == {0}
    # greedy and temperature 0 take the argmax after penalties
    g = Sampler(greedy=True, repeat_penalty=1.0, presence_penalty=2.0)
    assert g(x) == 0 and g(x, [0]) == 1
    assert Sampler(temperature=0.0, presence_penalty=0.0, repeat_penalty=1.0)(x) == 0
    # exempt tokens (EOS) keep their logit
    g = Sampler(greedy=True, repeat_penalty=1.0, presence_penalty=2.0, exempt={0})
    assert g(x, [0, 0, 0]) == 0
    # banned tokens (ignore_eos) are never chosen, greedy or sampled; ids past the vocabulary are ignored
    g = Sampler(greedy=True, repeat_penalty=1.0, presence_penalty=0.0, banned={0, 99})
    assert g(x) == 1 and x[0] == 5.0  # the caller's logits are left as they were
    s = Sampler(temperature=1.0, top_k=0, top_p=1.0, repeat_penalty=1.0, presence_penalty=0.0, banned={0}, seed=0)
    assert {s(x) for _ in range(300)} == {1, 2, 4}


def test_sampler_large_vocab_stays_vectorised():
    x = np.random.default_rng(3).normal(size=128256).astype(np.float32)
    s = Sampler(seed=5)  # its defaults: top-k 20, top-p 0.95, rep 1.1, presence 1.5
    history = list(range(0, 128256, 1000))
    ids = [s(x, history) for _ in range(20)]
    top20 = set(np.argsort(-s.penalize(x, history))[:20].tolist())
    assert set(ids) <= top20


@pytest.mark.parametrize("scale", [0.3, 3.0, 8.0])
def test_top_p_large_vocab_matches_full_sort(scale):
    x = (np.random.default_rng(11).normal(size=50000) * scale).astype(np.float32)
    p = probs(x)
    order = np.argsort(-p, kind="stable")
    cum = np.cumsum(p[order])
    for top_p in (0.5, 0.9, 0.95):
        n = int(np.searchsorted(cum, top_p) + 1)
        assert kept(sampling.apply_top_p(x, top_p)) == set(order[:n].tolist()), (scale, top_p)
