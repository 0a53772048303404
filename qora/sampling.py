"""Choosing the next token from a logits vector.

Small functions over one float32 logits vector of shape (vocab,), each validated and vectorised
(NumPy, no per-element Python loops). Filters return a new array where removed tokens are -inf;
penalties return a new array with the penalised logits. `Sampler` chains them in the order
transformers uses (penalties, temperature, top-k, top-p, min-p), then draws with a seeded
`numpy.random.Generator`.

Penalties follow llama.cpp: repetition, presence and frequency penalties all look at the same recent
window of generated tokens (`repeat_window`, 64 by default). A window, not the whole answer, because
a presence penalty of 1.5 on every token ever used would, a few hundred tokens in, push the model off
common words ("the", digits, code keywords) it legitimately needs again; a window breaks loops
without that. Control tokens (EOS, end of turn, think tags) are exempt: penalising the end-of-turn
token would make answers run on. `banned` tokens are never chosen (ignore_eos masks the stop tokens).

After the penalties: `logit_bias` (OpenAI's: a number in [-100, 100] added to a token's logit), then
the `constraint` of structured output (qora/structured.py), whose mask sets every token the grammar
refuses to -inf before temperature, top-k and top-p look at the logits; the chosen token is handed
back to it. `__call__(..., constrain=False)` skips it (tokens of the thinking channel are free).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from qora.errors import QoraError

# ───── defaults ─────


@dataclass(frozen=True)
class SamplingDefaults:
    """One set of sampling defaults for every model, chosen for SmolLM3: the Sampler's own defaults,
    what generate.GenerationOptions.resolved fills in, and what the CLI's --help states."""

    temperature_think: float = 0.6  # the model will think
    temperature: float = 0.7  # it will not
    top_k: int = 20
    top_p: float = 0.95
    min_p: float = 0.0
    repeat_penalty: float = 1.1
    repeat_window: int = 64  # tokens every penalty looks back over
    presence_penalty: float = 1.5
    frequency_penalty: float = 0.0


DEFAULTS = SamplingDefaults()
_WINDOW = DEFAULTS.repeat_window

# ───── validation ─────


def _check_logits(logits) -> np.ndarray:
    x = np.asarray(logits)
    if x.ndim == 2 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 1 or x.size == 0:
        raise QoraError(f"logits must be a non-empty vector, got shape {x.shape}")
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    return x


def _number(name: str, value, low=None, high=None, low_open=False, high_open=False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise QoraError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise QoraError(f"{name} must be finite, got {value!r}")
    if low is not None and (v < low or (low_open and v == low)):
        raise QoraError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (v > high or (high_open and v == high)):
        raise QoraError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")
    return v


def _integer(name: str, value, low=None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise QoraError(f"{name} must be an integer, got {value!r}")
    v = int(value)
    if low is not None and v < low:
        raise QoraError(f"{name} must be >= {low}, got {value!r}")
    return v


def check_temperature(t) -> float:
    """temperature >= 0 (0 means greedy)."""
    return _number("temperature", t, low=0.0)


def check_top_k(k) -> int:
    """top_k >= 0 (0 disables it)."""
    return _integer("top_k", k, low=0)


def check_top_p(p) -> float:
    """top_p in (0, 1] (1 disables it)."""
    return _number("top_p", p, low=0.0, high=1.0, low_open=True)


def check_min_p(p) -> float:
    """min_p in [0, 1) (0 disables it)."""
    return _number("min_p", p, low=0.0, high=1.0, high_open=True)


def check_repeat_penalty(p) -> float:
    """repeat_penalty > 0 (1 disables it; below 1 encourages repetition)."""
    return _number("repeat_penalty", p, low=0.0, low_open=True)


def check_penalty(name: str, p) -> float:
    """presence / frequency penalty: any finite number (0 disables it, negative encourages)."""
    return _number(name, p)


def _recent_ids(tokens: Iterable[int], window: int | None, vocab: int, exempt=None) -> np.ndarray:
    """The token ids of the last `window` tokens (all when None) as an int64 array, range-checked."""
    if window is not None:
        window = _integer("repeat_window", window, low=0)
        if not isinstance(tokens, (np.ndarray, list, tuple)):
            tokens = list(tokens)
        tokens = tokens[len(tokens) - window :] if window < len(tokens) else tokens
    t = np.asarray(tokens if isinstance(tokens, np.ndarray) else list(tokens), dtype=np.int64).ravel()
    if t.size and (t.min() < 0 or t.max() >= vocab):
        raise QoraError(f"token id out of range for a vocabulary of {vocab}")
    if exempt is not None and t.size:
        t = t[~np.isin(t, np.asarray(list(exempt), dtype=np.int64))]
    return t


# ───── the functions ─────


def greedy(logits) -> int:
    """Index of the largest logit (argmax; the first one on ties)."""
    return int(np.argmax(_check_logits(logits)))


def apply_temperature(logits, temperature: float) -> np.ndarray:
    """logits / temperature (temperature > 0; use greedy() for 0)."""
    x = _check_logits(logits)
    t = check_temperature(temperature)
    if t == 0.0:
        raise QoraError("temperature 0 means greedy: use greedy() instead of dividing by zero")
    return x / np.float32(t) if t != 1.0 else x.copy()


def apply_top_k(logits, k: int) -> np.ndarray:
    """Keep the k largest logits, -inf elsewhere (k=0 or k >= vocab keeps all). Ties at the k-th
    value go to the lower ids, so exactly k survive, the same k as the C sampler's."""
    x = _check_logits(logits)
    k = check_top_k(k)
    if k == 0 or k >= x.size:
        return x.copy()
    keep = np.argpartition(x, -k)[-k:]
    kth = x[keep].min()
    above = keep[x[keep] > kth]
    tied = np.flatnonzero(x == kth)
    if tied.size > k - above.size:  # argpartition left the choice among the tied to its own order
        keep = np.concatenate([above, tied[: k - above.size]])
    out = np.full_like(x, -np.inf)
    out[keep] = x[keep]
    return out


def _softmax(x: np.ndarray) -> np.ndarray:
    """Probabilities in float64 (-inf entries get 0)."""
    finite = np.isfinite(x)
    if not finite.any():
        raise QoraError("no token left to sample: every logit is -inf")
    m = x[finite].max()
    e = np.exp(x.astype(np.float64) - m)
    e[~finite] = 0.0
    return e / e.sum()


def apply_top_p(logits, p: float) -> np.ndarray:
    """Nucleus filter: keep the most probable tokens whose cumulative probability first reaches p
    (the token that crosses p is kept; at least one token always is), -inf elsewhere."""
    x = _check_logits(logits)
    p = check_top_p(p)
    if p >= 1.0:
        return x.copy()
    probs = _softmax(x)
    cand = np.flatnonzero(probs > 0)
    # Sorting a whole vocabulary (128K) costs tens of ms per token; the nucleus is nearly always
    # within the top few hundred, so sort only the top m (argpartition, O(V)) when they reach p.
    m = 1024
    if cand.size > 2 * m:
        top = cand[np.argpartition(-probs[cand], m)[:m]]
        if probs[top].sum() >= p:
            cand = top
    order = cand[np.argsort(-probs[cand], kind="stable")]
    mass_before = np.cumsum(probs[order]) - probs[order]  # probability of the tokens ranked above
    keep = order[mass_before < p]
    out = np.full_like(x, -np.inf)
    out[keep] = x[keep]
    return out


def apply_min_p(logits, min_p: float) -> np.ndarray:
    """Keep tokens whose probability is at least min_p times the top token's, -inf elsewhere."""
    x = _check_logits(logits)
    min_p = check_min_p(min_p)
    if min_p == 0.0:
        return x.copy()
    # p_i >= min_p * p_max  <=>  x_i >= x_max + log(min_p): no softmax needed.
    threshold = x[np.isfinite(x)].max() + np.float32(math.log(min_p)) if np.isfinite(x).any() else np.inf
    return np.where(x >= threshold, x, np.float32(-np.inf)).astype(np.float32)


def apply_repetition_penalty(
    logits, tokens: Sequence[int], penalty: float, window: int | None = _WINDOW, exempt: Iterable[int] | None = None
) -> np.ndarray:
    """HF / CTRL repetition penalty over the distinct ids among the last `window` tokens: positive
    logits are divided by `penalty`, negative ones multiplied (so penalty > 1 always lowers them)."""
    x = _check_logits(logits)
    penalty = check_repeat_penalty(penalty)
    out = x.copy()
    ids = np.unique(_recent_ids(tokens, window, x.size, exempt))
    if penalty == 1.0 or ids.size == 0:
        return out
    v = out[ids]
    out[ids] = np.where(v > 0, v / np.float32(penalty), v * np.float32(penalty))
    return out


def apply_presence_penalty(
    logits, tokens: Sequence[int], penalty: float, window: int | None = _WINDOW, exempt: Iterable[int] | None = None
) -> np.ndarray:
    """Subtract `penalty` once from the logit of every distinct id among the last `window` tokens."""
    return _subtract_penalty("presence_penalty", logits, tokens, penalty, window, exempt, per_occurrence=False)


def apply_frequency_penalty(
    logits, tokens: Sequence[int], penalty: float, window: int | None = _WINDOW, exempt: Iterable[int] | None = None
) -> np.ndarray:
    """Subtract `penalty` times its count from the logit of every id among the last `window` tokens."""
    return _subtract_penalty("frequency_penalty", logits, tokens, penalty, window, exempt, per_occurrence=True)


def _subtract_penalty(name, logits, tokens, penalty, window, exempt, per_occurrence: bool) -> np.ndarray:
    x = _check_logits(logits)
    penalty = check_penalty(name, penalty)
    out = x.copy()
    ids, counts = np.unique(_recent_ids(tokens, window, x.size, exempt), return_counts=True)
    if penalty != 0.0 and ids.size:
        out[ids] -= np.float32(penalty) * counts.astype(np.float32) if per_occurrence else np.float32(penalty)
    return out


def sample_from(logits, rng: np.random.Generator) -> int:
    """Draw one token id with probability softmax(logits) (-inf entries are never drawn)."""
    return _draw(_check_logits(logits), rng.random)


def _draw(x: np.ndarray, uniform) -> int:
    """sample_from with the uniform number in [0, 1) from uniform() (called once, after the checks)."""
    probs = _softmax(x)
    cdf = np.cumsum(probs)
    i = int(np.searchsorted(cdf, uniform() * cdf[-1], side="right"))
    i = min(i, x.size - 1)
    while probs[i] == 0.0 and i > 0:  # float edge: landed on a zero-probability tail entry
        i -= 1
    return i


LOGIT_BIAS_LIMIT = 100.0


def check_logit_bias(bias, vocab: int | None = None) -> dict[int, float]:
    """{token id: bias in [-100, 100]} (ids may be given as decimal strings, as OpenAI's JSON does)."""
    if bias is None:
        return {}
    if not isinstance(bias, dict):
        raise QoraError(f"logit_bias must be a map of token id to bias, got {type(bias).__name__}")
    from qora import limits

    if len(bias) > limits.LOGIT_BIAS_MAX_ENTRIES:
        raise QoraError(f"logit_bias may hold at most {limits.LOGIT_BIAS_MAX_ENTRIES} tokens")
    out = {}
    for key, value in bias.items():
        if isinstance(key, str) and key.strip().isdigit():
            key = int(key)
        i = _integer("logit_bias token id", key, low=0)
        if vocab is not None and i >= vocab:
            raise QoraError(f"logit_bias token id {i} is out of range for a vocabulary of {vocab}")
        out[i] = _number(f"logit_bias[{i}]", value, low=-LOGIT_BIAS_LIMIT, high=LOGIT_BIAS_LIMIT)
    return out


# ───── the sampler ─────


@dataclass
class Sampler:
    """Penalties, then greedy argmax or temperature / top-k / top-p / min-p sampling.

    Call it with the logits and the generated tokens so far: `sampler(logits, tokens) -> id`.
    temperature 0 or greedy=True picks the argmax (after penalties). seed makes draws reproducible.
    """

    temperature: float = DEFAULTS.temperature
    top_k: int = DEFAULTS.top_k
    top_p: float = DEFAULTS.top_p
    min_p: float = DEFAULTS.min_p
    repeat_penalty: float = DEFAULTS.repeat_penalty
    repeat_window: int = DEFAULTS.repeat_window
    presence_penalty: float = DEFAULTS.presence_penalty
    frequency_penalty: float = DEFAULTS.frequency_penalty
    seed: int | None = None
    greedy: bool = False
    exempt: frozenset[int] = frozenset()
    banned: frozenset[int] = frozenset()
    logit_bias: dict | None = None
    constraint: object | None = None  # a structured.Constraint: apply(logits) -> masked, advance(token)
    fast: bool = True  # choose in C where the settings allow (the same token); False: this module's NumPy

    def __post_init__(self):
        self.temperature = check_temperature(self.temperature)
        self.top_k = check_top_k(self.top_k)
        self.top_p = check_top_p(self.top_p)
        self.min_p = check_min_p(self.min_p)
        self.repeat_penalty = check_repeat_penalty(self.repeat_penalty)
        self.repeat_window = _integer("repeat_window", self.repeat_window, low=0)
        self.presence_penalty = check_penalty("presence_penalty", self.presence_penalty)
        self.frequency_penalty = check_penalty("frequency_penalty", self.frequency_penalty)
        if self.seed is not None:
            self.seed = _integer("seed", self.seed, low=0)
        self.exempt = frozenset(int(i) for i in self.exempt)
        self.banned = frozenset(int(i) for i in self.banned)
        self._banned = np.fromiter(sorted(self.banned), dtype=np.int64, count=len(self.banned))
        self.logit_bias = check_logit_bias(self.logit_bias)
        self._bias_ids = np.fromiter(self.logit_bias, dtype=np.int64, count=len(self.logit_bias))
        self._bias = np.fromiter(self.logit_bias.values(), dtype=np.float32, count=len(self.logit_bias))
        self.rng = np.random.default_rng(self.seed)
        self._c = None  # the C sampler, made on first use

    def penalize(self, logits, tokens: Sequence[int]) -> np.ndarray:
        x = _check_logits(logits)
        w, ex = self.repeat_window, self.exempt
        if self.repeat_penalty != 1.0:
            x = apply_repetition_penalty(x, tokens, self.repeat_penalty, w, ex)
        if self.presence_penalty != 0.0:
            x = apply_presence_penalty(x, tokens, self.presence_penalty, w, ex)
        if self.frequency_penalty != 0.0:
            x = apply_frequency_penalty(x, tokens, self.frequency_penalty, w, ex)
        return x

    def __call__(self, logits, tokens: Sequence[int] = (), constrain: bool = True) -> int:
        constraint = self.constraint if constrain else None
        u = None
        if getattr(logits, "candidates", None) is not None:  # a GPU step's row left on the device
            token, u = self._call_device(logits, tokens, constraint)
            if token is not None:
                return token
        x = _check_logits(logits)  # (a device row is copied back here)
        if self._fast_for(x, constraint):
            return self._call_c(x, tokens, constraint, u)
        if np.isnan(x).any():
            raise QoraError("the model produced NaN logits")
        x = self.penalize(x, tokens)
        if self._bias_ids.size:
            x = x.copy()  # may still be the caller's array
            ok = self._bias_ids < x.size
            x[self._bias_ids[ok]] += self._bias[ok]
        if self._banned.size:
            x = x.copy()
            x[self._banned[(self._banned >= 0) & (self._banned < x.size)]] = -np.inf
        if constraint is not None:
            x = constraint.apply(x)
        token = self._choose(x)
        if constraint is not None:
            constraint.advance(token)
        return token

    def _fast_for(self, x: np.ndarray, constraint) -> bool:
        """Whether the C sampler (qora/_core/sample.pxi) takes this call. It chooses the token this
        module would, and this module stays the reference for what C does not take."""
        if not self.fast or _c_core() is None:
            return False
        if constraint is not None and not hasattr(constraint, "mask_words"):
            return False  # a constraint that only offers apply(logits): only the NumPy path can use it
        if not (self.greedy or self.temperature == 0.0):
            k = self.top_k if 0 < self.top_k < x.size else x.size
            if k > _c_core().SAMPLE_MAX_K:
                return False  # no top-k cut: top-p over the whole vocabulary sorts it, as the reference does
        return True

    def _c_sampler(self):
        if self._c is None:
            self._c = _c_core().CSampler(
                self.greedy or self.temperature == 0.0,
                np.float32(self.temperature),
                self.top_k,
                self.top_p,
                self.min_p,
                np.float32(math.log(self.min_p)) if self.min_p > 0.0 else 0.0,
                np.float32(self.repeat_penalty),
                np.float32(self.presence_penalty),
                np.float32(self.frequency_penalty),
                sorted(self.exempt),
                self._bias_ids.astype(np.int32),
                self._bias,
                self._banned.clip(-1, 2**31 - 1),
            )
        return self._c

    def _call_device(self, logits, tokens, constraint) -> tuple[int | None, float | None]:
        """(token, None) chosen from a device row's candidates (qora.engine.vulkan.DeviceLogits), or
        (None, the uniform number drawn) when the whole row must decide: settings that can raise a
        logit from below the candidates' threshold or mask any (those need every logit), top-k off or
        too wide, or candidates that leave a tie open."""
        greedy = self.greedy or self.temperature == 0.0
        lowering = (
            self.repeat_penalty >= 1.0
            and self.presence_penalty >= 0.0
            and self.frequency_penalty >= 0.0
            and not (self._bias > 0).any()
        )
        vocab = logits.vocab_size
        if not (self.fast and _c_core() is not None and lowering and constraint is None):
            return None, None
        if not greedy and not 0 < self.top_k < min(vocab, _c_core().SAMPLE_MAX_K):
            return None, None
        u = 0.0 if greedy else self.rng.random()
        token = self._c_sampler().sample_sparse(logits.candidates, vocab, self._recent(tokens), u)
        if token == _c_core().SAMPLE_ERRORS_BY_KIND["args"]:
            return None, u
        if token < 0:
            raise _c_error(token, vocab)
        return token, None

    def _recent(self, tokens):
        penalties = self.repeat_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
        return _window(tokens, self.repeat_window) if penalties else ()

    def _call_c(self, x: np.ndarray, tokens, constraint, u: float | None = None) -> int:
        recent = self._recent(tokens)
        mask, bits = constraint.mask_words() if constraint is not None else (None, 0)
        greedy = self.greedy or self.temperature == 0.0
        if u is None:
            u = 0.0 if greedy else self.rng.random()
        token = self._c_sampler().sample(np.ascontiguousarray(x), recent, u, mask, bits)
        if token < 0:
            raise _c_error(token, x.size)
        if constraint is not None:
            constraint.advance(token)
        return token

    def _choose(self, x: np.ndarray) -> int:
        if self.greedy or self.temperature == 0.0:
            return greedy(x)
        x = apply_temperature(x, self.temperature)
        if self.top_k:
            x = apply_top_k(x, self.top_k)
        # Continue on the surviving candidates only (k of them after top-k, not the whole vocabulary).
        ids = np.flatnonzero(np.isfinite(x))
        if ids.size == 0:
            raise QoraError("no token left to sample: every logit is -inf")
        sub = x[ids]
        if self.top_p < 1.0:
            sub = apply_top_p(sub, self.top_p)
        if self.min_p > 0.0:
            sub = apply_min_p(sub, self.min_p)
        return int(ids[sample_from(sub, self.rng)])


def _window(tokens, window: int):
    """The last `window` tokens as a list or tuple (what the C sampler reads)."""
    if not isinstance(tokens, (list, tuple)):
        tokens = list(tokens.tolist() if isinstance(tokens, np.ndarray) else tokens)
    return tokens[len(tokens) - window :] if window < len(tokens) else tokens


_C_CORE: list = []


def _c_core():
    """qora._core._cpu (its CSampler), or None in a build without it."""
    if not _C_CORE:
        try:
            from qora._core import _cpu
        except ImportError:
            _cpu = None
        _C_CORE.append(_cpu if hasattr(_cpu, "CSampler") else None)
    return _C_CORE[0]


def _c_error(code: int, vocab: int) -> QoraError:
    kind = _c_core().SAMPLE_ERRORS.get(code)
    if kind == "nan":
        return QoraError("the model produced NaN logits")
    if kind == "range":
        return QoraError(f"token id out of range for a vocabulary of {vocab}")
    if kind == "empty":
        return QoraError("no token left to sample: every logit is -inf")
    return QoraError(f"the C sampler refused the settings (code {code})")
