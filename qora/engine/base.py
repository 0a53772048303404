"""What every engine is: the `Engine` protocol, and the policy both engines share (token checks,
RoPE frequencies, KV cache type, context size).

An engine owns the weights on its device and one KV cache, and runs `forward` over it. Everything
above it (qora.model.Model, the generation loop, chat, the server, bench) talks to an engine only
through this protocol; qora.engine.select chooses which one runs a model.
"""

from __future__ import annotations

import math
import os
from typing import Protocol, runtime_checkable

import numpy as np

from qora import dtypes, limits
from qora.errors import ContextOverflowError, QoraError


@runtime_checkable
class Engine(Protocol):
    """One model on one device, with one KV cache of `max_seq_len` positions kept inside.

    `forward(tokens, start_pos)` runs the tokens at positions start_pos.. and overwrites the cache
    there; positions past the last one written are never read, so moving back (a shorter prefix,
    qora.model.Model.reuse_prefix) needs no call: the next forward at that position overwrites them.
    `reset()` forgets the cached sequence (for engines with state beyond the cache: a GPU engine's
    record of the tokens it would replay on a CPU fallback).

    The description attributes are for reports (--verbose, `qora bench`, --version): `device` is
    "cpu" or "vulkan" (an engine may change it once, when a failing GPU hands over to the CPU),
    `device_name` the device ("cpu", or the GPU's name), `isa` the CPU kernel path (ISA_NAMES) or
    "vulkan", `kv_dtype` "f16" or "f32", `notes` lines for --verbose gathered while the engine was
    built (the GPU pre-flight, why the CPU runs the model).

    Several sequences at once (the server's batching scheduler, qora.api.batch): `open_slots(n)`
    allocates KV caches for up to n sequences ("slots", each of `max_seq_len` positions, apart from
    the cache `forward` uses) and returns how many it opened; `forward_batch(seqs)` runs one step
    over entries (slot, tokens, start_pos): decoding sequences give one token, a joining one a chunk
    of its prompt, all evaluated in one pass so the weights are read once for every row; it returns
    each entry's last-token logits (vocab,). `copy_slot(src, dst, n)` copies a slot's first n cached
    positions to another (a shared prompt prefix). Both engines run the batched step in one pass (the
    GPU's slots are device buffers). A cache of fixed-size KV blocks (block tables, prefix sharing
    without copies) would go here next.
    """

    max_seq_len: int
    vocab_size: int
    n_threads: int
    device: str
    device_name: str
    isa: str
    kv_dtype: str
    notes: list[str]

    def forward(self, tokens, start_pos: int, all_logits: bool = False) -> np.ndarray:
        """float32 logits, (len(tokens), vocab) if all_logits else (1, vocab) for the last token."""
        ...

    def reset(self) -> None: ...

    def close(self) -> None:
        """Free the device state; later calls raise QoraError("the model is closed")."""
        ...

    def open_slots(self, n_slots: int, context: int | None = None) -> int:
        """Allocate KV caches for up to n_slots sequences of batched steps, of `context` positions each
        (at most max_seq_len; default max_seq_len); the number opened."""
        ...

    def forward_batch(self, seqs) -> list[np.ndarray]:
        """One step over (slot, tokens, start_pos) entries: each entry's last-token logits (vocab,)."""
        ...

    def copy_slot(self, src: int, dst: int, n: int) -> None:
        """Copy positions 0..n-1 of slot src's cache to slot dst."""
        ...


# The attributes and methods of the protocol, for checks (tests/test_engine_protocol.py).
ENGINE_ATTRIBUTES = ("max_seq_len", "vocab_size", "n_threads", "device", "device_name", "isa", "kv_dtype", "notes")
ENGINE_METHODS = ("forward", "reset", "close", "open_slots", "forward_batch", "copy_slot")


def slot_request(n_slots, context, max_seq_len: int) -> tuple[int, int]:
    """Checked (slots, positions per slot) of an open_slots call: 1..MAX_BATCH_SLOTS slots, a context of at
    least 1 and at most (and by default) max_seq_len."""
    n_slots = int(n_slots)
    if not 1 <= n_slots <= limits.MAX_BATCH_SLOTS:
        raise QoraError(f"n_slots must be in 1..{limits.MAX_BATCH_SLOTS}, got {n_slots}")
    ctx = min(int(context), max_seq_len) if context else max_seq_len
    if ctx < 1:
        raise QoraError(f"a slot's context must be >= 1, got {context}")
    return n_slots, ctx


def batch_entries(seqs, n_slots: int, max_seq_len: int, vocab_size: int) -> list[tuple[int, np.ndarray, int]]:
    """Checked (slot, token ids int32, start_pos) entries of a batched step (clear errors before C)."""
    if n_slots < 1:
        raise QoraError("open_slots first: this engine has no sequence slots")
    out = []
    for entry in seqs:
        slot, tokens, start = entry
        slot, start = int(slot), int(start)
        if not 0 <= slot < n_slots:
            raise QoraError(f"slot {slot} is not in [0, {n_slots})")
        out.append((slot, check_tokens(tokens, start, max_seq_len, vocab_size), start))
    if not out:
        raise QoraError("forward_batch needs at least one entry")
    return out


def rope_parameters(cfg: dict) -> tuple[np.ndarray, float]:
    """Inverse frequencies (head_dim/2,) and the cos/sin scale, as transformers computes them."""
    dim = cfg["head_dim"]
    base = float(cfg["rope_theta"])
    exps = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    pos_freqs = np.float32(base) ** exps
    inv_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)
    rs = cfg.get("rope_scaling") or None
    kind = (rs or {}).get("rope_type", (rs or {}).get("type", "default"))
    if not rs or kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return (inv_freq / np.float32(rs["factor"])).astype(np.float32), 1.0
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, rs), 1.0
    if kind != "yarn":
        raise QoraError(f"unsupported rope_scaling type {kind!r} (qora supports default, linear, llama3, yarn)")
    factor = float(rs["factor"])
    max_pos = int(cfg["max_seq_len"])
    if rs.get("original_max_position_embeddings"):
        orig = int(rs["original_max_position_embeddings"])
        factor = max_pos / orig  # transformers derives the factor from the two lengths when both are given
    else:
        orig = max_pos

    def get_mscale(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attn = rs.get("attention_factor")
    if attn is None:
        if rs.get("mscale") and rs.get("mscale_all_dim"):
            attn = get_mscale(factor, rs["mscale"]) / get_mscale(factor, rs["mscale_all_dim"])
        else:
            attn = get_mscale(factor)
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1

    def corr_dim(rot):
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extra = np.float32(1.0) - ramp
    inv_interp = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    inv = inv_interp * (1 - extra) + inv_freq * extra
    return inv.astype(np.float32), float(attn)


YARN_DEFAULT_FACTOR = 2.0  # SmolLM3's model card: its 65,536 positions -> 131,072
YARN_MAX_FACTOR = 64.0


def parse_rope_scaling(spec: str) -> float:
    """The YaRN factor of a --rope-scaling value: "yarn" (factor 2, SmolLM3's card) or "yarn:F"."""
    kind, _, factor = str(spec).strip().lower().partition(":")
    if kind != "yarn":
        raise QoraError(f"--rope-scaling {spec!r}: only yarn or yarn:FACTOR is supported")
    try:
        f = float(factor) if factor else YARN_DEFAULT_FACTOR
    except ValueError:
        f = math.nan
    if not 1.0 < f <= YARN_MAX_FACTOR:
        raise QoraError(f"--rope-scaling {spec!r}: the factor must be a number in (1, {YARN_MAX_FACTOR:g}]")
    return f


def with_rope_scaling(cfg: dict, spec: str | None = None) -> dict:
    """The config the engines run. `spec` ("yarn" / "yarn:F", the --rope-scaling flag or
    qora.load(rope_scaling=)) puts YaRN by factor F over the model's trained context (the
    original_max_position_embeddings of a YaRN block it has, else its max_seq_len), and the context
    grows to F times that. Without a spec, a YaRN block written as SmolLM3's card says (factor 2,
    original_max_position_embeddings 65536, max_position_embeddings left at 65536) means the same:
    context factor x original (transformers would derive factor 1 from the two equal lengths, that
    is no scaling; llama.cpp and vLLM use the factor). Any other config is returned as it is."""
    rs = cfg.get("rope_scaling") or {}
    yarn = rs.get("rope_type", rs.get("type")) == "yarn"
    if spec is None:
        if not yarn or not rs.get("original_max_position_embeddings"):
            return cfg
        factor, orig = float(rs.get("factor") or 1), int(rs["original_max_position_embeddings"])
        if factor <= 1 or int(cfg["max_seq_len"]) != orig:
            return cfg
    else:
        factor = parse_rope_scaling(spec)
        orig = (
            int(rs.get("original_max_position_embeddings") or cfg["max_seq_len"]) if yarn else int(cfg["max_seq_len"])
        )
    new = dict(cfg)
    new["rope_scaling"] = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": orig}
    new["max_seq_len"] = int(factor * orig)
    if new["max_seq_len"] > limits.CONFIG_INT_LIMITS["max_seq_len"]:
        raise QoraError(f"--rope-scaling {spec!r}: a {new['max_seq_len']}-token context is beyond qora's limit")
    return new


def _llama3_inv_freq(inv_freq: np.ndarray, rs: dict) -> np.ndarray:
    """Llama 3.1+ frequency scaling: long wavelengths divided by `factor`, a smooth ramp between."""
    factor = float(rs["factor"])
    low, high = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
    old_ctx = float(rs.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


# Bytes of one cached key or value element per KV cache type: q8 is llama.cpp's Q8_0 (a block of 32
# int8 and one f16 scale, 34 bytes), each block inside one head.
KV_ELEMENT_BYTES = {"f32": 4.0, "f16": 2.0, "q8": 34 / 32}
KV_TYPES = tuple(KV_ELEMENT_BYTES)


def kv_cache_dtype(qfile, requested: str | None = None) -> str:
    """The KV cache type, the one policy both engines follow: `requested` (--kv-type,
    qora.load(kv_type=)), else QORA_KV, else f16 for quantized models (half the bytes attention
    streams, as llama.cpp does) and f32 for f16/f32 weights, whose users asked for full precision.
    q8 (Q8_0 blocks, about half of f16) needs head_dim to be a multiple of the block's 32."""
    source = "--kv-type" if requested else "QORA_KV"
    want = str(requested or os.environ.get("QORA_KV", "")).strip().lower()
    if not want:
        wq = qfile.tensor_info.get("layers.0.wq", {}).get("dtype")
        return "f16" if wq in dtypes.QUANTIZED else "f32"
    if want not in KV_TYPES:
        raise QoraError(f"{source} {want!r} is not one of {', '.join(KV_TYPES)}")
    head_dim = int(qfile.config["head_dim"])
    if want == "q8" and head_dim % 32:
        raise QoraError(f"{source} q8 needs a head size that is a multiple of 32; this model's is {head_dim}")
    return want


def context_bytes_per_token(cfg: dict, kv_dtype: str = "f32") -> float:
    """Memory one token of context costs the engine: its keys and values in every layer, plus the
    attention scratch that grows with the context (include/qora/forward.h: QORA_CHUNK rows of
    scores per position, and each 256-position chunk's partial sums for QORA_CHUNK queries)."""
    if kv_dtype not in KV_ELEMENT_BYTES:
        raise QoraError(f"KV cache type {kv_dtype!r} is not one of {', '.join(KV_ELEMENT_BYTES)}")
    kv = 2 * cfg["n_layers"] * cfg["n_kv_heads"] * cfg["head_dim"] * KV_ELEMENT_BYTES[kv_dtype]
    scores = 16 * cfg["n_heads"] * 4
    partials = 16 * cfg["n_heads"] * (cfg["head_dim"] + 2) * 4 / 256
    return kv + scores + partials


def default_context(cfg: dict, requested: int | None = None, kv_dtype: str = "f32") -> int:
    """KV cache size: the request if given (checked against available RAM for a cache of kv_dtype),
    else what fits a quarter of free RAM (at most 16384)."""
    max_pos = int(cfg["max_seq_len"])
    per_token = context_bytes_per_token(cfg, kv_dtype)
    try:
        import psutil

        avail = psutil.virtual_memory().available
    except Exception:
        avail = 8 << 30
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise QoraError(f"max_seq_len must be a positive integer, got {requested!r}")
        n = min(requested, max_pos)
        # Checked before the engine allocates: a context that cannot fit is an error, not an OOM kill.
        if n * per_token > limits.MAX_CONTEXT_RAM_FRACTION * avail:
            fits = int(limits.MAX_CONTEXT_RAM_FRACTION * avail // per_token)
            raise ContextOverflowError(
                f"a {n}-token context needs {n * per_token / 2**30:.1f} GiB for its {kv_dtype} KV cache but only "
                f"{avail / 2**30:.1f} GiB of memory is available; about {fits} tokens fit: ask for a smaller context"
            )
        return n
    fit = max(512, int(avail // 4 // per_token))
    return max(1, min(max_pos, 16384, fit))


def check_tokens(tokens, start_pos: int, max_seq_len: int, vocab_size: int) -> np.ndarray:
    """Token ids as a flat int32 array, after the checks every engine's forward needs (clear errors,
    never an out-of-range index reaching C)."""
    ids = np.ascontiguousarray(np.asarray(tokens, dtype=np.int64).reshape(-1))
    n = ids.shape[0]
    if n == 0:
        raise QoraError("forward needs at least one token")
    if start_pos < 0:
        raise QoraError(f"start_pos must be >= 0, got {start_pos}")
    if start_pos + n > max_seq_len:
        raise ContextOverflowError(
            f"{start_pos + n} tokens do not fit the {max_seq_len}-token context "
            f"(prompt or conversation too long; raise max_seq_len or shorten it)"
        )
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise QoraError(f"token id out of range [0, {vocab_size})")
    return ids.astype(np.int32)
