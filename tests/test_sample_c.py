"""The C sampler (include/qora/sample.h) against the NumPy Sampler, its reference: for the same logits,
settings and seed, the same token, on random logits with ties, -inf and overflow, at vocabulary
sizes from 1 to SmolLM3's 128,256."""

from __future__ import annotations

import numpy as np
import pytest

from qora import sampling
from qora.errors import QoraError
from qora.sampling import Sampler

core = sampling._c_core()
pytestmark = [
    pytest.mark.skipif(core is None, reason="no compiled C sampler"),
    pytest.mark.filterwarnings("ignore:overflow encountered"),  # the "big" logits over a small temperature
]


class MaskConstraint:
    """A structured-output constraint with a fixed set of allowed ids over `bits` ids, offering both
    the NumPy path's apply() and the C path's mask_words()."""

    def __init__(self, allowed: np.ndarray):
        self.allowed = allowed
        self.words = np.packbits(allowed, bitorder="little")
        self.words = np.concatenate([self.words, np.zeros(-self.words.size % 4, np.uint8)]).view(np.uint32)
        self.taken: list[int] = []

    def mask_words(self):
        return self.words, self.allowed.size

    def apply(self, logits):
        n = min(self.allowed.size, logits.size)
        out = np.full_like(logits, -np.inf)
        out[:n] = np.where(self.allowed[:n], logits[:n], np.float32(-np.inf))
        return out

    def advance(self, token):
        self.taken.append(token)  # (greedy over nothing allowed picks id 0 on both paths: not checked here)


def _logits(rng, vocab: int, kind: str) -> np.ndarray:
    x = (rng.standard_normal(vocab) * rng.uniform(0.5, 4)).astype(np.float32)
    if kind == "ties":  # few distinct values: ties at the top-k boundary and in top-p
        x = np.round(x * 2) / 2
    elif kind == "flat":
        x[:] = 1.25
    elif kind == "ninf":
        x[rng.random(vocab) < 0.5] = -np.inf
    elif kind == "tiny":  # float32 values close enough that exp() rounds them to the same probability
        x = (x * np.float32(1e-30)).astype(np.float32)
    elif kind == "big":  # x / temperature overflows to inf for some settings
        x = (x * np.float32(1e37)).astype(np.float32)
    return x.astype(np.float32)


def _settings(rng, vocab: int) -> dict:
    top_ks = [1, 2, 5, 20, 40, 1024] + ([0] if vocab <= core.SAMPLE_MAX_K else [])
    s = dict(
        temperature=float(rng.choice([0.0, 0.05, 0.3, 0.7, 1.0, 1.7])),
        top_k=int(rng.choice(top_ks)),
        top_p=float(rng.choice([1.0, 0.95, 0.5, 0.01, 0.999])),
        min_p=float(rng.choice([0.0, 0.0, 0.05, 0.3])),
        repeat_penalty=float(rng.choice([1.0, 1.1, 0.8, 2.0])),
        repeat_window=int(rng.choice([0, 1, 8, 64, 10_000])),
        presence_penalty=float(rng.choice([0.0, 1.5, -0.5])),
        frequency_penalty=float(rng.choice([0.0, 0.3, -0.2])),
        greedy=bool(rng.random() < 0.1),
    )
    if rng.random() < 0.3:
        s["exempt"] = frozenset(rng.integers(0, vocab, 4).tolist())
    if rng.random() < 0.3:
        s["banned"] = frozenset(rng.integers(0, vocab + 5, 3).tolist())
    if rng.random() < 0.3:
        ids = rng.integers(0, vocab + 3, 5)
        s["logit_bias"] = {int(i): float(rng.uniform(-100, 100)) for i in ids}
    return s


def _agree(x: np.ndarray, settings: dict, history: list[int], seed: int, steps: int = 3, allowed=None) -> None:
    fast = Sampler(**settings, seed=seed)
    ref = Sampler(**settings, seed=seed, fast=False)
    if allowed is not None:
        fast.constraint, ref.constraint = MaskConstraint(allowed), MaskConstraint(allowed)
    assert fast._fast_for(x, fast.constraint), settings
    for _ in range(steps):
        try:
            want = ref(x, history)
        except QoraError as e:
            with pytest.raises(QoraError, match=str(e).split(":")[0]):
                fast(x, history)
            return
        got = fast(x, history)
        assert got == want, (settings, len(x))
        history = history + [got]
    assert fast.rng.random() == ref.rng.random()  # both drew the same uniform numbers


@pytest.mark.parametrize("vocab", [1, 2, 3, 7, 31, 100, 1000, 1023, 1025, 4097])
def test_c_sampler_picks_the_reference_token(vocab):
    rng = np.random.default_rng(vocab)
    for case in range(120):
        kind = ["normal", "ties", "flat", "ninf", "tiny", "big"][case % 6]
        x = _logits(rng, vocab, kind)
        history = rng.integers(0, vocab, int(rng.integers(0, 100))).tolist()
        allowed = rng.random(vocab + 3) < 0.7 if case % 5 == 0 else None
        _agree(x, _settings(rng, vocab), history, seed=case, allowed=allowed)


def test_c_sampler_at_smollm3_vocabulary():
    vocab = 128_256
    rng = np.random.default_rng(7)
    for case in range(24):
        x = _logits(rng, vocab, ["normal", "ties", "ninf", "normal"][case % 4])
        history = rng.integers(0, vocab, 80).tolist()
        settings = _settings(rng, vocab) if case else {}  # case 0: the defaults
        allowed = rng.random(vocab) < 0.5 if case % 6 == 5 else None
        _agree(x, settings, history, seed=case, allowed=allowed)


def test_c_sampler_ties_at_the_top_k_boundary():
    # ten equal values for five places: the five lowest ids, on both paths
    x = np.zeros(5000, np.float32)
    x[[4000, 17, 900, 3, 2500, 60, 4999, 1200, 8, 333]] = 5.0
    for seed in range(20):
        fast = Sampler(top_k=5, top_p=1.0, temperature=1.0, repeat_penalty=1.0, presence_penalty=0.0, seed=seed)
        ref = Sampler(
            top_k=5, top_p=1.0, temperature=1.0, repeat_penalty=1.0, presence_penalty=0.0, seed=seed, fast=False
        )
        t = fast(x)
        assert t == ref(x) and t in (3, 8, 17, 60, 333)
    kept = np.flatnonzero(np.isfinite(sampling.apply_top_k(x, 5)))
    assert kept.tolist() == [3, 8, 17, 60, 333]


def test_c_sampler_errors_match():
    x = np.zeros(50, np.float32)
    x[3] = np.nan
    for fast in (True, False):
        with pytest.raises(QoraError, match="NaN"):
            Sampler(fast=fast)(x)
        with pytest.raises(QoraError, match="out of range"):
            Sampler(fast=fast)(np.zeros(50, np.float32), [1, 50])
        with pytest.raises(QoraError, match="no token left"):
            Sampler(fast=fast, banned=frozenset(range(50)))(np.zeros(50, np.float32))


def test_routing():
    x = np.zeros(200_000, np.float32)
    assert Sampler()._fast_for(x, None)
    assert Sampler(greedy=True, top_k=0)._fast_for(x, None)
    assert not Sampler(top_k=0)._fast_for(x, None)  # a nucleus over the whole vocabulary: NumPy's
    assert not Sampler(top_k=core.SAMPLE_MAX_K + 1)._fast_for(x, None)
    assert Sampler(top_k=0)._fast_for(x[:100], None)
    assert not Sampler(fast=False)._fast_for(x, None)
    assert not Sampler()._fast_for(x, object())  # a constraint without mask_words


def test_pairwise_sum_is_numpys():
    rng = np.random.default_rng(3)
    for n in [0, 1, 7, 8, 9, 127, 128, 129, 255, 256, 1000, 1024, 3001]:
        a = np.exp(rng.standard_normal(n) * 20)
        assert core.pairwise_sum(a) == a.sum()
