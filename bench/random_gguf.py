"""Write the random SmolLM3-3B-shaped weights of random_model.py (or any .qora) as a GGUF that llama.cpp loads.

The peer must run the very same model: same seed -> same bytes. q4 is GGUF Q4_0 bit for bit (q8 = Q8_0,
f16 = F16, norms F32), so blocks are copied unchanged; only the rows of Q and K are reordered the way
llama.cpp's converter does (LlamaModel.permute: its RoPE rotates interleaved pairs, HF's rotates halves).
Embeddings stay tied (no output.weight). Tensors are generated and written one at a time, so memory
stays at about one tensor (the 148 MB embedding), whatever the model size.

The vocabulary is the tiny byte-level BPE of the test fixtures (all 256 byte tokens, 139 merges and the
chat specials: the same tokenizer the random .qora carries) padded with unused [PADn] tokens to the
model's 128256 rows, as llama.cpp's converter pads short vocabularies. Usage:
    python bench/random_gguf.py -o /tmp/smollm3-3b-random-q4_0.gguf [--quant q4] [--layers 36] [--seed 0]
    python bench/random_gguf.py -o model.gguf --from model.qora [--tokenizer-from original.gguf]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # random_model.py next to this file, also when imported from elsewhere

import random_model  # noqa: E402

from qora.dtypes import WEIGHT_TYPES  # noqa: E402

# qora dtype -> (GGML tensor type name, general.file_type of a file made mostly of it); q4_k_m: a mix
GGUF_TYPES = {"q4": ("Q4_0", 2), "q8": ("Q8_0", 7), "f16": ("F16", 1), "f32": ("F32", 0), "q4_k_m": ("Q4_K", 15)}
GGUF_TYPES.update({n: (t.gguf, 0) for n, t in WEIGHT_TYPES.items() if n not in GGUF_TYPES})
# gguf.TokenType values
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
SMOLLM3_NOPE_STEP = 4  # llama.cpp hard-codes n_no_rope_layer_step = 4 for smollm3 (no GGUF key exists)


def gguf_name(qname: str) -> str:
    from qora.convert import name_map

    n_layers = int(qname.split(".")[1]) + 1 if qname.startswith("layers.") else 0
    return name_map(n_layers)[qname][1]


def permute_rows(a: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute on whole rows: within each head, rows [0..h/2) and [h/2..h)
    (the halves HF rotates together) become interleaved pairs 0, h/2, 1, h/2+1, ... Quantized rows move
    as a whole since a block never straddles two rows."""
    rows = a.shape[0]
    return a.reshape(n_head, 2, rows // n_head // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def _check_supported(cfg: dict) -> None:
    arch = cfg["architecture"]
    n = cfg["n_layers"]
    want = [int((i + 1) % SMOLLM3_NOPE_STEP != 0) for i in range(n)] if arch == "smollm3" else [1] * n
    if list(cfg["rope_layers"]) != want:
        raise ValueError(f"{arch}: llama.cpp cannot express the RoPE layer pattern {cfg['rope_layers']}")
    if cfg.get("rope_scaling"):
        raise ValueError("rope_scaling is not written by this script")


def add_hparams(w, cfg: dict, file_type: int) -> None:
    """The {arch}.* keys llama.cpp's llama / smollm3 loaders read."""
    arch = cfg["architecture"]
    w.add_uint32(f"{arch}.block_count", cfg["n_layers"])
    w.add_uint32(f"{arch}.context_length", cfg["max_seq_len"])
    w.add_uint32(f"{arch}.embedding_length", cfg["dim"])
    w.add_uint32(f"{arch}.feed_forward_length", cfg["hidden_dim"])
    w.add_uint32(f"{arch}.attention.head_count", cfg["n_heads"])
    w.add_uint32(f"{arch}.attention.head_count_kv", cfg["n_kv_heads"])
    w.add_uint32(f"{arch}.attention.key_length", cfg["head_dim"])
    w.add_uint32(f"{arch}.attention.value_length", cfg["head_dim"])
    w.add_uint32(f"{arch}.rope.dimension_count", cfg["head_dim"])
    w.add_float32(f"{arch}.rope.freq_base", float(cfg["rope_theta"]))
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", float(cfg["norm_eps"]))
    w.add_uint32(f"{arch}.vocab_size", cfg["vocab_size"])
    w.add_uint32("general.file_type", file_type)
    w.add_uint32("general.quantization_version", 2)


def add_tokenizer_from_json(w, tokenizer_json: str, vocab_size: int, special: dict, pre: str = "llama-bpe") -> None:
    """GGUF 'gpt2' (byte-level BPE) tokenizer metadata from a Hugging Face tokenizer.json, padded with
    unused [PADn] tokens to vocab_size rows (llama.cpp wants one token per embedding row)."""
    from gguf import GGUFValueType

    tj = json.loads(tokenizer_json)
    if tj["model"]["type"] != "BPE":
        raise ValueError("only byte-level BPE tokenizers can be written as GGUF 'gpt2' vocabularies")
    tokens: list[str | None] = [None] * vocab_size
    types = [UNUSED] * vocab_size
    for t, i in tj["model"]["vocab"].items():
        tokens[i], types[i] = t, NORMAL
    for a in tj.get("added_tokens", []):
        tokens[a["id"]], types[a["id"]] = a["content"], CONTROL if a["special"] else USER_DEFINED
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", pre)
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_key_value("tokenizer.ggml.token_type", types, GGUFValueType.ARRAY, GGUFValueType.INT32)
    w.add_array("tokenizer.ggml.merges", merges)
    eos = (special or {}).get("eos") or []
    if eos:
        w.add_uint32("tokenizer.ggml.eos_token_id", int(eos[0]))
    if (special or {}).get("bos") is not None:
        w.add_uint32("tokenizer.ggml.bos_token_id", int(special["bos"]))
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.add_bool("tokenizer.ggml.add_eos_token", False)


def add_tokenizer_from_gguf(w, src: str | os.PathLike) -> None:
    """Copy every tokenizer.* key of another GGUF (e.g. the one a .qora was converted from)."""
    from gguf import GGUFReader, GGUFValueType

    for key, f in GGUFReader(src, "r").fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = GGUFValueType(f.types[0])
        sub = GGUFValueType(f.types[-1]) if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), vtype, sub)


def write_gguf(path, cfg: dict, plan, arrays, add_tokenizer, quant: str, permute: bool = True) -> Path:
    """Stream tensors into a GGUF. plan: [(qora name, dtype, shape)] in write order; arrays: an iterator
    giving each one's qora storage array in the same order. Written to PATH.tmp, renamed at the end.
    permute=False leaves Q/K in HF row order: a wrong file, only for checking that the check notices."""
    from gguf import GGMLQuantizationType, GGUFWriter

    from qora.quant import nbytes as qnbytes
    from qora.quant import storage_shape

    _check_supported(cfg)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    n_head = {"wq": cfg["n_heads"], "wk": cfg["n_kv_heads"]}
    w = GGUFWriter(tmp, cfg["architecture"])
    try:
        w.add_name(f"random {cfg['architecture']}" if cfg.get("_random") else path.stem)
        add_hparams(w, cfg, GGUF_TYPES[quant][1])
        add_tokenizer(w)
        for name, dtype, shape in plan:
            raw = GGMLQuantizationType[GGUF_TYPES[dtype][0]]
            store = storage_shape(dtype, shape)
            nbytes = qnbytes(dtype, shape)
            if WEIGHT_TYPES[dtype].quantized:  # uint8 rows of blocks; gguf turns the byte shape into elements
                w.add_tensor_info(gguf_name(name), store, np.dtype(np.uint8), nbytes, raw_dtype=raw)
            else:
                w.add_tensor_info(
                    gguf_name(name), shape, np.dtype(np.float16 if dtype == "f16" else np.float32), nbytes
                )
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for (name, dtype, shape), a in zip(plan, arrays, strict=True):
            a = np.ascontiguousarray(a).reshape(storage_shape(dtype, shape))
            kind = name.rsplit(".", 1)[-1]
            if kind in n_head and permute:
                a = permute_rows(a, n_head[kind])
            w.write_tensor_data(a)
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_random_gguf(path, quant="q4", n_layers=None, seed=0, permute=True) -> tuple[Path, int]:
    """The GGUF twin of random_model.write_random_model(path, quant, n_layers, seed): same tensors from
    the same generator in the same order. Returns (path, weight bytes)."""
    from qora.quant import nbytes

    cfg = dict(random_model.SMOLLM3_CONFIG)  # as write_random_model builds it
    if n_layers:
        cfg["n_layers"] = n_layers
        cfg["rope_layers"] = cfg["rope_layers"][:n_layers]
    cfg["_random"] = True
    tensors = random_model.tensor_list(cfg, quant)
    rng = np.random.default_rng(seed)
    arrays = (random_model.random_tensor(rng, d, s) for _, d, s in tensors)
    tok = (HERE.parent / "tests" / "fixtures" / "tiny-smollm3" / "tokenizer.json").read_text()
    ids = {a["content"]: a["id"] for a in json.loads(tok).get("added_tokens", [])}
    special = {"eos": [ids["<|im_end|>"]] if "<|im_end|>" in ids else []}

    def add_tok(w):
        add_tokenizer_from_json(w, tok, cfg["vocab_size"], special)

    write_gguf(path, cfg, tensors, arrays, add_tok, quant, permute)
    return Path(path), sum(nbytes(d, s) for _, d, s in tensors)


def qora_to_gguf(src, path, tokenizer_gguf=None, pre="llama-bpe") -> Path:
    """A .qora (q4/q8/f16 matrices, f32 norms) as GGUF; the tokenizer is copied from tokenizer_gguf
    when given (e.g. the GGUF the .qora was converted from), else rebuilt from the .qora's."""
    from qora.format import read_qora

    with read_qora(src) as q:
        cfg = dict(q.config)
        plan = [(n, i["dtype"], tuple(i["shape"])) for n, i in q.tensor_info.items()]
        quants = {d for n, d, s in plan if len(s) == 2}
        quant = quants.pop() if len(quants) == 1 else "q4"
        if tokenizer_gguf is not None:

            def add_tok(w):
                add_tokenizer_from_gguf(w, tokenizer_gguf)
        else:

            def add_tok(w):
                add_tokenizer_from_json(w, q.tokenizer_json, cfg["vocab_size"], q.special_tokens, pre)

        return write_gguf(path, cfg, plan, (q.tensor(n) for n, _, _ in plan), add_tok, quant)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--quant", default="q4", choices=list(random_model.QUANTS))
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--from", dest="src", default=None, help="write this .qora instead of random weights")
    ap.add_argument("--tokenizer-from", default=None, help="copy tokenizer.* metadata from this GGUF")
    a = ap.parse_args()
    if a.src:
        print(json.dumps({"path": str(qora_to_gguf(a.src, a.output, a.tokenizer_from))}))
    else:
        p, size = write_random_gguf(a.output, a.quant, a.layers, a.seed)
        print(json.dumps({"path": str(p), "weight_bytes": size}))
