"""Convert a Hugging Face model folder or a GGUF file to one self-contained .qora file.

    convert("SmolLM3-3B/", "smollm3-3b-q4.qora", quant="q4")
    convert("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2.qora", quant="q4")

Design:
- One explicit weight map (WEIGHT_MAP): qora name <- Hugging Face name <- GGUF name.
- A source object per input kind (_HFSource, GGUFSource) gives the normalized config, the
  tokenizer and chat template, and each tensor on demand; convert() plans every tensor's dtype
  and shape up front, so the writer knows the whole index before the first byte of data and can
  stream: peak memory is about one source tensor (as float32) plus its encoded copy.
- Matrices are stored as `quant`, the embedding and the untied LM head as `embed_quant`, norms
  always as f32. A q4/q8 request for a row length that is not a multiple of 32 falls back to f16.
- GGUF: Q4_0 -> q4, Q8_0 -> q8, F16 -> f16 and F32 -> f32 are copied byte for byte when they
  match the requested type (q4 is Q4_0 bit for bit); every other case is dequantized with the
  gguf package and quantized again. llama.cpp's converter permutes the rows of Q and K
  (LlamaModel.permute, for llama and smollm3 alike) to suit its interleaved-pair RoPE; we undo that
  on whole rows, which also works on quantized rows since blocks never straddle rows.
- The output is written to a fresh temporary file beside OUT (qora.safeio) and renamed at the end:
  a failed conversion leaves no file, and OUT may not be a folder, a device or one of the inputs.
- Every file of a model folder must resolve inside it (a Hugging Face cache snapshot: inside its
  models--ORG--NAME folder, where the blobs are); only regular files are opened.
- A NaN or infinity in any weight (norms and block scales included) is refused, never converted.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import struct
import sys
from pathlib import Path

import numpy as np

from qora import limits
from qora import quant as Q
from qora.dtypes import WEIGHT_TYPES
from qora.engine import guard_mapping
from qora.errors import ConfigError, FormatError, QoraError
from qora.format import QoraWriter, check_finite, expected_tensors, parse_json, reject_nonfinite, validate_config
from qora.safeio import check_inside, check_output, file_ids, open_regular, read_regular

log = logging.getLogger(__name__)

QUANTS = Q.DTYPES

# qora name                 Hugging Face name                                    GGUF name
WEIGHT_MAP = (
    ("tok_embeddings",        "model.embed_tokens.weight",                         "token_embd.weight"),
    ("layers.{i}.attn_norm",  "model.layers.{i}.input_layernorm.weight",           "blk.{i}.attn_norm.weight"),
    ("layers.{i}.wq",         "model.layers.{i}.self_attn.q_proj.weight",          "blk.{i}.attn_q.weight"),
    ("layers.{i}.wk",         "model.layers.{i}.self_attn.k_proj.weight",          "blk.{i}.attn_k.weight"),
    ("layers.{i}.wv",         "model.layers.{i}.self_attn.v_proj.weight",          "blk.{i}.attn_v.weight"),
    ("layers.{i}.wo",         "model.layers.{i}.self_attn.o_proj.weight",          "blk.{i}.attn_output.weight"),
    ("layers.{i}.ffn_norm",   "model.layers.{i}.post_attention_layernorm.weight",  "blk.{i}.ffn_norm.weight"),
    ("layers.{i}.w_gate",     "model.layers.{i}.mlp.gate_proj.weight",             "blk.{i}.ffn_gate.weight"),
    ("layers.{i}.w_up",       "model.layers.{i}.mlp.up_proj.weight",               "blk.{i}.ffn_up.weight"),
    ("layers.{i}.w_down",     "model.layers.{i}.mlp.down_proj.weight",             "blk.{i}.ffn_down.weight"),
    ("norm",                  "model.norm.weight",                                 "output_norm.weight"),
    ("output",                "lm_head.weight",                                    "output.weight"),
)  # fmt: skip

EMBED_TENSORS = ("tok_embeddings", "output")
HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "SmolLM3ForCausalLM": "smollm3"}
SMOLLM3_NOPE_INTERVAL = 4  # HF default; llama.cpp hard-codes the same step (no GGUF key exists)
SPECIAL_STRINGS = {"im_start": "<|im_start|>", "im_end": "<|im_end|>", "think": "<think>", "end_think": "</think>"}
_CHUNK_ELEMS = 1 << 22  # rows are converted in chunks of about this many elements


def name_map(n_layers: int) -> dict:
    """qora name -> (Hugging Face name, GGUF name) for a model with n_layers layers."""
    out = {}
    for qname, hf, gg in WEIGHT_MAP:
        if "{i}" in qname:
            for i in range(n_layers):
                out[qname.format(i=i)] = (hf.format(i=i), gg.format(i=i))
        else:
            out[qname] = (hf, gg)
    return out


def _short_float(v) -> float:
    """A float32 metadata value as the short decimal it was written from (9.99e-06 -> 1e-05)."""
    return float(str(np.float32(v)))


def _warn(msg: str) -> None:
    log.warning("%s", msg)  # through qora.log: the CLI shows it, an application routes it


def _encode_rows(read_rows, rows: int, cols: int, dtype: str) -> np.ndarray:
    """Encode a matrix to `dtype`, reading float32 rows chunk by chunk through read_rows(r0, r1)."""
    out = np.empty(Q.storage_shape(dtype, (rows, cols)), dtype=Q.FLOAT_DTYPES.get(dtype, np.uint8))
    step = max(1, _CHUNK_ELEMS // cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        chunk = read_rows(r0, r1)
        _check_finite_rows(chunk, r0)
        out[r0:r1] = Q.quantize(chunk, dtype)
    return out


_SOURCE = {"what": "source file", "advice": "convert again from a complete copy"}


class _NonFinite(Exception):
    """A NaN/Inf in a source tensor; convert() names the tensor and the file."""

    def __init__(self, index):
        self.index = index


def _check_finite_rows(a: np.ndarray, r0: int = 0) -> None:
    bad = ~np.isfinite(a)
    if bad.any():
        r = int(np.argmax(bad.any(axis=-1))) if a.ndim == 2 else int(np.argmax(bad))
        raise _NonFinite(f"row {r0 + r}" if a.ndim == 2 else f"element {r}")


def _permute_rows(rows: int, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute applied to row indices: gguf_row[p] = hf_row[idx[p]]."""
    return np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


def unpermute_rows(rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes the permutation: hf_rows = gguf_rows[result]."""
    return np.argsort(_permute_rows(rows, n_head))


def _chat_special_tokens(tok, special: dict, vocab_size: int) -> dict:
    """Fill im_start/im_end/think/end_think from the vocabulary; drop ids the model cannot emit."""
    for key, s in SPECIAL_STRINGS.items():
        special.setdefault(key, tok.token_to_id(s))

    def ok(i):
        return _is_int(i) and 0 <= i < vocab_size

    out = {k: (int(v) if ok(v) else None) for k, v in special.items() if k != "eos"}
    out["eos"] = [int(i) for i in special.get("eos", []) if ok(i)]
    return out


def _normalize_rope_scaling(rs):
    """HF rope_scaling dict with a "rope_type" key (older configs say "type"), or None."""
    if not rs:
        return None
    rs = dict(rs)
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default", "none"):
        return None
    rs["rope_type"] = kind
    return rs


# --------------------------------------------------------------------------------------------
# Hugging Face folder
# --------------------------------------------------------------------------------------------

_ST_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


class _SafetensorsFile:
    """One .safetensors file, memory-mapped; arrays come back in their stored dtype, zero copy
    (bf16 as uint16: numpy has no bfloat16, _to_f32 widens it).

    The header is parsed by hand and trusted in nothing: every entry must have a string dtype, a
    shape of non-negative integers and two integer offsets inside the data area, and for the
    dtypes qora reads, end - start must be exactly elements x item size (Python integers, so no
    product can wrap)."""

    def __init__(self, path: Path):
        self.path = path
        where = str(path)
        try:
            with open_regular(path, where) as f:
                size = f.seek(0, 2)
                f.seek(0)
                head = f.read(8)
                if len(head) < 8:
                    raise FormatError(f"{where}: not a safetensors file (too short)")
                (hlen,) = struct.unpack("<Q", head)
                if hlen > min(size - 8, limits.MAX_SAFETENSORS_HEADER_BYTES):
                    raise FormatError(f"{where}: not a safetensors file (bad header length {hlen})")
                header = parse_json(f.read(hlen), where, "safetensors header")
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + hlen else None
                # a read past a truncation under the map: an error, not SIGBUS (qora/engine/cpu.py FileGuard)
                self._guard = self._mm and guard_mapping(self._mm, where, os.fstat(f.fileno()), size, **_SOURCE)
        except OSError as e:
            raise FormatError(f"{where}: cannot read ({e.strerror or e})") from None
        if not isinstance(header, dict):
            raise FormatError(f"{where}: safetensors header is not a JSON object")
        self.base = 8 + hlen
        data_size = size - self.base
        self.tensors = {}
        spans = []
        for name, t in header.items():
            if name == "__metadata__":
                continue
            if not isinstance(t, dict) or not isinstance(t.get("dtype"), str):
                raise FormatError(f"{where}: bad safetensors entry for {name} (needs dtype, shape, data_offsets)")
            dtype, shape, offsets = t["dtype"], t.get("shape"), t.get("data_offsets")
            if (
                not isinstance(shape, list)
                or len(shape) > 8
                or any(not _is_int(d) or not 0 <= d <= limits.MAX_TENSOR_DIM for d in shape)
            ):
                raise FormatError(f"{where}: tensor {name} has a bad shape {shape!r}")
            if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
                raise FormatError(f"{where}: tensor {name} has bad data_offsets {offsets!r}")
            start, end = offsets
            if start > end:
                raise FormatError(f"{where}: tensor {name} data_offsets [{start}, {end}] end before they start")
            if not 0 <= start <= end <= data_size:
                raise FormatError(
                    f"{where}: tensor {name} data_offsets [{start}, {end}] lie outside the data ({data_size} bytes)"
                )
            item = _ST_DTYPES[dtype].itemsize if dtype in _ST_DTYPES else None
            if item is not None and end - start != math.prod(shape) * item:
                raise FormatError(
                    f"{where}: tensor {name} is {dtype} {shape} = {math.prod(shape) * item} bytes, "
                    f"but its data_offsets span {end - start}"
                )
            self.tensors[name] = (dtype, tuple(shape), start)
            spans.append((start, end, name))
        spans.sort()  # two tensors sharing bytes would alias: a lying or crafted header
        last = (0, 0, None)  # the span reaching furthest so far
        for s1, e1, b in spans:
            if s1 < e1 and s1 < last[1]:
                raise FormatError(f"{where}: tensors {last[2]} [{last[0]}, {last[1]}] and {b} [{s1}, {e1}] overlap")
            if e1 > last[1]:
                last = (s1, e1, b)

    def array(self, name: str) -> tuple[str, np.ndarray]:
        dtype, shape, start = self.tensors[name]
        if dtype not in _ST_DTYPES:
            raise FormatError(f"{self.path}: tensor {name} is {dtype}; qora reads F32, F16 and BF16")
        a = np.frombuffer(self._mm, dtype=_ST_DTYPES[dtype], count=math.prod(shape), offset=self.base + start)
        return dtype, a.reshape(shape)

    def close(self):
        self._guard = None  # its buffer export would keep the map
        try:
            if self._mm is not None:
                self._mm.close()
        except BufferError:
            pass  # arrays still reference the map; it is released with them


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _to_f32(a: np.ndarray, st_dtype: str) -> np.ndarray:
    if st_dtype == "BF16":  # bfloat16 is the top half of a float32
        return (a.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return a.astype(np.float32)


def _read_json(path: Path, required: bool, where, kind=dict, root=None):
    """A JSON file of the model folder, which must hold a `kind` (an object by default); None if it
    is absent and not required. Size, encoding, syntax, nesting and finiteness (no NaN, Infinity,
    1e999) are checked (FormatError)."""
    text = _read_text(path, required, where, root=root)
    if text is None:
        return None
    value = parse_json(text, path, "file")
    if kind is not None and not isinstance(value, kind):
        raise FormatError(f"{path}: expected a JSON {'object' if kind is dict else kind.__name__}")
    reject_nonfinite(value, path, "value")
    return value


def _read_text(path: Path, required: bool, where, limit: int = limits.MAX_JSON_FILE_BYTES, root=None):
    """A UTF-8 text file of the model folder, at most `limit` bytes; None if absent and not required.
    It must be a regular file (no FIFO or device) resolving inside `root` (no symlink out)."""
    if not os.path.lexists(path):
        if required:
            raise FormatError(f"{where}: {path.name} not found")
        return None
    if root is not None:
        check_inside(path, root)
    raw = read_regular(path, limit)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _check_limit(key: str, v: int, where) -> int:
    """A config integer within qora.limits, checked before anything is sized by it."""
    limit = limits.CONFIG_INT_LIMITS[key]
    if not 1 <= v <= limit:
        raise ConfigError(f"{where}: config {key} must be an integer in 1..{limit}, got {v!r}")
    return v


def _cfg_int(hf: dict, key: str, where, default=None, low: int = 1) -> int:
    """An integer field of config.json (no bools, no floats, no strings), at least `low`."""
    v = hf.get(key)
    if v is None:
        if default is None:
            raise ConfigError(f"{where}: config.json lacks {key}")
        return default
    if not _is_int(v) or v < low:
        raise ConfigError(f"{where}: config.json {key} must be an integer >= {low}, got {v!r}")
    return v


def _cfg_float(hf: dict, key: str, where, default: float) -> float:
    v = hf.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{where}: config.json {key} must be a finite number, got {v!r}")
    return float(v)


def normalize_hf_config(hf: dict, where) -> dict:
    """config.json of a Llama / SmolLM3 checkpoint -> qora's normalized config (what format.validate_config checks)."""
    arch = _hf_architecture(hf, where)
    dim = _cfg_int(hf, "hidden_size", where)
    n_layers = _check_limit("n_layers", _cfg_int(hf, "num_hidden_layers", where), where)
    n_heads = _cfg_int(hf, "num_attention_heads", where)
    n_kv_heads = _cfg_int(hf, "num_key_value_heads", where, default=n_heads)
    if hf.get("head_dim") is None and dim % n_heads:
        raise ConfigError(
            f"{where}: config.json hidden_size {dim} is not a multiple of num_attention_heads {n_heads} "
            f"(and no head_dim is given)"
        )
    head_dim = _cfg_int(hf, "head_dim", where, default=dim // n_heads)
    hidden_dim = _cfg_int(hf, "intermediate_size", where)
    vocab_size = _cfg_int(hf, "vocab_size", where)
    norm_eps = _cfg_float(hf, "rms_norm_eps", where, 1e-6)
    rope_theta, rope_scaling = _hf_rope(hf, where)
    max_seq_len = _cfg_int(hf, "max_position_embeddings", where, default=2048)
    rope_layers = _hf_rope_layers(hf, where, arch, n_layers)
    tie = hf.get("tie_word_embeddings")
    if tie is None:
        tie = arch == "smollm3"  # the defaults of LlamaConfig (False) and SmolLM3Config (True)
    elif not isinstance(tie, bool):
        raise ConfigError(f"{where}: config.json tie_word_embeddings must be true or false, got {tie!r}")
    config = {
        "architecture": arch,
        "n_layers": n_layers,
        "dim": dim,
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "head_dim": head_dim,
        "hidden_dim": hidden_dim,
        "vocab_size": vocab_size,
        "norm_eps": norm_eps,
        "rope_theta": rope_theta,
        "rope_layers": rope_layers,
        "rope_scaling": rope_scaling,
        "max_seq_len": max_seq_len,
        "tie_embeddings": bool(tie),
    }
    validate_config(config, where)
    return config


def _hf_architecture(hf: dict, where) -> str:
    """The architecture (llama or smollm3), after refusing what qora does not run: other
    activations, biases, partial rotary embeddings, sliding windows."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConfigError(f"{where}: config.json architectures must be a list of names, got {archs!r}")
    arch = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
    if arch is None and model_type in HF_ARCHITECTURES.values():
        arch = model_type
    if arch is None:
        what = archs[0] if archs else model_type
        raise ConfigError(f"{where}: unsupported architecture {what} (qora supports llama, smollm3)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (qora runs SwiGLU/silu)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConfigError(f"{where}: attention/MLP biases are not supported")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{where}: partial rotary embeddings are not supported")
    layer_types = hf.get("layer_types") or []
    if not isinstance(layer_types, list):
        raise ConfigError(f"{where}: config.json layer_types must be a list")
    if "sliding_attention" in layer_types or (hf.get("use_sliding_window") and hf.get("sliding_window")):
        raise ConfigError(f"{where}: sliding-window attention is not supported")
    return arch


def _hf_rope(hf: dict, where) -> tuple[float, dict | None]:
    """(rope_theta, normalized rope_scaling) from config.json's top level or, since transformers 5,
    its rope_parameters."""
    rope_params = hf.get("rope_parameters") or {}
    if not isinstance(rope_params, dict):
        raise ConfigError(f"{where}: config.json rope_parameters must be an object")
    # rope_theta as given (0 or negative is an error from validate_config, not the default)
    rope_theta = (
        _cfg_float(hf, "rope_theta", where, 0.0)
        if hf.get("rope_theta") is not None
        else _cfg_float(rope_params, "rope_theta", where, 10000.0)
    )
    rs = hf.get("rope_scaling") or rope_params
    if not isinstance(rs, dict):
        raise ConfigError(f"{where}: config.json rope_scaling must be null or an object, got {rs!r}")
    rope_scaling = _normalize_rope_scaling(rs)
    if rope_scaling is not None:
        rope_scaling.pop("rope_theta", None)
    return rope_theta, rope_scaling


def _hf_rope_layers(hf: dict, where, arch: str, n_layers: int) -> list[int]:
    """1 for each layer that applies RoPE: all of them, but SmolLM3's no-RoPE layers."""
    if arch != "smollm3":
        return [1] * n_layers
    nrl = hf.get("no_rope_layers")
    if nrl is None:
        interval = _cfg_int(hf, "no_rope_layer_interval", where, default=SMOLLM3_NOPE_INTERVAL)
        return [int((i + 1) % interval != 0) for i in range(n_layers)]
    if not isinstance(nrl, list) or not all(_is_int(v) or isinstance(v, bool) for v in nrl):
        raise ConfigError(f"{where}: config.json no_rope_layers must be a list of 0/1 flags")
    if len(nrl) < n_layers:
        raise ConfigError(f"{where}: no_rope_layers has {len(nrl)} entries for {n_layers} layers")
    return [1 if int(v) else 0 for v in nrl[:n_layers]]


def _hf_token_id(tok, value):
    """tokenizer_config.json's bos/eos/pad entry (a string or {"content": ...}) -> id or None."""
    if isinstance(value, dict):
        value = value.get("content")
    return tok.token_to_id(value) if isinstance(value, str) else None


def _as_list(v) -> list:
    return [] if v is None else list(v) if isinstance(v, (list, tuple)) else [v]


_GENERATION_SKIP = {
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "decoder_start_token_id",
    "transformers_version",
    "_from_model_config",
}


def model_root(folder: Path) -> Path:
    """The folder a model folder's files must resolve into: the folder itself, or for a Hugging
    Face cache snapshot (models--ORG--NAME/snapshots/COMMIT, whose files link to ../../blobs/) the
    models--ORG--NAME folder."""
    real = Path(os.path.realpath(folder))
    if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir():
        return real.parent.parent
    return real


def locate_source(src) -> tuple[str, Path]:
    """("hf", folder) or ("gguf", file): what `src` (a folder, its config.json or a GGUF file) names.
    open_source and source_files both start here, so the files checked against the output are the
    ones the source reads."""
    src = Path(src)
    if src.is_dir():
        return "hf", src
    if not os.path.lexists(src):
        raise FormatError(f"{src}: no such file or folder")
    with open_regular(src) as f:  # a FIFO or a device is refused before it can block
        try:
            magic = f.read(4)
        except OSError as e:
            raise FormatError(f"{src}: cannot read ({e.strerror or e})") from None
    if magic == b"GGUF":
        return "gguf", src
    if src.name == "config.json":
        return "hf", src.parent
    raise FormatError(f"{src}: not a Hugging Face model folder or a GGUF file")


def _located_files(kind: str, path: Path) -> list[Path]:
    if kind == "gguf":
        return [path]
    try:  # every file of the folder: config, tokenizer, template, index and any shard it may name
        return list(path.iterdir())
    except OSError as e:
        raise FormatError(f"{path}: cannot list the folder ({e.strerror or e})") from None


def source_files(src) -> list[Path]:
    """The files a conversion of `src` may read: the GGUF, or every file of the model folder
    (also when `src` names the folder's config.json)."""
    return _located_files(*locate_source(src))


class _HFSource:
    kind = "hf"

    def __init__(self, path: Path):
        from qora.tokenizer import check_template_source, load_hf_tokenizer

        self.path = path
        where = str(path)
        self.root = root = model_root(path)
        hf = _read_json(path / "config.json", True, where, root=root)
        self.config = cfg = normalize_hf_config(hf, where)

        # tokenizer, chat template, generation defaults
        tok_path = path / "tokenizer.json"
        if not os.path.lexists(tok_path):
            raise FormatError(f"{where}: tokenizer.json not found (qora needs the fast-tokenizer file)")
        self.tokenizer_json = _read_text(tok_path, True, where, root=root)
        tok = load_hf_tokenizer(self.tokenizer_json, tok_path)
        tcfg = _read_json(path / "tokenizer_config.json", False, where, root=root) or {}
        gen = _read_json(path / "generation_config.json", False, where, root=root) or {}
        self.chat_template = self._chat_template(path, tcfg, root)
        check_template_source(self.chat_template, where)
        self.generation = {
            k: v for k, v in gen.items() if k not in _GENERATION_SKIP and isinstance(v, (int, float, bool, str))
        }
        bos = _hf_token_id(tok, tcfg.get("bos_token"))
        pad = _hf_token_id(tok, tcfg.get("pad_token"))
        eos = _as_list(gen.get("eos_token_id")) + _as_list(hf.get("eos_token_id"))
        eos += _as_list(_hf_token_id(tok, tcfg.get("eos_token")))
        if not all(_is_int(i) for i in eos):
            raise ConfigError(f"{where}: eos_token_id must be a token id or a list of them, got {eos!r}")
        special = {
            "bos": bos if bos is not None else hf.get("bos_token_id"),
            "eos": list(dict.fromkeys(eos)),
            "pad": pad if pad is not None else hf.get("pad_token_id", gen.get("pad_token_id")),
        }
        self.special_tokens = _chat_special_tokens(tok, special, cfg["vocab_size"])

        # weights: one file, or shards listed by the index
        index = _read_json(path / "model.safetensors.index.json", False, where, root=root)
        if index is not None:
            wm = index.get("weight_map") or {}
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise FormatError(f"{path / 'model.safetensors.index.json'}: weight_map must map names to file names")
            files = sorted(set(wm.values()))
            for name in files:  # shards live in the folder itself: no "../x", no absolute paths
                if name in ("", ".", "..") or Path(name).name != name or "\\" in name:
                    raise FormatError(
                        f"{path / 'model.safetensors.index.json'}: shard name {name!r} is not a file name"
                    )
        elif os.path.lexists(path / "model.safetensors"):
            files = ["model.safetensors"]
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise FormatError(f"{where}: no *.safetensors weights found (pytorch .bin files are not supported)")
        self._files = []
        self._where = {}  # HF tensor name -> _SafetensorsFile
        try:
            for name in files:
                check_inside(path / name, root)
                f = _SafetensorsFile(path / name)
                self._files.append(f)
                for t in f.tensors:
                    self._where[t] = f
            self._names = name_map(cfg["n_layers"])
            self._check_tensor_names()
            self._check_shapes()
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _chat_template(path: Path, tcfg: dict, root):
        jinja = path / "chat_template.jinja"  # transformers >= 4.43 saves the template here
        if os.path.lexists(jinja):
            return _read_text(jinja, True, path, root=root)
        ct = tcfg.get("chat_template")
        if isinstance(ct, list):  # [{"name": "default", "template": ...}, ...]
            named = {d.get("name"): d.get("template") for d in ct if isinstance(d, dict)}
            ct = named.get("default") or next(iter(named.values()), None)
        return ct if isinstance(ct, str) else None

    def _check_tensor_names(self):
        where = str(self.path)
        wanted = {hf for q, (hf, _) in self._names.items() if q != "output" or not self.config["tie_embeddings"]}
        for hf in sorted(wanted):
            if hf not in self._where:
                extra = " (and tie_word_embeddings is false)" if hf == "lm_head.weight" else ""
                raise FormatError(f"{where}: weight {hf} not found in the safetensors files{extra}")
        known = wanted | {"lm_head.weight"}
        for name in self._where:
            if name in known or name.endswith("rotary_emb.inv_freq"):
                continue
            raise FormatError(f"{where}: unexpected weight {name} (not a plain Llama/SmolLM3 checkpoint?)")

    def _check_shapes(self):
        """Every weight the config implies has exactly the implied shape and a dtype qora reads,
        checked from the headers before a byte of weights is read or written."""
        for qname, (shape, _) in expected_tensors(self.config).items():
            hf = self._names[qname][0]
            f = self._where[hf]
            st_dtype, st_shape, _ = f.tensors[hf]
            if st_shape != tuple(shape):
                raise FormatError(
                    f"{f.path}: weight {hf} has shape {list(st_shape)}, config.json implies {list(shape)}"
                )
            if st_dtype not in _ST_DTYPES:
                raise FormatError(f"{f.path}: weight {hf} is {st_dtype}; qora reads F32, F16 and BF16")

    def tensor(self, qname: str, dtype: str, shape) -> np.ndarray:
        hf = self._names[qname][0]
        f = self._where[hf]
        st_dtype, a = f.array(hf)
        if a.shape != tuple(shape):
            raise FormatError(f"{f.path}: weight {hf} has shape {list(a.shape)}, config.json implies {list(shape)}")
        if a.ndim == 1:
            x = _to_f32(a, st_dtype)
            _check_finite_rows(x)
            return Q.quantize(x, dtype)
        if dtype == "f32" and st_dtype == "F32":
            return a  # zero copy from the source map to the output file
        return _encode_rows(lambda r0, r1: _to_f32(a[r0:r1], st_dtype), a.shape[0], a.shape[1], dtype)

    def source_name(self, qname: str) -> str:
        return self._names[qname][0]

    def check_unchanged(self):
        for f in self._files:
            f._guard and f._guard.check()

    def close(self):
        for f in getattr(self, "_files", []):
            f.close()


# --------------------------------------------------------------------------------------------
# GGUF file
# --------------------------------------------------------------------------------------------

# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) -> how the Hugging Face tokenizer.json splits text
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral")
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_PRE = ("gpt-2", "gpt2", "phi-2", "mpt", "olmo")
_SMOLLM_PRE = ("smollm", "codeshell")
_DEFAULT_REGEXES = (  # llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEFAULT, applied in sequence
    r"[\p{P}\$\+<=>\^~\|]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
)
_GGUF_TOKEN_CONTROL, _GGUF_TOKEN_USER_DEFINED = 3, 4


def gguf_tokenizer_json(fields: dict, where) -> str:
    """Rebuild a Hugging Face tokenizer.json from a GGUF's tokenizer.ggml.* metadata
    (byte-level BPE vocabularies, tokenizer.ggml.model == "gpt2")."""
    from tokenizers import AddedToken, decoders

    model = fields.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise FormatError(
            f"{where}: GGUF tokenizer model {model!r} is not supported (qora rebuilds byte-level "
            f"BPE 'gpt2' vocabularies); convert from the Hugging Face folder instead"
        )
    pre = fields.get("tokenizer.ggml.pre") or "default"
    tokens = fields.get("tokenizer.ggml.tokens")
    merges_raw = fields.get("tokenizer.ggml.merges")
    if not tokens or merges_raw is None:
        raise FormatError(f"{where}: GGUF has no tokenizer.ggml.tokens / merges")
    types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    tok = _gguf_bpe(tokens, merges_raw, pre in _LLAMA3_PRE, where)
    add_prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", False))
    tok.pre_tokenizer = _gguf_pre_tokenizer(pre, add_prefix, where)
    tok.decoder = decoders.ByteLevel()

    # Control tokens are special; user-defined ones are matched verbatim but decoded like text.
    tok.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == _GGUF_TOKEN_CONTROL]
    )
    tok.add_tokens(
        [
            AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types)
            if t == _GGUF_TOKEN_USER_DEFINED
        ]
    )
    post = _gguf_post_processor(fields, tokens, pre)
    if post is not None:
        tok.post_processor = post
    # check that every id maps back to its GGUF token (fails on duplicate strings, which we report)
    for i, t in enumerate(tokens):
        if tok.id_to_token(i) != t:
            _warn(f"{where}: token {i} ({t!r}) is a duplicate and cannot be produced by the tokenizer")
            break
    return tok.to_str()


def _gguf_bpe(tokens: list, merges_raw: list, ignore_merges: bool, where):
    """A tokenizers BPE Tokenizer over the GGUF vocabulary and merges."""
    from tokenizers import Tokenizer, models

    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a repeated string keeps its first id (llama.cpp pads with unique [PADn])
    merges = []
    for m in merges_raw:
        sp = m.find(" ", 1)  # as llama.cpp: the first space after the first character separates the pair
        if sp < 0:
            raise FormatError(f"{where}: malformed merge {m!r}")
        merges.append((m[:sp], m[sp + 1 :]))
    try:
        return Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges, fuse_unk=False))
    except Exception as e:
        raise FormatError(f"{where}: GGUF vocabulary is inconsistent ({e})") from None


def _gguf_pre_tokenizer(pre: str, add_prefix: bool, where):
    """The pre-tokenizer llama.cpp applies for tokenizer.ggml.pre == `pre`."""
    from tokenizers import Regex, pre_tokenizers

    def byte_level(use_regex):
        return pre_tokenizers.ByteLevel(add_prefix_space=add_prefix, trim_offsets=True, use_regex=use_regex)

    if pre in _LLAMA3_PRE:
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated", invert=False), byte_level(False)]
        )
    if pre in _SMOLLM_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level(True)])
    if pre in _GPT2_PRE:
        return byte_level(True)
    if pre == "default":
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in _DEFAULT_REGEXES]
            + [byte_level(False)]
        )
    known = ", ".join(("default",) + _LLAMA3_PRE + _SMOLLM_PRE + _GPT2_PRE)
    raise FormatError(f"{where}: GGUF pre-tokenizer {pre!r} is not supported (qora knows {known})")


def _gguf_post_processor(fields: dict, tokens: list, pre: str):
    """The BOS / EOS llama.cpp adds around a prompt, as a TemplateProcessing (None: nothing added)."""
    from tokenizers import processors

    add_bos = fields.get("tokenizer.ggml.add_bos_token", pre in _LLAMA3_PRE)
    add_eos = fields.get("tokenizer.ggml.add_eos_token", False)
    bos, eos = fields.get("tokenizer.ggml.bos_token_id"), fields.get("tokenizer.ggml.eos_token_id")
    bos_tok = tokens[bos] if add_bos and bos is not None and 0 <= bos < len(tokens) else None
    eos_tok = tokens[eos] if add_eos and eos is not None and 0 <= eos < len(tokens) else None
    if bos_tok is None and eos_tok is None:
        return None

    def seq(piece, type_id):  # e.g. ["<|begin_of_text|>:0", "$A:0"]
        return [f"{t}:{type_id}" for t in (bos_tok, piece, eos_tok) if t is not None]

    specials = [(t, i) for t, i in ((bos_tok, bos), (eos_tok, eos)) if t is not None]
    return processors.TemplateProcessing(
        single=seq("$A", 0), pair=seq("$A", 0) + seq("$B", 1), special_tokens=list(dict.fromkeys(specials))
    )


def _llama3_rope_scaling(factors: np.ndarray, theta: float, head_dim: int, where) -> dict | None:
    """llama.cpp bakes Llama 3.x RoPE scaling into a rope_freqs tensor (a divisor per frequency);
    recover the HF rope_scaling parameters that reproduce it. Only the ratios low/high_freq_factor
    over original_max_position_embeddings are defined by the tensor: we take 8192 for the latter
    (Llama 3's value) and check that the HF formula gives the tensor back."""
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if factors.shape != inv_freq.shape:
        raise FormatError(f"{where}: rope_freqs has {factors.size} entries, expected {inv_freq.size}")
    if not np.all(np.isfinite(factors)) or factors.min() < 1:
        raise FormatError(f"{where}: rope_freqs must hold finite factors >= 1 (Llama 3 frequency divisors)")
    big = float(factors.max())
    if np.allclose(factors, 1.0):
        return None
    x = inv_freq / (2 * math.pi)  # 1 / wavelength
    smooth = (factors > 1 + 1e-6) & (factors < big * (1 - 1e-6))
    orig = 8192
    if smooth.sum() >= 2:
        s = (1 / factors[smooth] - 1 / big) / (1 - 1 / big)  # smooth = a * x + b
        a, b = np.polyfit(x[smooth], s, 1)
        lo, hi = -b / a, (1 - b) / a  # low_freq_factor / orig, high_freq_factor / orig
    else:  # too few points on the ramp to fit it: any ramp through them between the plateaus will do
        x_big = x[factors >= big * (1 - 1e-6)].max(initial=0.0)
        x_one = x[factors <= 1 + 1e-6].min(initial=2 * x.max())
        if smooth.any():
            xs = x[smooth][0]
            s = (1 / factors[smooth][0] - 1 / big) / (1 - 1 / big)
            width = 0.5 * min((xs - x_big) / max(s, 1e-9), (x_one - xs) / max(1 - s, 1e-9))
            lo, hi = xs - s * width, xs + (1 - s) * width
        else:
            lo, hi = (2 * x_big + x_one) / 3, (x_big + 2 * x_one) / 3
    rs = {
        "rope_type": "llama3",
        "factor": big,
        "low_freq_factor": float(f"{lo * orig:.7g}"),
        "high_freq_factor": float(f"{hi * orig:.7g}"),
        "original_max_position_embeddings": orig,
    }
    lw, hw = orig / rs["low_freq_factor"], orig / rs["high_freq_factor"]
    wl = 1 / x
    sm = (orig / wl - rs["low_freq_factor"]) / (rs["high_freq_factor"] - rs["low_freq_factor"])
    back = np.where(wl < hw, 1.0, np.where(wl > lw, big, 1 / ((1 - sm) / big + sm)))
    if not np.allclose(back, factors, rtol=1e-3):
        raise FormatError(f"{where}: rope_freqs does not follow the Llama 3 formula; qora cannot represent it")
    return rs


_GGUF_ARCHITECTURES = ("llama", "smollm3")
_GGUF_SAMPLING = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_k": "top_k",
    "general.sampling.top_p": "top_p",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}


# GGUF value types (gguf.GGUFValueType) -> struct format of one scalar
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class GGMLType(int):
    """A ggml tensor type: its id (an int, so the gguf package's tables and dequantizers take it as
    they take their own enum) and its name."""

    def __new__(cls, value: int, name: str):
        t = super().__new__(cls, value)
        t.name = name
        return t

    def __repr__(self) -> str:
        return f"GGMLType({int(self)}, {self.name!r})"


# ggml's tensor types: id -> (name, elements per block, bytes per block), as ggml.h / gguf-py list
# them. Kept here so reading a GGUF needs no third-party package (tests/test_gguf_model.py checks it
# against the gguf package's table).
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}  # fmt: skip
_GGML_BY_ID = {i: GGMLType(i, name) for i, (name, _, _) in GGML_TYPES.items()}


def gguf_dequantize(data, qtype, where):
    """Decode a GGUF tensor's bytes to float32 with the gguf package (conversion only: running reads
    the stored types directly)."""
    if qtype.name in ("F32", "F16"):
        return np.asarray(data, dtype=np.float32)
    try:
        from gguf.quants import dequantize
    except ImportError:
        raise QoraError(
            f"{where}: decoding {qtype.name} tensors needs the gguf package: pip install 'qora[convert]'"
        ) from None
    return dequantize(data, qtype)


class _GGUFTensor:
    """One tensor of a GGUF file: name, ggml type, dims (ne0 first, as ggml lists them) and a
    zero-copy view of its bytes shaped as the gguf package shapes it (float arrays [.., ne1, ne0]
    for F16/F32, uint8 [.., ne1, bytes per row] for the block types)."""

    __slots__ = ("name", "tensor_type", "shape", "data")

    def __init__(self, name, tensor_type, shape, data):
        self.name, self.tensor_type, self.shape, self.data = name, tensor_type, shape, data


def gguf_prescan(path: Path, _keep_map: bool = False):
    """Read a GGUF file's header the way llama.cpp's loader should: the one parser of a GGUF here
    (its own type table, GGML_TYPES; the gguf package only dequantizes, for conversion).

    Returns (metadata dict, [_GGUFTensor]) (and the mmap they view when _keep_map). The gguf
    package's own GGUFReader trusts the counts it reads and builds several numpy objects per
    metadata array element (hundreds of bytes each: a 16 MB file of small arrays took 11 GB and
    minutes), so it is not used. Here every count and length is checked against the bytes that
    are left and against qora.limits, per array and in total over the whole metadata (elements and
    bytes), before a value is decoded; every type against the known ones; nested arrays are
    refused; each tensor's dimensions, type, alignment and data range are checked with Python
    integers (no wrap-around). Raises FormatError("PATH: problem") on the first fault.
    """
    where = str(path)
    f = open_regular(path, where)
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise FormatError(f"{where}: truncated GGUF header ({size} bytes)")
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise FormatError(f"{where}: cannot map ({e})") from None
    guard = guard_mapping(mm, where, **_SOURCE)
    try:
        fields, tensors = _gguf_prescan(mm, size, where)
        guard.check()
    except BaseException:
        guard = None
        try:
            mm.close()
        except BufferError:
            pass  # a view is still referenced by the traceback; freed with it
        raise
    if _keep_map:
        return fields, tensors, mm
    del tensors  # views into mm
    return fields, None


def _gguf_prescan(mm, size, where):
    """Parse the mapped GGUF file: preamble, metadata, tensor infos, then the data layout."""
    n_tensors, n_kv = _gguf_preamble(mm, where)
    cur = _GGUFCursor(mm, size, where)
    fields, alignment = _gguf_metadata(cur, n_kv)
    infos = _gguf_tensor_infos(cur, n_tensors, alignment)
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    _gguf_check_layout(infos, data_start, size, where)
    return fields, _gguf_tensor_views(mm, infos, data_start)


def _gguf_preamble(mm, where) -> tuple[int, int]:
    """Magic, version and byte order of the first 24 bytes; returns (tensor count, metadata count)."""
    if mm[:4] != b"GGUF":
        raise FormatError(f"{where}: not a GGUF file")
    (version,) = struct.unpack_from("<I", mm, 4)
    if not version & 0xFFFF:  # a big-endian file reads as version << 16 here
        raise FormatError(f"{where}: big-endian GGUF files are not supported")
    if version not in (2, 3):
        raise FormatError(f"{where}: GGUF version {version} is not supported (qora reads versions 2 and 3)")
    n_tensors, n_kv = struct.unpack_from("<QQ", mm, 8)
    if n_tensors > limits.GGUF_MAX_TENSORS:
        raise FormatError(f"{where}: GGUF tensor count {n_tensors} exceeds the limit of {limits.GGUF_MAX_TENSORS}")
    if n_kv > limits.GGUF_MAX_KV:
        raise FormatError(f"{where}: GGUF metadata count {n_kv} exceeds the limit of {limits.GGUF_MAX_KV}")
    return n_tensors, n_kv


class _GGUFCursor:
    """Reads a GGUF header front to back from `pos`: every length is checked against the bytes left
    before it is read. `what` names the part being read, for the error messages."""

    def __init__(self, mm, size: int, where):
        self.mm, self.size, self.where = mm, size, where
        self.pos = 24
        self.what = "header"
        self.total_elems = 0  # array elements over the whole metadata

    def need(self, n: int) -> None:
        if self.pos + n > self.size:
            raise FormatError(
                f"{self.where}: truncated GGUF {self.what}: needs {self.pos + n} bytes, the file has {self.size}"
            )

    def read(self, fmt: str):
        n = struct.calcsize(fmt)
        self.need(n)
        v = struct.unpack_from("<" + fmt, self.mm, self.pos)
        self.pos += n
        return v[0] if len(v) == 1 else v

    def string(self, limit: int = limits.GGUF_MAX_STRING) -> bytes:
        n = self.read("Q")
        if n > limit:
            raise FormatError(f"{self.where}: GGUF {self.what}: string of {n} bytes exceeds the limit of {limit}")
        self.need(n)
        self.pos += n
        return self.mm[self.pos - n : self.pos]

    def strings(self, count: int) -> list[str]:
        """`count` strings back to back: string() and text() over each, as one tight loop (a vocabulary
        is 50K-250K of them: the per-call overhead was most of a GGUF's load time)."""
        mm, size, pos, limit = self.mm, self.size, self.pos, limits.GGUF_MAX_STRING
        length = struct.Struct("<Q").unpack_from
        out = []
        append = out.append
        try:
            for _ in range(count):
                if pos + 8 > size:
                    self.pos = pos
                    self.need(8)
                (n,) = length(mm, pos)
                if n > limit:
                    raise FormatError(
                        f"{self.where}: GGUF {self.what}: string of {n} bytes exceeds the limit of {limit}"
                    )
                end = pos + 8 + n
                if end > size:
                    self.pos = pos + 8
                    self.need(n)
                append(mm[pos + 8 : end].decode("utf-8"))
                pos = end
        except UnicodeDecodeError:
            self.text(mm[pos + 8 : end], self.what)  # raises the FormatError naming the string
        self.pos = pos
        return out

    def text(self, raw: bytes, kind: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{self.where}: GGUF {kind} {raw[:40]!r} is not valid UTF-8") from None

    def finite(self, v):
        if isinstance(v, float) and not math.isfinite(v):
            raise FormatError(f"{self.where}: GGUF {self.what} is {v}, not a finite number")
        return v

    def array(self, key: str) -> list:
        """An array value: element type and count, both checked, then the elements."""
        where, what = self.where, self.what
        itype, count = self.read("I"), self.read("Q")
        if count > limits.GGUF_MAX_ARRAY:
            raise FormatError(f"{where}: GGUF {what}: array of {count} elements exceeds {limits.GGUF_MAX_ARRAY}")
        self.total_elems += count
        if self.total_elems > limits.GGUF_MAX_METADATA_ELEMENTS:
            raise FormatError(
                f"{where}: GGUF metadata arrays hold more than {limits.GGUF_MAX_METADATA_ELEMENTS} elements "
                f"in all (at {key})"
            )
        if itype in _GGUF_SCALARS:
            n = struct.calcsize(_GGUF_SCALARS[itype]) * count
            self.need(n)
            value = np.frombuffer(self.mm, dtype="<" + _GGUF_SCALARS[itype], count=count, offset=self.pos).tolist()
            self.pos += n
            return value
        if itype == _GGUF_STRING:
            self.need(8 * count)  # every element has at least its length field
            return self.strings(count)
        if itype == _GGUF_ARRAY:
            raise FormatError(f"{where}: GGUF {what}: nested arrays are not supported")
        raise FormatError(f"{where}: GGUF {what}: unknown array element type {itype}")


def _gguf_metadata(cur: _GGUFCursor, n_kv: int) -> tuple[dict, int]:
    """The n_kv metadata entries, within the limits of qora.limits; returns (fields, alignment)."""
    where = cur.where
    fields = {}
    alignment = 32
    for i in range(n_kv):
        cur.what = f"metadata entry {i}"
        key = cur.text(cur.string(1 << 16), "metadata key name")
        if key in fields:
            raise FormatError(f"{where}: GGUF metadata {key} appears twice")
        cur.what = f"metadata {key}"
        vtype = cur.read("I")
        if vtype in _GGUF_SCALARS:
            value = cur.finite(cur.read(_GGUF_SCALARS[vtype]))
            if key == "general.alignment":
                if vtype != 4 or value == 0 or value & (value - 1) or value > 1 << 16:
                    raise FormatError(f"{where}: GGUF general.alignment must be a uint32 power of two, got {value}")
                alignment = value
        elif vtype == _GGUF_STRING:
            value = cur.text(cur.string(), cur.what)
        elif vtype == _GGUF_ARRAY:
            value = cur.array(key)
        else:
            raise FormatError(f"{where}: GGUF {cur.what}: unknown value type {vtype}")
        if cur.pos > limits.GGUF_MAX_METADATA_BYTES:
            raise FormatError(
                f"{where}: GGUF metadata is larger than the {limits.GGUF_MAX_METADATA_BYTES} byte limit (at {key})"
            )
        fields[key] = value
    return fields, alignment


def _gguf_tensor_infos(cur: _GGUFCursor, n_tensors: int, alignment: int) -> list:
    """Each tensor's name, type, dimensions and offset, checked; its byte size computed with Python
    integers (no wrap-around). Returns [(name, qtype, dims, offset, nbytes, block, type_size)]."""
    where = cur.where
    infos = []
    names = set()
    for i in range(n_tensors):
        cur.what = f"tensor info {i}"
        name = cur.text(cur.string(1 << 16), "tensor name")
        if name in names:
            raise FormatError(f"{where}: GGUF tensor {name} appears twice")
        names.add(name)
        cur.what = f"tensor {name}"
        n_dims = cur.read("I")
        if not 1 <= n_dims <= limits.GGUF_MAX_DIMS:
            raise FormatError(f"{where}: GGUF tensor {name} has {n_dims} dimensions (1..{limits.GGUF_MAX_DIMS})")
        dims = [cur.read("Q") for _ in range(n_dims)]
        if any(not 1 <= d <= limits.MAX_TENSOR_DIM for d in dims):
            raise FormatError(f"{where}: GGUF tensor {name} has bad dimensions {dims}")
        ttype, offset = cur.read("I"), cur.read("Q")
        if ttype not in GGML_TYPES:
            raise FormatError(f"{where}: GGUF tensor {name} has unknown type {ttype}")
        qtype = _GGML_BY_ID[ttype]
        _, block, type_size = GGML_TYPES[ttype]
        if dims[0] % block:
            raise FormatError(
                f"{where}: GGUF tensor {name}: row length {dims[0]} is not a multiple of {qtype.name}'s block {block}"
            )
        nbytes = math.prod(dims) // block * type_size
        if offset % alignment:
            raise FormatError(f"{where}: GGUF tensor {name} offset {offset} is not a multiple of {alignment}")
        infos.append((name, qtype, dims, offset, nbytes, block, type_size))
    return infos


def _gguf_check_layout(infos: list, data_start: int, size: int, where) -> None:
    """Every tensor inside the file, and no two overlapping."""
    spans = []
    for name, _, _, offset, nbytes, _, _ in infos:
        if data_start + offset + nbytes > size:
            raise FormatError(
                f"{where}: GGUF tensor {name} (offset {offset}, {nbytes} bytes) runs past the end of the file "
                f"(data starts at {data_start}, the file has {size} bytes)"
            )
        spans.append((offset, offset + nbytes, name))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise FormatError(f"{where}: GGUF tensors {a} and {b} overlap")


def _gguf_tensor_views(mm, infos: list, data_start: int) -> list[_GGUFTensor]:
    """Zero-copy views into the map, made once everything is known to be inside it."""
    tensors = []
    for name, qtype, dims, offset, nbytes, block, type_size in infos:
        np_dims = tuple(reversed(dims))
        if qtype.name in ("F32", "F16"):
            dt = np.dtype("<f4" if qtype.name == "F32" else "<f2")
            data = np.frombuffer(mm, dtype=dt, count=nbytes // dt.itemsize, offset=data_start + offset)
        else:  # block types: bytes, the last axis one row's blocks (as the gguf package shapes them)
            data = np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=data_start + offset)
            np_dims = (*np_dims[:-1], np_dims[-1] // block * type_size)
        tensors.append(_GGUFTensor(name, qtype, tuple(dims), data.reshape(np_dims)))
    return tensors


# Types the converter reads from GGUF metadata: key -> (python type, element type for lists)
_GGUF_FIELD_TYPES = {
    "general.architecture": (str, None),
    "general.alignment": (int, None),
    "tokenizer.ggml.model": (str, None),
    "tokenizer.ggml.pre": (str, None),
    "tokenizer.ggml.tokens": (list, str),
    "tokenizer.ggml.merges": (list, str),
    "tokenizer.ggml.token_type": (list, int),
    "tokenizer.ggml.bos_token_id": (int, None),
    "tokenizer.ggml.eos_token_id": (int, None),
    "tokenizer.ggml.eot_token_id": (int, None),
    "tokenizer.ggml.eom_token_id": (int, None),
    "tokenizer.ggml.padding_token_id": (int, None),
    "tokenizer.ggml.add_bos_token": (bool, None),
    "tokenizer.ggml.add_eos_token": (bool, None),
    "tokenizer.ggml.add_space_prefix": (bool, None),
    "tokenizer.chat_template": (str, None),
}


def _check_gguf_fields(fields: dict, where) -> None:
    """Each metadata value qora reads has the type it must have (a lying file gets a clean error,
    not a TypeError deep in the tokenizer rebuild)."""
    for key, (kind, item) in _GGUF_FIELD_TYPES.items():
        if key not in fields:
            continue
        v = fields[key]
        ok = isinstance(v, kind) and (kind is not int or not isinstance(v, bool))
        if ok and item is not None and v:
            # one element type per array (_GGUFCursor.array: a typed read or a run of strings), so the
            # first element's type is every element's (checking all 128K tokens cost ~0.2 s of a load)
            ok = isinstance(v[0], item) and (item is not int or not isinstance(v[0], bool))
        if not ok:
            want = f"a list of {item.__name__}" if item else kind.__name__
            raise FormatError(f"{where}: GGUF metadata {key} must be {want}, got {type(v).__name__}")
    for key in _GGUF_SAMPLING:
        v = fields.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise FormatError(f"{where}: GGUF metadata {key} must be a number, got {v!r}")
    tokens, types = fields.get("tokenizer.ggml.tokens"), fields.get("tokenizer.ggml.token_type")
    if tokens is not None and types is not None and len(types) != len(tokens):
        raise FormatError(
            f"{where}: GGUF metadata tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens"
        )


class GGUFSource:
    """A GGUF file read for conversion, or (qora.gguf_model) for running: `guard_words` say which
    in the error a file changed under the map gives."""

    kind = "gguf"

    def __init__(self, path: Path, guard_words: dict | None = None):
        self.path = path
        where = str(path)
        # one parse, with every count and size checked (see gguf_prescan); tensors view the map
        fields, tensors, self._mm = gguf_prescan(path, _keep_map=True)
        try:
            self._guard = guard_mapping(self._mm, where, **(guard_words or _SOURCE))
            self._init(fields, tensors, where)
        except BaseException:
            self.close()
            raise

    def _init(self, fields: dict, tensors: list, where: str) -> None:
        _check_gguf_fields(fields, where)
        self.fields = fields
        self._tensors = {t.name: t for t in tensors}

        arch = fields.get("general.architecture")
        if arch not in _GGUF_ARCHITECTURES:
            raise ConfigError(f"{where}: unsupported architecture {arch} (qora supports llama, smollm3)")
        self.config = cfg = self._config(arch, where)
        self._names = name_map(cfg["n_layers"])
        self._check_tensor_names(where)
        for qname, (shape, _) in expected_tensors(cfg).items():
            self._gguf_tensor(qname, shape)  # every shape checked before a byte is converted

        n_tokens = len(fields.get("tokenizer.ggml.tokens") or [])
        if n_tokens > cfg["vocab_size"]:
            raise FormatError(f"{where}: {n_tokens} tokens but token_embd.weight has only {cfg['vocab_size']} rows")
        self.tokenizer_json = gguf_tokenizer_json(fields, where)
        from qora.tokenizer import check_template_source, load_checked_tokenizer

        self.chat_template = fields.get("tokenizer.chat_template")
        check_template_source(self.chat_template, where)
        self.loaded_tokenizer = load_checked_tokenizer(self.tokenizer_json, where)  # Tokenizer(loaded=) reuses it
        tok = self.loaded_tokenizer[0]
        self.generation = {
            hf: _short_float(fields[k]) if isinstance(fields[k], float) else fields[k]
            for k, hf in _GGUF_SAMPLING.items()
            if k in fields
        }
        eos = [fields.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        special = {
            "bos": fields.get("tokenizer.ggml.bos_token_id"),
            "eos": list(dict.fromkeys(int(i) for i in eos if i is not None)),
            "pad": fields.get("tokenizer.ggml.padding_token_id"),
        }
        self.special_tokens = _chat_special_tokens(tok, special, cfg["vocab_size"])

    def _config(self, arch: str, where) -> dict:
        f = self.fields

        def get(key, default=None, kind=int):
            v = f.get(f"{arch}.{key}", default)
            if v is None:
                raise FormatError(f"{where}: GGUF metadata {arch}.{key} is missing")
            if isinstance(v, list):
                raise ConfigError(f"{where}: per-layer {arch}.{key} is not supported")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
                want = "an integer" if kind is int else "a number"
                raise FormatError(f"{where}: GGUF metadata {arch}.{key} must be {want}, got {v!r}")
            if kind is int and v < 1:
                raise FormatError(f"{where}: GGUF metadata {arch}.{key} must be positive, got {v}")
            if not math.isfinite(v):
                raise FormatError(f"{where}: GGUF metadata {arch}.{key} must be finite, got {v}")
            return kind(v)

        emb = self._tensors.get("token_embd.weight")
        if emb is None:
            raise FormatError(f"{where}: GGUF has no token_embd.weight")
        dim = get("embedding_length")
        n_heads = get("attention.head_count")
        if f"{arch}.attention.key_length" not in f and dim % n_heads:
            raise ConfigError(f"{where}: {arch}.embedding_length {dim} is not a multiple of head_count {n_heads}")
        head_dim = get("attention.key_length", dim // n_heads)
        if get("attention.value_length", head_dim) != head_dim:
            raise ConfigError(f"{where}: different key and value head sizes are not supported")
        if get("rope.dimension_count", head_dim) != head_dim:
            raise ConfigError(f"{where}: partial rotary embeddings are not supported")
        n_layers = _check_limit("n_layers", get("block_count"), where)  # before a per-layer list is built
        rope_theta = get("rope.freq_base", 10000.0, _short_float)
        config = {
            "architecture": arch,
            "n_layers": n_layers,
            "dim": dim,
            "n_heads": n_heads,
            "n_kv_heads": get("attention.head_count_kv", n_heads),
            "head_dim": head_dim,
            "hidden_dim": get("feed_forward_length"),
            "vocab_size": int(emb.shape[-1]) if len(emb.shape) == 2 else 0,
            "norm_eps": get("attention.layer_norm_rms_epsilon", 1e-5, _short_float),
            "rope_theta": rope_theta,
            # smollm3: llama.cpp hard-codes n_no_rope_layer_step = 4 (no metadata key exists)
            "rope_layers": (
                [int((i + 1) % SMOLLM3_NOPE_INTERVAL != 0) for i in range(n_layers)]
                if arch == "smollm3"
                else [1] * n_layers
            ),
            "rope_scaling": self._rope_scaling(arch, rope_theta, head_dim, where),
            "max_seq_len": get("context_length", 2048),
            "tie_embeddings": "output.weight" not in self._tensors,
        }
        validate_config(config, where)
        return config

    def _rope_scaling(self, arch, theta, head_dim, where):
        f = self.fields
        kind = f.get(f"{arch}.rope.scaling.type")
        if "rope_freqs.weight" in self._tensors:
            if kind not in (None, "none"):
                raise ConfigError(f"{where}: rope_freqs together with rope scaling {kind!r} is not supported")
            t = self._tensors["rope_freqs.weight"]
            try:
                factors = gguf_dequantize(t.data, t.tensor_type, where)
            except Exception as e:
                raise FormatError(f"{where}: rope_freqs.weight cannot be decoded ({type(e).__name__}: {e})") from None
            try:
                return _llama3_rope_scaling(factors, theta, head_dim, where)
            except (ValueError, ArithmeticError) as e:  # a degenerate ramp: polyfit or a zero factor
                raise FormatError(f"{where}: rope_freqs.weight does not describe Llama 3 scaling ({e})") from None
        if kind in (None, "none"):
            factor = f.get(f"{arch}.rope.scale_linear")  # older files
            return {"rope_type": "linear", "factor": float(factor)} if factor and factor != 1.0 else None
        rs = {"rope_type": kind}
        for key, hf in (
            ("factor", "factor"),
            ("original_context_length", "original_max_position_embeddings"),
            ("attn_factor", "attention_factor"),
            ("yarn_beta_fast", "beta_fast"),
            ("yarn_beta_slow", "beta_slow"),
        ):
            v = f.get(f"{arch}.rope.scaling.{key}")
            if v is not None:
                rs[hf] = _short_float(v) if isinstance(v, float) else v
        return rs

    def _check_tensor_names(self, where):
        wanted = {gg for q, (_, gg) in self._names.items() if q != "output" or not self.config["tie_embeddings"]}
        for gg in sorted(wanted):
            if gg not in self._tensors:
                raise FormatError(f"{where}: GGUF tensor {gg} not found")
        for name in self._tensors:
            if name not in wanted and name != "rope_freqs.weight":
                raise FormatError(f"{where}: unexpected GGUF tensor {name} (not a plain llama/smollm3 model?)")

    def _gguf_tensor(self, qname, shape):
        gg = self._names[qname][1]
        t = self._tensors[gg]
        tshape = tuple(int(s) for s in reversed(t.shape))  # ggml lists ne0 (the row length) first
        if tshape != tuple(shape):
            raise FormatError(f"{self.path}: tensor {gg} has shape {list(tshape)}, the metadata implies {list(shape)}")
        return t

    def tensor(self, qname: str, dtype: str, shape) -> np.ndarray:
        t = self._gguf_tensor(qname, shape)
        qtype = t.tensor_type
        raw = t.data  # [rows, bytes per row] for quantized types, [rows, cols] for F16/F32
        if len(shape) == 2:
            raw = raw.reshape(shape[0], -1)
            if qname.endswith((".wq", ".wk")):  # undo llama.cpp's RoPE row permutation
                n_head = self.config["n_heads"] if qname.endswith(".wq") else self.config["n_kv_heads"]
                raw = raw[unpermute_rows(shape[0], n_head)]
        if qtype.name == WEIGHT_TYPES[dtype].gguf:
            return raw  # same bytes: GGUF Q4_0 / Q8_0 / F16 / F32 are qora q4 / q8 / f16 / f32
        where = self.path
        try:
            if len(shape) == 1:
                x = gguf_dequantize(raw, qtype, where).reshape(shape)
                _check_finite_rows(x)
                return Q.quantize(x, dtype)
            return _encode_rows(lambda r0, r1: gguf_dequantize(raw[r0:r1], qtype, where), shape[0], shape[1], dtype)
        except NotImplementedError:
            raise FormatError(
                f"{self.path}: tensor {t.name} is {qtype.name}, which the gguf package cannot dequantize"
            ) from None
        except (ValueError, TypeError, IndexError) as e:  # the gguf package on a malformed tensor
            raise FormatError(f"{self.path}: tensor {t.name} ({qtype.name}) cannot be decoded ({e})") from None

    def source_name(self, qname: str) -> str:
        return self._names[qname][1]

    def check_unchanged(self):
        self._guard.check()

    def close(self):
        self._tensors = {}
        self._guard = None
        mm, self._mm = getattr(self, "_mm", None), None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # arrays still reference the map; it is released with them


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _open_located(kind: str, path: Path):
    return _HFSource(path) if kind == "hf" else GGUFSource(path)


def open_source(src):
    """A Hugging Face folder or a GGUF file, ready to be converted (use close() when done)."""
    return _open_located(*locate_source(src))


def _plan(cfg: dict, quant: str, embed_quant: str) -> list[tuple[str, str, tuple]]:
    """(qora name, dtype, shape) of every tensor of the file: norms f32, the embedding and the
    untied LM head embed_quant, the other matrices quant (f16 where a row is not whole blocks)."""
    plan = []
    for qname, (shape, _allowed) in expected_tensors(cfg).items():
        if len(shape) == 1:
            dtype = "f32"
        else:
            dtype = embed_quant if qname in EMBED_TENSORS else quant
            tied = qname == "tok_embeddings" and "output" not in expected_tensors(cfg)
            dtype = Q.recipe_type("tok_embeddings.tied" if tied else qname, dtype, shape, cfg["n_layers"])
            if dtype in Q.BLOCK_BYTES and shape[1] % WEIGHT_TYPES[dtype].block:
                _warn(f"{qname}: row length {shape[1]} is not a multiple of {WEIGHT_TYPES[dtype].block}; storing f16")
                dtype = "f16"
        plan.append((qname, dtype, shape))
    return plan


def convert(src, out, quant: str = "q4", progress: bool = True, embed_quant: str | None = None) -> Path:
    """Convert `src` (Hugging Face folder or GGUF file) to the .qora file `out`; returns its path.

    quant: storage of the 2-D layer weights (q4, q8, f16, f32); embed_quant: storage of the token
    embedding and the untied LM head (default: quant); norms are always f32.
    """
    from tqdm import tqdm

    for what, q in (("quant", quant), ("embed_quant", embed_quant)):
        if q is not None and q not in QUANTS:
            raise QoraError(f"{what} must be one of {', '.join(QUANTS)}, got {q!r}")
    embed_quant = embed_quant or quant
    src = Path(src)
    # the output is checked before any work: not a folder, device or FIFO, not one of the files the
    # source reads; check_output sees `out` as given (Path() would drop a trailing "/" naming a folder)
    located = locate_source(src)
    inputs = file_ids(_located_files(*located))
    out = check_output(out, inputs)
    source = _open_located(*located)
    try:
        cfg = source.config
        plan = _plan(cfg, quant, embed_quant)
        info = {"from": source.kind, "path": str(src), "quant": quant, "embed_quant": embed_quant}
        try:
            writer = QoraWriter(
                out,
                cfg,
                source.tokenizer_json,
                source.chat_template,
                source.generation,
                source.special_tokens,
                info,
                tensors=plan,
                inputs=inputs,
            )
            with (
                writer,
                tqdm(
                    total=len(plan),
                    unit="tensor",
                    desc=f"converting {src.name}",
                    file=sys.stderr,
                    disable=not progress,
                    dynamic_ncols=True,
                ) as bar,
            ):
                for qname, dtype, shape in plan:
                    bar.set_postfix_str(qname, refresh=False)
                    try:
                        data = source.tensor(qname, dtype, shape)
                    except _NonFinite as e:
                        raise FormatError(
                            f"{src}: weight {source.source_name(qname)} holds a NaN or infinite value "
                            f"({e.index}); refused"
                        ) from None
                    check_finite(src, source.source_name(qname), dtype, data)  # copied bytes, scales
                    writer.add_tensor(qname, dtype, shape, data)
                    source.check_unchanged()  # a source truncated under its map reads as zeros
                    bar.update(1)
        except OSError as e:
            raise QoraError(f"{out}: cannot write ({e.strerror or e})") from None
    finally:
        source.close()
    return out  # QoraWriter validated the file before giving it its name
