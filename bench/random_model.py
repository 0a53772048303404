"""Write a .qora with random weights of an exact model shape (default: SmolLM3-3B).

Random Q4 weights run at the same speed as real ones: decode is bound by the
bytes streamed, not by their values. --quant q4_k_m stores each tensor in the type llama-quantize's
Q4_K_M gives it (qora.quant.recipe_type: Q4_K, Q6_K for the tied embedding / LM head and for attn_v and
ffn_down in its use_more_bits layers). Usage:
    python bench/random_model.py -o /tmp/smollm3-3b-random-q4.qora [--quant q4|q8|f16|q4_k_m] [--layers 36]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from qora.dtypes import WEIGHT_TYPES
from qora.format import QoraWriter
from qora.quant import nbytes, recipe_type

HERE = Path(__file__).resolve().parent
QUANTS = ("q4", "q8", "f16", "q4_k_m")  # q4_k_m: a mix, by llama-quantize's recipe
SMOLLM3_CONFIG = {
    "architecture": "smollm3",
    "n_layers": 36,
    "dim": 2048,
    "n_heads": 16,
    "n_kv_heads": 4,
    "head_dim": 128,
    "hidden_dim": 11008,
    "vocab_size": 128256,
    "norm_eps": 1e-6,
    "rope_theta": 5e6,
    "rope_layers": [0 if i % 4 == 3 else 1 for i in range(36)],
    "rope_scaling": None,
    "max_seq_len": 65536,
    "tie_embeddings": True,
}


def random_tensor(rng, dtype, shape):
    """Random but well-scaled values: Q4/Q8 blocks get small f16 scales so activations stay finite."""
    if dtype == "f32":
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    if dtype == "f16":
        return (0.02 * rng.standard_normal(shape)).astype(np.float16)
    rows, cols = shape
    t = WEIGHT_TYPES[dtype]
    nb, bsz = cols // t.block, t.block_bytes
    raw = rng.integers(0, 256, size=(rows, nb, bsz), dtype=np.uint8)
    if dtype == "q8":
        raw[:, :, 2:][raw[:, :, 2:] == 128] = 129  # int8 -128 never comes out of the quantizer
    # f16 scales (and K minimums) small enough that a K type's 6-bit / int8 sub-scales keep values < ~0.3
    scale = np.full((rows, nb), 0.002 if t.block == 32 else 0.0002, dtype=np.float16).view(np.uint8)
    for off in t.scales:
        raw[:, :, off : off + 2] = scale.reshape(rows, nb, 2)
    return raw.reshape(rows, nb * bsz)


def tensor_list(cfg, quant):
    if quant == "q4_k_m":  # each matrix in its recipe type (the tied embedding is the LM head too)
        n, out = cfg["n_layers"], []
        for name, dt, s in tensor_list(cfg, "q4"):
            as_name = name + ".tied" if name == "tok_embeddings" else name
            out.append((name, dt if dt == "f32" else recipe_type(as_name, "q4_k", s, n), s))
        return out
    D, H, V = cfg["dim"], cfg["hidden_dim"], cfg["vocab_size"]
    q, kv = cfg["n_heads"] * cfg["head_dim"], cfg["n_kv_heads"] * cfg["head_dim"]
    out = [("tok_embeddings", quant, (V, D))]
    for i in range(cfg["n_layers"]):
        p = f"layers.{i}."
        out += [
            (p + "attn_norm", "f32", (D,)),
            (p + "wq", quant, (q, D)),
            (p + "wk", quant, (kv, D)),
            (p + "wv", quant, (kv, D)),
            (p + "wo", quant, (D, q)),
            (p + "ffn_norm", "f32", (D,)),
            (p + "w_gate", quant, (H, D)),
            (p + "w_up", quant, (H, D)),
            (p + "w_down", quant, (D, H)),
        ]
    out.append(("norm", "f32", (D,)))
    return out


def write_random_model(path, quant="q4", n_layers=None, seed=0):
    cfg = dict(SMOLLM3_CONFIG)
    if n_layers:
        cfg["n_layers"] = n_layers
        cfg["rope_layers"] = cfg["rope_layers"][:n_layers]
    tok = (HERE.parent / "tests" / "fixtures" / "tiny-smollm3" / "tokenizer.json").read_text()
    tensors = tensor_list(cfg, quant)
    rng = np.random.default_rng(seed)
    w = QoraWriter(
        path,
        cfg,
        tok,
        None,
        {},
        {"eos": [], "bos": None},
        {"from": "random", "quant": quant, "seed": seed},
        tensors=tensors,
    )
    for name, dtype, shape in tensors:
        w.add_tensor(name, dtype, shape, random_tensor(rng, dtype, shape))
    w.finish()
    return Path(path), sum(nbytes(d, s) for _, d, s in tensors)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--quant", default="q4", choices=QUANTS)
    ap.add_argument("--layers", type=int, default=None)
    a = ap.parse_args()
    p, size = write_random_model(a.output, a.quant, a.layers)
    print(json.dumps({"path": str(p), "weight_bytes": size}))
