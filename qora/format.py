"""The .qora file: one self-contained, memory-mappable model file (format version 1).

Layout (all integers little endian):

    offset 0   magic b"QORA"
    offset 4   uint32 format version (1)
    offset 8   uint64 header length H
    offset 16  H bytes of UTF-8 JSON header
    zero padding up to data_start = align_up(16 + H, 64)
    tensor data: each tensor at data_start + offset, offset a multiple of 64;
    the file ends at data_start + align_up(end of the last tensor, 64)

The JSON header holds "config" (normalized model config), "tokenizer" (tokenizer.json as a string),
"chat_template", "generation", "special_tokens", "tensors" (name -> dtype/shape/offset/nbytes) and
"source" (provenance); validate_config and expected_tensors below say what the config and the index hold.

Design: the reader trusts nothing. Every size, offset and shape is checked with Python integers
before a NumPy view is made, so a corrupt or hostile file gives a FormatError ("PATH: problem")
rather than a crash in C. Tensors are handed out as zero-copy views into one read-only mmap.
The writer streams: it holds at most the tensor being written, never the whole model.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

from qora import quant
from qora.dtypes import WEIGHT_TYPES
from qora.errors import FormatError
from qora.limits import CONFIG_INT_LIMITS, MAX_HEADER_BYTES, MAX_TENSOR_DIM, TEMPLATE_MAX_SOURCE
from qora.safeio import AtomicWriter, Transaction, open_regular

MAGIC = b"QORA"
VERSION = 1
ALIGN = 64
PREAMBLE = struct.Struct("<4sIQ")  # magic, version, header length: 16 bytes
ARCHITECTURES = ("llama", "smollm3")
SPECIAL_TOKEN_KEYS = ("bos", "eos", "pad", "im_start", "im_end", "think", "end_think")
_MATRIX_DTYPES = frozenset(quant.DTYPES)
_NORM_DTYPES = frozenset({"f32"})


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_json(raw: bytes | str, where, what: str = "JSON"):
    """json.loads for untrusted text: any failure (bad UTF-8, syntax, nesting so deep it exhausts
    the recursion limit, numbers too long to convert) is a FormatError("WHERE: WHAT ... (why)")."""
    try:
        if isinstance(raw, (bytes, bytearray, memoryview)):
            raw = bytes(raw).decode("utf-8")
        return json.loads(raw)
    except UnicodeDecodeError as e:
        raise FormatError(f"{where}: {what} is not valid JSON (not UTF-8: {e.reason} at byte {e.start})") from None
    except RecursionError:
        raise FormatError(f"{where}: {what} is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, and int() of a too-long number
        raise FormatError(f"{where}: {what} is not valid JSON ({str(e).splitlines()[0]})") from None


def find_nonfinite(value) -> str | None:
    """The key path ("a.b[3]") of the first NaN or infinite float inside a parsed JSON value, or
    None. Python's json accepts NaN, Infinity and 1e999; a config must not (they would reach the
    RoPE and sampling arithmetic, or be silently replaced)."""
    stack = [("", value)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            return where or "(value)"
        if isinstance(v, dict):
            stack.extend((f"{where}.{k}" if where else str(k), x) for k, x in v.items())
        elif isinstance(v, list):
            stack.extend((f"{where}[{i}]", x) for i, x in enumerate(v))
    return None


def reject_nonfinite(value, where, what: str) -> None:
    bad = find_nonfinite(value)
    if bad is not None:
        raise FormatError(f"{where}: {what} {bad} is not a finite number")


# NaN/Inf bit patterns: all exponent bits set
_F32_EXP, _F16_EXP, _BF16_EXP = 0x7F800000, 0x7C00, 0x7F80
# byte offsets of the f16 scales (d, and the min m or dmin where the type has one) in a block of each
# GGUF type (ggml-common.h); a type not listed keeps its one f16 scale first
_F16_SCALES = {
    "Q4_1": (0, 2),
    "Q5_1": (0, 2),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
    "Q2_K": (80, 82),
    "Q3_K": (108,),
}
_CHECK_CHUNK = 1 << 22  # elements (or blocks) checked per step: bounded temporaries


def first_nonfinite(dtype: str, data) -> int | None:
    """The index of the first NaN/Inf element (f32/f16/bf16) or block (any of its f16 scales) in `data`, the
    tensor's storage (bytes-like or array), or None. Works on the bits, in chunks: a view into a
    memory-mapped file is read once, and nothing the size of the tensor is allocated."""
    if isinstance(data, np.ndarray):
        buf = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    else:
        buf = np.frombuffer(data, dtype=np.uint8)
    gguf = WEIGHT_TYPES[dtype].gguf if dtype in WEIGHT_TYPES else None
    if dtype in quant.BLOCK_BYTES:
        blocks = buf.reshape(-1, quant.BLOCK_BYTES[dtype])
        fields = [blocks[:, o : o + 2].view("<u2").reshape(-1) for o in _F16_SCALES.get(gguf, (0,))]
    elif dtype == "f16" or gguf == "BF16":
        fields = [buf.view("<u2")]
    else:
        fields = [buf.view("<u4")]
    exp = _BF16_EXP if gguf == "BF16" else _F32_EXP if dtype == "f32" else _F16_EXP
    found = None
    for bits in fields:
        for i in range(0, bits.size if found is None else min(bits.size, found), _CHECK_CHUNK):
            bad = (bits[i : i + _CHECK_CHUNK] & exp) == exp
            if bad.any():
                found = i + int(np.argmax(bad))
                break
    return found


def check_finite(where, name: str, dtype: str, data) -> None:
    """FormatError naming the tensor if its storage holds a NaN or infinite value (or scale)."""
    i = first_nonfinite(dtype, data)
    if i is not None:
        what = f"block scale {i}" if dtype in quant.BLOCK_BYTES else f"element {i}"
        raise FormatError(f"{where}: tensor {name} holds a NaN or infinite value ({dtype} {what}); refused")


# --------------------------------------------------------------------------------------------
# Config and tensor index checks (shared by the reader, the writer and the converter)
# --------------------------------------------------------------------------------------------


def validate_config(config, where) -> dict:
    """Check a normalized config (normalize_hf_config's keys); raise FormatError("WHERE: problem") if it is bad."""
    if not isinstance(config, dict):
        raise FormatError(f"{where}: config must be a JSON object")
    missing = [
        k
        for k in (
            *CONFIG_INT_LIMITS,
            "architecture",
            "norm_eps",
            "rope_theta",
            "rope_layers",
            "rope_scaling",
            "tie_embeddings",
        )
        if k not in config
    ]
    if missing:
        raise FormatError(f"{where}: config is missing {', '.join(missing)}")
    if config["architecture"] not in ARCHITECTURES:
        raise FormatError(
            f"{where}: unsupported architecture {config['architecture']!r} (qora supports {', '.join(ARCHITECTURES)})"
        )
    for key, limit in CONFIG_INT_LIMITS.items():
        v = config[key]
        if not _is_int(v) or not 1 <= v <= limit:
            raise FormatError(f"{where}: config {key} must be an integer in 1..{limit}, got {v!r}")
    for key in ("norm_eps", "rope_theta"):
        v = config[key]
        if not _is_number(v) or v <= 0:
            raise FormatError(f"{where}: config {key} must be a positive number, got {v!r}")
    if config["rope_theta"] <= 1:  # the RoPE (and YaRN) formulas divide by log(theta)
        raise FormatError(f"{where}: config rope_theta must be greater than 1, got {config['rope_theta']!r}")
    if config["n_heads"] % config["n_kv_heads"]:
        raise FormatError(
            f"{where}: config n_heads ({config['n_heads']}) is not a multiple of n_kv_heads ({config['n_kv_heads']})"
        )
    if config["head_dim"] % 2:
        raise FormatError(f"{where}: config head_dim must be even for RoPE, got {config['head_dim']}")
    rl = config["rope_layers"]
    if not isinstance(rl, list) or len(rl) != config["n_layers"]:
        raise FormatError(f"{where}: config rope_layers must be a list of n_layers ({config['n_layers']}) entries")
    if any(not _is_int(v) or v not in (0, 1) for v in rl):
        raise FormatError(f"{where}: config rope_layers entries must be 0 or 1")
    validate_rope_scaling(config["rope_scaling"], where)
    if not isinstance(config["tie_embeddings"], bool):
        raise FormatError(f"{where}: config tie_embeddings must be true or false")
    return config


ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# rope_scaling keys the engine reads, with the check each value must pass
_ROPE_FLOAT_KEYS = {
    "factor": "positive",
    "low_freq_factor": "positive",
    "high_freq_factor": "positive",
    "attention_factor": "positive",
    "beta_fast": "positive",
    "beta_slow": "positive",
    "mscale": "finite",
    "mscale_all_dim": "finite",
}


def validate_rope_scaling(rs, where) -> None:
    """rope_scaling is null or {"rope_type": one of ROPE_TYPES, numeric parameters}: every value the
    engine's RoPE formulas use must be finite (and non-zero where it divides)."""
    if rs is None:
        return
    if not isinstance(rs, dict):
        raise FormatError(f"{where}: config rope_scaling must be null or an object")
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise FormatError(
            f"{where}: config rope_scaling type {kind!r} is not supported (qora supports {', '.join(ROPE_TYPES)})"
        )
    for key, rule in _ROPE_FLOAT_KEYS.items():
        v = rs.get(key)
        if v is None and not (key == "factor" and kind in ("linear", "llama3", "yarn")):
            continue
        if not _is_number(v) or (rule == "positive" and v <= 0):
            what = "a positive number" if rule == "positive" else "a finite number"
            raise FormatError(f"{where}: config rope_scaling {key} must be {what}, got {v!r}")
    orig = rs.get("original_max_position_embeddings")
    if orig is not None and (not _is_int(orig) or not 1 <= orig <= CONFIG_INT_LIMITS["max_seq_len"]):
        raise FormatError(f"{where}: config rope_scaling original_max_position_embeddings must be a positive integer")
    if kind == "llama3" and rs.get("low_freq_factor", 1.0) == rs.get("high_freq_factor", 4.0):
        raise FormatError(f"{where}: config rope_scaling low_freq_factor and high_freq_factor must differ")
    if "truncate" in rs and not isinstance(rs["truncate"], bool):
        raise FormatError(f"{where}: config rope_scaling truncate must be true or false")


def expected_tensors(config) -> dict:
    """name -> (shape, allowed dtypes) for every tensor a model with `config` must have."""
    dim, hd, hidden, vocab = config["dim"], config["head_dim"], config["hidden_dim"], config["vocab_size"]
    q_rows, kv_rows = config["n_heads"] * hd, config["n_kv_heads"] * hd
    out = {"tok_embeddings": ((vocab, dim), _MATRIX_DTYPES)}
    for i in range(config["n_layers"]):
        p = f"layers.{i}."
        out[p + "attn_norm"] = ((dim,), _NORM_DTYPES)
        out[p + "wq"] = ((q_rows, dim), _MATRIX_DTYPES)
        out[p + "wk"] = ((kv_rows, dim), _MATRIX_DTYPES)
        out[p + "wv"] = ((kv_rows, dim), _MATRIX_DTYPES)
        out[p + "wo"] = ((dim, q_rows), _MATRIX_DTYPES)
        out[p + "ffn_norm"] = ((dim,), _NORM_DTYPES)
        out[p + "w_gate"] = ((hidden, dim), _MATRIX_DTYPES)
        out[p + "w_up"] = ((hidden, dim), _MATRIX_DTYPES)
        out[p + "w_down"] = ((dim, hidden), _MATRIX_DTYPES)
    out["norm"] = ((dim,), _NORM_DTYPES)
    if not config["tie_embeddings"]:
        out["output"] = ((vocab, dim), _MATRIX_DTYPES)
    return out


def _check_dtype_shape(where, name, dtype, shape, allowed=_MATRIX_DTYPES) -> int:
    """Validate one tensor's dtype and shape; return its byte size."""
    if dtype not in quant.DTYPES:
        raise FormatError(f"{where}: tensor {name} has unknown dtype {dtype!r}")
    if dtype not in allowed:
        raise FormatError(f"{where}: tensor {name} must be stored as {'/'.join(sorted(allowed))}, not {dtype}")
    if (
        not isinstance(shape, (list, tuple))
        or not 1 <= len(shape) <= 2
        or any(not _is_int(s) or not 1 <= s <= MAX_TENSOR_DIM for s in shape)
    ):
        raise FormatError(f"{where}: tensor {name} has a bad shape {shape!r}")
    block = WEIGHT_TYPES[dtype].block
    if dtype in quant.BLOCK_BYTES and (len(shape) != 2 or shape[1] % block):
        raise FormatError(
            f"{where}: tensor {name} of shape {list(shape)} cannot be {dtype} "
            f"(needs 2-D with a row length that is a multiple of {block})"
        )
    return quant.nbytes(dtype, shape)


def _check_special_tokens(where, st, vocab_size) -> dict:
    if not isinstance(st, dict):
        raise FormatError(f"{where}: special_tokens must be an object")
    out = {}
    for key in SPECIAL_TOKEN_KEYS:
        v = st.get(key, [] if key == "eos" else None)
        ids = v if key == "eos" else ([] if v is None else [v])
        if not isinstance(ids, list) or any(not _is_int(t) or not 0 <= t < vocab_size for t in ids):
            raise FormatError(
                f"{where}: special_tokens {key} must be "
                f"{'a list of token ids' if key == 'eos' else 'a token id or null'} "
                f"below vocab_size {vocab_size}, got {v!r}"
            )
        out[key] = v
    return out


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------


class QoraFile:
    """An open .qora file: header fields as attributes, tensors as zero-copy views into an mmap.

    Use as a context manager or call close(). close() is best effort: it unmaps the file right away
    when no tensor view is alive; otherwise the mapping stays valid (NumPy views keep it alive) and
    is released when the last view is garbage collected. The engine keeps references to the views
    it uses, so closing the QoraFile under a running engine is safe.
    """

    def __init__(self, path, check_values: bool = True):
        self.path = Path(path)
        self._mm = self.guard = None
        where = str(self.path)
        f = open_regular(self.path, where)  # a FIFO or a device would block or never end
        with f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(PREAMBLE.size)
            if len(head) < PREAMBLE.size:
                raise FormatError(f"{where}: not a .qora file (only {size} bytes)")
            magic, version, hlen = PREAMBLE.unpack(head)
            if magic != MAGIC:
                hint = " (this is a GGUF file: open it with qora.load or --load)" if magic == b"GGUF" else ""
                raise FormatError(f"{where}: not a .qora file (magic {magic!r}){hint}")
            if version > VERSION:
                raise FormatError(
                    f"{where}: .qora format version {version} is newer than this qora "
                    f"supports ({VERSION}); upgrade qora"
                )
            if version < 1:
                raise FormatError(f"{where}: invalid .qora format version {version}")
            if hlen > MAX_HEADER_BYTES:
                raise FormatError(f"{where}: header length {hlen} exceeds the {MAX_HEADER_BYTES} byte limit")
            if PREAMBLE.size + hlen > size:
                raise FormatError(f"{where}: truncated: header needs {PREAMBLE.size + hlen} bytes, file has {size}")
            header = parse_json(f.read(hlen), where, "header")
            self._parse_header(header, where)
            self.data_start = align_up(PREAMBLE.size + hlen)
            self._check_tensors(header["tensors"], where, size - self.data_start)
            self.version = version
            self.file_size = size
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            # a read past a truncation under the map: ModelFileChangedError, not SIGBUS (qora/engine/cpu.py)
            from qora.engine import guard_mapping

            self.guard = guard_mapping(mm, where, os.fstat(f.fileno()), size)
            self._mm = mm
        if check_values:
            try:
                for name, t in self.tensor_info.items():
                    check_finite(where, name, t["dtype"], self.tensor(name))
            except BaseException:
                self.close()
                raise

    def _parse_header(self, header, where) -> None:
        if not isinstance(header, dict):
            raise FormatError(f"{where}: header must be a JSON object")
        for key in ("config", "tokenizer", "tensors"):
            if key not in header:
                raise FormatError(f"{where}: header is missing {key!r}")
        self.config = validate_config(header["config"], where)
        if not isinstance(header["tokenizer"], str):
            raise FormatError(f"{where}: header tokenizer must be the tokenizer.json text (a string)")
        self.tokenizer_json = header["tokenizer"]
        self.chat_template = header.get("chat_template")
        if self.chat_template is not None and not isinstance(self.chat_template, str):
            raise FormatError(f"{where}: header chat_template must be a string or null")
        if self.chat_template is not None and len(self.chat_template) > TEMPLATE_MAX_SOURCE:
            raise FormatError(
                f"{where}: chat template of {len(self.chat_template)} characters is over the "
                f"{TEMPLATE_MAX_SOURCE}-character limit"
            )
        self.generation = header.get("generation") or {}
        self.source = header.get("source") or {}
        for key in ("generation", "source"):
            if not isinstance(getattr(self, key), dict):
                raise FormatError(f"{where}: header {key} must be an object")
        self.special_tokens = _check_special_tokens(
            where, header.get("special_tokens") or {}, self.config["vocab_size"]
        )
        reject_nonfinite({k: header.get(k) for k in ("generation", "special_tokens", "config")}, where, "header")
        self.header = header

    def _check_tensors(self, tensors, where, data_size) -> None:
        if not isinstance(tensors, dict):
            raise FormatError(f"{where}: header tensors must be an object")
        expected = expected_tensors(self.config)
        for name in tensors:
            if name not in expected:
                raise FormatError(f"{where}: unexpected tensor {name}")
        for name in expected:
            if name not in tensors:
                raise FormatError(f"{where}: missing tensor {name}")
        info = {}
        spans = []
        for name, (shape, allowed) in expected.items():
            t = tensors[name]
            if not isinstance(t, dict) or any(k not in t for k in ("dtype", "shape", "offset", "nbytes")):
                raise FormatError(f"{where}: tensor {name} needs dtype, shape, offset and nbytes")
            dtype, tshape, offset, nb = t["dtype"], t["shape"], t["offset"], t["nbytes"]
            want = _check_dtype_shape(where, name, dtype, tshape, allowed)
            if tuple(tshape) != shape:
                raise FormatError(f"{where}: tensor {name} has shape {list(tshape)}, the config implies {list(shape)}")
            if not _is_int(nb) or nb != want:
                raise FormatError(f"{where}: tensor {name} nbytes is {nb!r}, {dtype} {list(shape)} needs {want}")
            if not _is_int(offset) or offset < 0 or offset % ALIGN:
                raise FormatError(f"{where}: tensor {name} offset {offset!r} is not a multiple of {ALIGN}")
            if offset + nb > data_size:
                raise FormatError(
                    f"{where}: truncated or corrupt: tensor {name} (offset {offset}, "
                    f"{nb} bytes) runs past the end of the data ({max(data_size, 0)} bytes)"
                )
            spans.append((offset, offset + nb, name))
            info[name] = {"dtype": dtype, "shape": list(shape), "offset": offset, "nbytes": nb}
        spans.sort()
        for (_, end, a), (start, _, b) in zip(spans, spans[1:], strict=False):
            if start < end:
                raise FormatError(f"{where}: tensors {a} and {b} overlap")
        self.tensor_info = info

    # -- access --------------------------------------------------------------------------------

    def tensor(self, name: str) -> np.ndarray:
        """Zero-copy read-only view: float32/float16 arrays of the tensor's shape for f32/f16,
        uint8 [rows, row_bytes] for q4/q8."""
        if self._mm is None:
            raise ValueError(f"{self.path}: file is closed")
        try:
            t = self.tensor_info[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None
        dtype = t["dtype"]
        np_dtype = quant.FLOAT_DTYPES.get(dtype, np.dtype(np.uint8))
        count = t["nbytes"] // np_dtype.itemsize
        arr = np.frombuffer(self._mm, dtype=np_dtype, count=count, offset=self.data_start + t["offset"])
        return arr.reshape(quant.storage_shape(dtype, t["shape"]))

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor decoded to a new float32 array (for tests and tools; the engine uses tensor())."""
        t = self.tensor_info[name]
        return quant.dequantize(self.tensor(name), t["dtype"], t["shape"])

    def close(self) -> None:
        self.guard = None  # its buffer export would keep the map; engines hold their own reference
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # tensor views are alive; the mapping goes away with the last of them

    @property
    def closed(self) -> bool:
        return self._mm is None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        c = getattr(self, "config", {})
        return (
            f"QoraFile({str(self.path)!r}, {c.get('architecture')}, {c.get('n_layers')} layers, "
            f"{len(getattr(self, 'tensor_info', {}))} tensors)"
        )


def read_qora(path, check_values: bool = True) -> QoraFile:
    """Open and validate a .qora file; raises FormatError("PATH: problem") on any inconsistency.
    check_values: also refuse NaN/Inf in any tensor (norms, f16/f32 weights, q4/q8 block scales)."""
    return QoraFile(path, check_values)


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


class QoraWriter(Transaction):
    """Streaming .qora writer.

        w = QoraWriter(path, config, tokenizer_json, chat_template, generation, special_tokens,
                       source, tensors=[(name, dtype, shape), ...])
        for name, dtype, shape in ...: w.add_tensor(name, dtype, shape, data)
        w.finish()

    With `tensors` declared up front (what the converter does) the index and header are known
    before any data, so the header is written first and every tensor goes straight to its final
    place: one pass, peak memory one tensor. Without it, tensor data is spooled to a side file and
    copied behind the header by finish() (one extra sequential copy on disk).

    `data` is raw storage (bytes-like, or a uint8 array as from quant.quantize) or a float array,
    which is converted/quantized to `dtype` here.
    Output goes to a fresh temporary file beside PATH (qora.safeio.AtomicWriter: mkstemp, never a
    predictable name) and is renamed to PATH by finish() once it validates, so a failed or
    interrupted write never leaves a half file under the final name; abort() (or leaving a `with`
    block through an exception) deletes the temporary files. PATH must not be a folder, a device,
    a FIFO, a socket or one of `inputs` (the files being converted, compared by inode).
    Every tensor's values are checked: a NaN or infinity (a q4/q8 scale included) is refused.
    """

    def __init__(
        self,
        path,
        config,
        tokenizer_json,
        chat_template=None,
        generation=None,
        special_tokens=None,
        source=None,
        *,
        tensors=None,
        inputs=(),
    ):
        self.path = Path(path)
        where = str(self.path)
        validate_config(config, where)
        if not isinstance(tokenizer_json, str):
            raise TypeError("tokenizer_json must be the tokenizer.json text (str)")
        self._header = {
            "config": config,
            "tokenizer": tokenizer_json,
            "chat_template": chat_template,
            "generation": dict(generation or {}),
            "special_tokens": _check_special_tokens(where, dict(special_tokens or {}), config["vocab_size"]),
            "tensors": {},
            "source": dict(source or {}),
        }
        self._expected = expected_tensors(config)
        self._done = False
        self._spool = None
        self._spool_path = None
        self._declared = None
        self._written = set()
        reject_nonfinite(self._header, where, "header")  # json.dumps(allow_nan=False) would raise
        self._out = AtomicWriter(self.path, inputs)
        self.tmp_path = self._out.tmp_path
        self._f = self._out.file
        try:
            if tensors is not None:
                self._declare(tensors)
            else:
                self._spool = tempfile.TemporaryFile(dir=self.path.parent)  # unnamed: nothing to plant
                self._spool_end = 0
        except BaseException:
            self.abort()
            raise

    def _check(self, name, dtype, shape) -> int:
        where = str(self.path)
        if name not in self._expected:
            raise FormatError(f"{where}: unexpected tensor {name}")
        want_shape, allowed = self._expected[name]
        nb = _check_dtype_shape(where, name, dtype, list(shape), allowed)
        if tuple(shape) != want_shape:
            raise FormatError(f"{where}: tensor {name} has shape {list(shape)}, the config implies {list(want_shape)}")
        return nb

    def _declare(self, tensors) -> None:
        index, end = {}, 0
        for name, dtype, shape in tensors:
            shape = [int(s) for s in shape]
            nb = self._check(name, dtype, shape)
            if name in index:
                raise ValueError(f"tensor {name} declared twice")
            offset = align_up(end)
            index[name] = {"dtype": dtype, "shape": shape, "offset": offset, "nbytes": nb}
            end = offset + nb
        self._header["tensors"] = index
        self._declared = index
        data_start = self._write_header()
        self._data_start = data_start
        self._file_size = data_start + align_up(end)

    def _write_header(self) -> int:
        raw = json.dumps(self._header, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
        if len(raw) > MAX_HEADER_BYTES:
            raise FormatError(f"{self.path}: header would be {len(raw)} bytes, over the {MAX_HEADER_BYTES} byte limit")
        self._f.write(PREAMBLE.pack(MAGIC, VERSION, len(raw)))
        self._f.write(raw)
        data_start = align_up(PREAMBLE.size + len(raw))
        self._f.write(b"\0" * (data_start - PREAMBLE.size - len(raw)))
        return data_start

    @staticmethod
    def _as_storage(dtype, shape, data) -> memoryview:
        if isinstance(data, np.ndarray) and data.dtype.kind == "f":
            data = quant.quantize(np.asarray(data).reshape(shape), dtype)
        elif isinstance(data, np.ndarray):
            data = np.ascontiguousarray(data)
        mv = memoryview(data)
        return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")

    def add_tensor(self, name: str, dtype: str, shape, data) -> None:
        if self._done or self._f is None:
            raise ValueError(f"{self.path}: writer is finished")
        shape = [int(s) for s in shape]
        nb = self._check(name, dtype, shape)
        if name in self._written:
            raise ValueError(f"tensor {name} written twice")
        mv = self._as_storage(dtype, shape, data)
        if mv.nbytes != nb:
            raise ValueError(f"tensor {name}: {dtype} {shape} needs {nb} bytes, got {mv.nbytes}")
        check_finite(self.path, name, dtype, mv)
        if self._declared is not None:
            t = self._declared.get(name)
            if t is None or t["dtype"] != dtype or t["shape"] != shape:
                raise ValueError(f"tensor {name} ({dtype} {shape}) does not match its declaration")
            self._f.seek(self._data_start + t["offset"])
            self._f.write(mv)
        else:
            offset = align_up(self._spool_end)
            self._spool.write(b"\0" * (offset - self._spool_end))
            self._spool.write(mv)
            self._spool_end = offset + nb
            self._header["tensors"][name] = {"dtype": dtype, "shape": shape, "offset": offset, "nbytes": nb}
        self._written.add(name)

    def finish(self) -> Path:
        """Check every tensor was written, complete the file and move it to its final name."""
        if self._done:
            return self.path
        try:
            missing = [n for n in self._expected if n not in self._written]
            if missing:
                raise FormatError(
                    f"{self.path}: missing tensor {missing[0]}"
                    + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                )
            if self._declared is not None:
                self._f.truncate(self._file_size)
            else:
                self._spool.write(b"\0" * (align_up(self._spool_end) - self._spool_end))
                self._spool.seek(0)
                self._write_header()
                shutil.copyfileobj(self._spool, self._f, 16 << 20)
                self._spool.close()
                self._spool = None
            self._f = None
            # the file must open before it takes the final name (values were checked as written)
            self._out.commit(check=lambda tmp: read_qora(tmp, check_values=False).close())
            self._done = True
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Close and delete the temporary files; the final path is left untouched."""
        if self._spool is not None:
            self._spool.close()
        self._f = self._spool = None
        if getattr(self, "_out", None) is not None:
            self._out.abort()
        self._done = True

    commit = finish  # what a `with` block that ends normally calls (Transaction)
