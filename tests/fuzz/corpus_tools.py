"""Builders for the hardening corpus and the fuzz harnesses: a minimal valid model in every input
format (.qora, GGUF, Hugging Face folder), hand-written so a test can break any single field, and
the entry points every harness drives (each may raise QoraError and nothing else).

The tiny model: 1 layer, dim 32, 2 query heads / 1 KV head of 16, hidden 32, vocab 16, tied
embeddings. Files are a few KiB, so a fuzzer runs thousands of them a second.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
TARGETS = ("qora", "gguf", "hf", "template")

DIM, N_HEADS, N_KV, HEAD_DIM, HIDDEN, VOCAB, N_LAYERS = 32, 2, 1, 16, 32, 16, 1
# Byte-level BPE alphabet letters for "hello"-ish text; GGUF wants a gpt2 vocabulary.
TOKENS = ["<|im_start|>", "<|im_end|>", "h", "e", "l", "o", "Ġ", "i", "u", "s", "r", "a", "t", "n", "\n", "C"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
HF_SPLIT = b"\n--qora-fuzz-split--\n"  # separates config.json and model.safetensors in an hf corpus entry


def tokenizer_json() -> str:
    """A small byte-level BPE tokenizer.json (no merges) with the two ChatML markers as specials."""
    vocab = {t: i for i, t in enumerate(TOKENS)}
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}
        for i, t in enumerate(TOKENS[:2])
    ]  # fmt: skip
    return json.dumps(
        {
            "version": "1.0",
            "added_tokens": added,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "vocab": vocab, "merges": [], "ignore_merges": False},
        }
    )


def qora_config(**over) -> dict:
    c = {
        "architecture": "llama",
        "n_layers": N_LAYERS,
        "dim": DIM,
        "n_heads": N_HEADS,
        "n_kv_heads": N_KV,
        "head_dim": HEAD_DIM,
        "hidden_dim": HIDDEN,
        "vocab_size": VOCAB,
        "norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_layers": [1] * N_LAYERS,
        "rope_scaling": None,
        "max_seq_len": 64,
        "tie_embeddings": True,
    }
    c.update(over)
    return c


def _weights(seed=0) -> dict:
    """qora name -> float32 array for the tiny model."""
    rng = np.random.default_rng(seed)
    from qora.format import expected_tensors

    out = {}
    for name, (shape, _) in expected_tensors(qora_config()).items():
        a = rng.standard_normal(shape).astype(np.float32) * (0.3 if len(shape) == 2 else 0.05)
        out[name] = a + (1.0 if len(shape) == 1 else 0.0)
    return out


# ---------------------------------------------------------------------------------------------
# .qora
# ---------------------------------------------------------------------------------------------


def qora_bytes(chat_template: str | None = CHATML, quant: str = "q8", **config_over) -> bytes:
    """A valid tiny .qora file (bytes); config_over changes the config (and so maybe validity)."""
    from qora import quant as Q
    from qora.format import ALIGN, align_up

    cfg = qora_config(**config_over)
    index, blobs, end = {}, [], 0
    for name, a in _weights().items():
        dtype = "f32" if a.ndim == 1 else quant
        raw = Q.quantize(a, dtype).tobytes()
        off = align_up(end, ALIGN)
        blobs.append((off, raw))
        index[name] = {"dtype": dtype, "shape": list(a.shape), "offset": off, "nbytes": len(raw)}
        end = off + len(raw)
    header = {
        "config": cfg,
        "tokenizer": tokenizer_json(),
        "chat_template": chat_template,
        "generation": {},
        "special_tokens": {"eos": [1], "im_start": 0, "im_end": 1},
        "tensors": index,
        "source": {"from": "corpus"},
    }
    return qora_from_header(header, blobs, end)


def qora_from_header(header: dict | bytes, blobs, end: int, version: int | None = None) -> bytes:
    from qora.format import ALIGN, MAGIC, PREAMBLE, VERSION, align_up

    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    data_start = align_up(PREAMBLE.size + len(raw), ALIGN)
    out = bytearray(PREAMBLE.pack(MAGIC, VERSION if version is None else version, len(raw)) + raw)
    out += b"\0" * (data_start - len(out))
    data = bytearray(align_up(end, ALIGN))
    for off, b in blobs:
        data[off : off + len(b)] = b
    return bytes(out + data)


def split_qora(raw: bytes):
    """(header dict, [(offset, bytes)], end) of a .qora file made by qora_bytes()."""
    from qora.format import ALIGN, PREAMBLE, align_up

    _, _, hlen = PREAMBLE.unpack_from(raw)
    header = json.loads(raw[16 : 16 + hlen])
    start = align_up(16 + hlen, ALIGN)
    tensors = header["tensors"].values()
    blobs = [(t["offset"], raw[start + t["offset"] : start + t["offset"] + t["nbytes"]]) for t in tensors]
    end = max(t["offset"] + t["nbytes"] for t in header["tensors"].values())
    return header, blobs, end


# ---------------------------------------------------------------------------------------------
# GGUF (written by hand so any field can be made to lie)
# ---------------------------------------------------------------------------------------------

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?", U64: "Q", I64: "q", F64: "d"}
GGML_F32, GGML_Q8_0 = 0, 8


def gguf_str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def gguf_value(vtype: int, value) -> bytes:
    if vtype == STR:
        return gguf_str(value)
    if vtype == ARR:
        itype, items = value
        body = b"".join(gguf_value(itype, v) for v in items)
        return struct.pack("<IQ", itype, len(items)) + body
    return struct.pack("<" + _FMT[vtype], value)


def gguf_kv(key: str, vtype: int, value) -> bytes:
    return gguf_str(key) + struct.pack("<I", vtype) + gguf_value(vtype, value)


def gguf_metadata(**over) -> list:
    """[(key, type, value)] of the tiny llama model; over: key -> (type, value) or None to drop."""
    kv = {
        "general.architecture": (STR, "llama"),
        "llama.block_count": (U32, N_LAYERS),
        "llama.context_length": (U32, 64),
        "llama.embedding_length": (U32, DIM),
        "llama.feed_forward_length": (U32, HIDDEN),
        "llama.attention.head_count": (U32, N_HEADS),
        "llama.attention.head_count_kv": (U32, N_KV),
        "llama.attention.layer_norm_rms_epsilon": (F32, 1e-5),
        "llama.rope.freq_base": (F32, 10000.0),
        "tokenizer.ggml.model": (STR, "gpt2"),
        "tokenizer.ggml.pre": (STR, "gpt-2"),
        "tokenizer.ggml.tokens": (ARR, (STR, TOKENS)),
        "tokenizer.ggml.token_type": (ARR, (I32, [3, 3] + [1] * (len(TOKENS) - 2))),
        "tokenizer.ggml.merges": (ARR, (STR, [])),
        "tokenizer.ggml.eos_token_id": (U32, 1),
        "tokenizer.chat_template": (STR, CHATML),
    }
    for k, v in over.items():
        k = k.replace("__", ".")
        if v is None:
            kv.pop(k, None)
        else:
            kv[k] = v
    return [(k, t, v) for k, (t, v) in kv.items()]


def gguf_tensors(seed=0) -> list:
    """[(gguf name, dims ne0-first, ggml type, raw bytes)] for the tiny model (Q8_0 matrices)."""
    from qora import quant as Q
    from qora.convert import name_map

    names = name_map(N_LAYERS)
    out = []
    for qname, a in _weights(seed).items():
        gg = names[qname][1]
        if a.ndim == 1:
            out.append((gg, [a.shape[0]], GGML_F32, a.astype("<f4").tobytes()))
        else:
            out.append((gg, [a.shape[1], a.shape[0]], GGML_Q8_0, Q.quantize(a, "q8").tobytes()))
    return out


def gguf_bytes(kvs=None, tensors=None, *, version=3, n_kv=None, n_tensors=None, alignment=32, offsets=None) -> bytes:
    """A GGUF file; every count and offset can be overridden to lie."""
    kvs = gguf_metadata() if kvs is None else kvs
    tensors = gguf_tensors() if tensors is None else tensors
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)  # fmt: skip
    body = b"".join(gguf_kv(k, t, v) if not isinstance(t, bytes) else t for k, t, v in kvs)
    infos, data, off = b"", bytearray(), 0
    for i, (name, dims, ttype, raw) in enumerate(tensors):
        off = (off + alignment - 1) // alignment * alignment
        o = off if offsets is None or offsets[i] is None else offsets[i]
        infos += gguf_str(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        infos += struct.pack("<IQ", ttype, o)
        data += b"\0" * (off - len(data)) + raw
        off += len(raw)
    out = head + body + infos
    out += b"\0" * (-len(out) % alignment)
    return out + bytes(data)


# ---------------------------------------------------------------------------------------------
# Hugging Face folder (config.json + model.safetensors + tokenizer.json), as one corpus entry
# ---------------------------------------------------------------------------------------------


def hf_config(**over) -> dict:
    c = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": DIM,
        "num_hidden_layers": N_LAYERS,
        "num_attention_heads": N_HEADS,
        "num_key_value_heads": N_KV,
        "intermediate_size": HIDDEN,
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 64,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "eos_token_id": 1,
    }
    for k, v in over.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    return c


def safetensors_header(seed=0) -> tuple[dict, bytes]:
    """(header dict, data bytes) of the tiny model's weights under Hugging Face names (F32)."""
    from qora.convert import name_map

    names = name_map(N_LAYERS)
    header, data = {}, bytearray()
    for qname, a in _weights(seed).items():
        raw = a.astype("<f4").tobytes()
        offsets = [len(data), len(data) + len(raw)]
        header[names[qname][0]] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": offsets}
        data += raw
    return header, bytes(data)


def safetensors_bytes(header: dict | bytes | None = None, data: bytes | None = None, hlen: int | None = None) -> bytes:
    h0, d0 = safetensors_header()
    header = h0 if header is None else header
    data = d0 if data is None else data
    hj = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(hj) if hlen is None else hlen) + hj + data


def hf_entry(config: dict | bytes | None = None, st: bytes | None = None) -> bytes:
    cfg = hf_config() if config is None else config
    cj = cfg if isinstance(cfg, bytes) else json.dumps(cfg).encode()
    return cj + HF_SPLIT + (safetensors_bytes() if st is None else st)


def unpack_hf(entry: bytes, folder: Path) -> Path:
    """Write an hf corpus entry as a model folder; returns the folder."""
    cfg, _, st = entry.partition(HF_SPLIT)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_bytes(cfg)
    (folder / "model.safetensors").write_bytes(st)
    (folder / "tokenizer.json").write_text(tokenizer_json())
    return folder


# ---------------------------------------------------------------------------------------------
# Entry points (what the fuzzers and the regression tests drive)
# ---------------------------------------------------------------------------------------------

MESSAGES = [
    {"role": "system", "content": "/no_think"},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "hi"},
    {"role": "user", "content": "sure?"},
]


def run_qora(path: Path, generate: bool = True) -> None:
    """Open a .qora file, build the engine, and (when it loads) run one short greedy answer."""
    import qora

    with qora.load(path, threads=1, device="cpu", max_seq_len=64) as m:
        if generate:
            m.generate("hello", max_tokens=2, think_budget=0, greedy=True)


def run_gguf(path: Path, out: Path) -> None:
    from qora.convert import convert

    convert(path, out, quant="q8", progress=False)


def run_hf(entry: bytes, tmp: Path) -> None:
    from qora.convert import convert

    folder = unpack_hf(entry, tmp / "model")
    convert(folder, tmp / "out.qora", quant="q8", progress=False)


# Tokens run_template streams one by one (a context's worth, what one answer can produce); the rest of a
# larger render is decoded in one call: a template may render 4M characters, ~2M tokens of the fuzz
# vocabulary, and streaming all of them took a minute of linear work.
STREAM_TOKENS = 1 << 16


def run_template(source: bytes) -> str:
    """Render a chat template (its text) with a fixed conversation, then encode/decode the result."""
    from qora.tokenizer import Tokenizer

    text = source.decode("utf-8", errors="replace")
    tok = Tokenizer(tokenizer_json(), text, {"eos": [1], "im_start": 0, "im_end": 1})
    prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, today="2025-01-01")
    ids = tok.encode(prompt)
    detok = tok.detokenizer()
    pieces = "".join(detok.add(i) for i in ids[:STREAM_TOKENS]) + detok.finalize()
    return pieces + (tok.decode(ids[STREAM_TOKENS:]) if len(ids) > STREAM_TOKENS else "")


def run_target(target: str, data: bytes) -> None:
    """Run one input of `target` in a scratch folder; only QoraError may come out."""
    with tempfile.TemporaryDirectory(prefix="qora-fuzz-", dir=_scratch()) as d:
        tmp = Path(d)
        if target == "qora":
            p = tmp / "in.qora"
            p.write_bytes(data)
            run_qora(p)
        elif target == "gguf":
            p = tmp / "in.gguf"
            p.write_bytes(data)
            run_gguf(p, tmp / "out.qora")
        elif target == "hf":
            run_hf(data, tmp)
        elif target == "template":
            run_template(data)
        else:
            raise ValueError(target)


def _scratch():
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() else None
