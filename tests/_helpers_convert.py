"""Builders for the converter/format tests: tiny configs and weights, a byte-level BPE tokenizer,
Hugging Face folders (f32/f16/bf16, sharded or not) and GGUF files laid out like llama.cpp's."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

TINY = dict(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, vocab_size=320)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "What is the capital of France? Paris is the capital of France.",
    "The quick brown fox jumps over the lazy dog 1234567890 times!",
    "Hello world, hello qora. Don't panic; it's only a tiny model.\n\nNew paragraph\twith tabs.",
    "Ünïcödé tèxt, 日本語のテキスト, emoji 🙂 and math: x^2 + y^2 = z^2.",
] * 20
SAMPLES = [
    "What is the capital of France?",
    "Hello world!  12345 don't\n\n  foo\tbar",
    "<|im_start|>user\nHi there<|im_end|>\n<think>hmm</think>",
    "Ünïcödé 日本語 🙂 x^2+y^2",
]
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def qora_config(arch="llama", tie=False, **over) -> dict:
    """A valid normalized qora config for a tiny model."""
    c = dict(
        TINY,
        architecture=arch,
        norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=None,
        max_seq_len=128,
        tie_embeddings=tie,
    )
    c.update(over)
    c.setdefault("rope_layers", [1] * c["n_layers"])
    if len(c["rope_layers"]) != c["n_layers"]:
        c["rope_layers"] = [1] * c["n_layers"]
    return c


def hf_weights(cfg: dict, seed=0, tie=None) -> dict:
    """Random float32 weights under Hugging Face names for the normalized config `cfg`."""
    rng = np.random.default_rng(seed)
    tie = cfg["tie_embeddings"] if tie is None else tie
    d, hd, h = cfg["dim"], cfg["head_dim"], cfg["hidden_dim"]
    q, kv = cfg["n_heads"] * hd, cfg["n_kv_heads"] * hd

    def mat(r, c):
        return (rng.standard_normal((r, c)) * 0.05).astype(np.float32)

    def norm(n):
        return (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w = {"model.embed_tokens.weight": mat(cfg["vocab_size"], d)}
    for i in range(cfg["n_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(d)
        w[p + "self_attn.q_proj.weight"] = mat(q, d)
        w[p + "self_attn.k_proj.weight"] = mat(kv, d)
        w[p + "self_attn.v_proj.weight"] = mat(kv, d)
        w[p + "self_attn.o_proj.weight"] = mat(d, q)
        w[p + "post_attention_layernorm.weight"] = norm(d)
        w[p + "mlp.gate_proj.weight"] = mat(h, d)
        w[p + "mlp.up_proj.weight"] = mat(h, d)
        w[p + "mlp.down_proj.weight"] = mat(d, h)
    w["model.norm.weight"] = norm(d)
    if not tie:
        w["lm_head.weight"] = mat(cfg["vocab_size"], d)
    return w


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------


def make_tokenizer(style="smollm", vocab_size=300) -> str:
    """A trained byte-level BPE tokenizer.json (smollm: Digits + ByteLevel regex; llama3: Split + ByteLevel)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=style == "llama3"))
    if style == "llama3":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok.to_str()


# ---------------------------------------------------------------------------------------------
# safetensors / Hugging Face folder
# ---------------------------------------------------------------------------------------------


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def write_safetensors(path: Path, tensors: dict) -> None:
    """tensors: name -> (dtype "F32"/"F16"/"BF16", numpy array of matching raw type)."""
    header, blobs, off = {}, [], 0
    for name, (dt, arr) in tensors.items():
        raw = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    header["__metadata__"] = {"format": "pt"}
    hj = json.dumps(header).encode()
    hj += b" " * (-len(hj) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for b in blobs:
            f.write(b)


def stored(a: np.ndarray, dtype: str) -> np.ndarray:
    """The float32 values a tensor has after being saved as `dtype` (f32/f16/bf16)."""
    if dtype == "f16":
        return a.astype(np.float16).astype(np.float32)
    if dtype == "bf16":
        return from_bf16_bits(to_bf16_bits(a))
    return a


def make_hf_model(
    path: Path,
    arch="llama",
    dtype="f32",
    tie=False,
    shards=1,
    n_layers=2,
    seed=0,
    hf_extra=None,
    tokenizer_json=None,
    chat_template="tokenizer_config",
    generation=True,
    use_safetensors_lib=False,
    **cfg_over,
) -> dict:
    """Write a tiny HF checkpoint folder; returns the float32 values stored under HF names."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = qora_config(arch, tie=tie, n_layers=n_layers, **cfg_over)
    w = hf_weights(cfg, seed=seed)
    hf = {
        "architectures": ["SmolLM3ForCausalLM" if arch == "smollm3" else "LlamaForCausalLM"],
        "model_type": arch,
        "hidden_size": cfg["dim"],
        "num_hidden_layers": n_layers,
        "num_attention_heads": cfg["n_heads"],
        "head_dim": cfg["head_dim"],
        "num_key_value_heads": cfg["n_kv_heads"],
        "intermediate_size": cfg["hidden_dim"],
        "vocab_size": cfg["vocab_size"],
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 128,
        "tie_word_embeddings": tie,
        "hidden_act": "silu",
        "bos_token_id": 0,
        "eos_token_id": 2,
    }
    hf.update(hf_extra or {})
    (path / "config.json").write_text(json.dumps(hf))
    (path / "tokenizer.json").write_text(tokenizer_json or make_tokenizer())
    tcfg = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    if chat_template == "tokenizer_config":
        tcfg["chat_template"] = CHAT_TEMPLATE
    elif chat_template == "jinja":
        (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (path / "tokenizer_config.json").write_text(json.dumps(tcfg))
    if generation:
        (path / "generation_config.json").write_text(
            json.dumps({"temperature": 0.6, "top_p": 0.95, "eos_token_id": [2, 0], "transformers_version": "4.53"})
        )

    out = {}
    entries = {}
    for name, a in w.items():
        if dtype == "bf16":
            entries[name] = ("BF16", to_bf16_bits(a))
        elif dtype == "f16":
            entries[name] = ("F16", a.astype(np.float16))
        else:
            entries[name] = ("F32", a)
        out[name] = stored(a, dtype)
    names = list(entries)
    if shards == 1:
        files = {"model.safetensors": names}
    else:
        files = {f"model-{k + 1:05d}-of-{shards:05d}.safetensors": names[k::shards] for k in range(shards)}
    for fname, ns in files.items():
        if use_safetensors_lib and dtype != "bf16":
            from safetensors.numpy import save_file

            save_file({n: entries[n][1] for n in ns}, str(path / fname))
        else:
            write_safetensors(path / fname, {n: entries[n] for n in ns})
    if shards > 1:
        wm = {n: f for f, ns in files.items() for n in ns}
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return out


# ---------------------------------------------------------------------------------------------
# GGUF, laid out like llama.cpp's convert_hf_to_gguf.py
# ---------------------------------------------------------------------------------------------

GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf: str) -> str:
    if hf.startswith("model.layers."):
        _, _, i, rest = hf.split(".", 3)
        return f"blk.{i}.{GGUF_NAMES[rest]}"
    return GGUF_NAMES[hf]


def llamacpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute, verbatim in NumPy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_vocab(tokenizer_json: str, vocab_size: int):
    """tokens, token types, merges as llama.cpp's converter writes them (padded with [PADn])."""
    tj = json.loads(tokenizer_json)
    rev = {i: t for t, i in tj["model"]["vocab"].items()}
    special = {a["id"] for a in tj["added_tokens"] if a["special"]}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in rev:
            tokens.append(f"[PAD{i}]")
            types.append(5)
        else:
            tokens.append(rev[i])
            types.append(3 if i in special else 1)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    return tokens, types, merges


def make_gguf(
    path: Path,
    weights: dict,
    cfg: dict,
    types: dict | None = None,
    arch="llama",
    pre="smollm",
    tokenizer_json=None,
    extra_tensors=None,
    chat_template=CHAT_TEMPLATE,
    add_bos=False,
) -> dict:
    """Write a GGUF from HF-named float32 weights: Q/K permuted as llama.cpp does, each tensor
    quantized to types[hf suffix] (default F32 for norms, Q4_0 otherwise). Returns gguf name -> raw array."""
    import gguf
    from gguf.quants import quantize

    T = gguf.GGMLQuantizationType
    types = types or {}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["n_layers"])
    w.add_context_length(cfg["max_seq_len"])
    w.add_embedding_length(cfg["dim"])
    w.add_feed_forward_length(cfg["hidden_dim"])
    w.add_head_count(cfg["n_heads"])
    w.add_head_count_kv(cfg["n_kv_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["norm_eps"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_vocab_size(cfg["vocab_size"])
    tj = tokenizer_json or make_tokenizer()
    tokens, ttypes, merges = gguf_vocab(tj, cfg["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(ttypes)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(add_bos)
    if chat_template:
        w.add_chat_template(chat_template)
    raw = {}
    for hf, a in weights.items():
        name = gguf_name(hf)
        if hf.endswith("q_proj.weight"):
            a = llamacpp_permute(a, cfg["n_heads"], cfg["n_heads"])
        elif hf.endswith("k_proj.weight"):
            a = llamacpp_permute(a, cfg["n_heads"], cfg["n_kv_heads"])
        suffix = hf.split(".")[-2] if hf.startswith("model.layers.") else hf
        t = types.get(suffix, T.F32 if a.ndim == 1 else T.Q4_0)
        data = quantize(a, t)
        raw[name] = data
        w.add_tensor(name, data, raw_dtype=t)
    for name, a in (extra_tensors or {}).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return raw
