"""A GGUF file opened for running, as it is: no conversion, no second file.

`GGUFModelFile` has the interface of `format.QoraFile` that the loader, the engines, the Model and
bench read (config, tokenizer_json, chat_template, generation, special_tokens, tensor_info,
tensor(), guard, close()), so `loader.open_model_file` picks one or the other by the file's magic.

Everything about the file is read by the one GGUF parser of convert.py (`gguf_prescan` through
`GGUFSource`): every count, length, offset, alignment and shape checked against the limits and the
file size, the metadata types, the config normalized and validated (llama / smollm3, RoPE theta and
scaling incl. YaRN and Llama 3's rope_freqs, SmolLM3's no-RoPE layers, tied embeddings), the
tokenizer rebuilt from tokenizer.ggml.* and the chat template. What is added here is only what
running needs beyond converting:

- each tensor is handed to the engine in its stored type, a zero-copy view of the mapped file;
  a type the engine has no kernels for is refused naming the type and the tensor;
- llama.cpp's converter permutes the rows of Q and K (LlamaModel.permute) so its RoPE can rotate
  adjacent pairs; qora's RoPE rotates the pairs (i, i + head_dim/2) as transformers does. Rotating
  a permuted basis would need a second RoPE kind in every kernel path, so those two matrices per
  layer are copied once at load with their rows put back (blocks never straddle rows, so this is
  exact for every type): about (n_heads + n_kv_heads) / (3 n_heads + n_kv_heads + 3 hidden/head_dim)
  of the layer weights (~6 % for SmolLM3-3B, ~13 % for SmolLM2-135M); everything else stays mapped;
- norms stored as F16/BF16 (rare) are widened to f32 (a few KB);
- every value the engine reads is checked finite (block scales included), as for .qora.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from qora import dtypes
from qora.errors import FormatError

log = logging.getLogger(__name__)

# GGUF type name -> qora weight type with the very same bytes (the engine's kernels read them as is)
RUNNABLE = {t.gguf: name for name, t in dtypes.WEIGHT_TYPES.items()}

_RUN = {"what": "model file", "advice": "reload it"}


def runnable_types() -> str:
    return ", ".join(sorted(RUNNABLE))


class GGUFModelFile:
    """An open GGUF model: header facts as attributes, tensors as views into one read-only mmap.

    Use as a context manager or call close(); as with QoraFile, the mapping outlives close() while
    an engine still holds views of it."""

    kind = "gguf"

    def __init__(self, path, check_values: bool = True):
        from qora.convert import GGUFSource

        self.path = Path(path)
        where = str(self.path)
        self._src = src = GGUFSource(self.path, guard_words=_RUN)
        try:
            self.guard = src._guard
            self.config = src.config
            self.tokenizer_json = src.tokenizer_json
            self.chat_template = src.chat_template
            self.loaded_tokenizer = src.loaded_tokenizer  # the loader's Tokenizer takes it as it is
            self.generation = dict(src.generation)
            self.special_tokens = dict(src.special_tokens)
            self.source = {"from": "gguf", "path": where}
            self.header = {"source": self.source}
            self._plan(where)
            if check_values:
                from qora.format import check_finite

                for name in self.tensor_info:
                    check_finite(where, self._gguf_names[name], self.tensor_info[name]["dtype"], self.tensor(name))
        except BaseException:
            self.close()
            raise

    def _plan(self, where) -> None:
        """tensor_info (qora name -> dtype, shape, nbytes) and the arrays the engine will read."""
        from qora.convert import unpermute_rows
        from qora.format import expected_tensors

        cfg = self.config
        self.tensor_info, self._arrays, self._gguf_names = {}, {}, {}
        for qname, (shape, _) in expected_tensors(cfg).items():
            t = self._src._gguf_tensor(qname, shape)  # shape checked against the metadata
            gtype = t.tensor_type.name
            self._gguf_names[qname] = t.name
            if len(shape) == 1:
                data = self._norm(t, where)
                dtype = "f32"
            else:
                dtype = RUNNABLE.get(gtype)
                if dtype is None:
                    raise FormatError(
                        f"{where}: tensor {t.name} is {gtype}, which qora cannot run "
                        f"(it runs {runnable_types()}); convert the model with `qora convert`"
                    )
                data = t.data.reshape(shape[0], -1)
                if qname.endswith((".wq", ".wk")):  # see the module docstring: rows put back, one copy
                    n_head = cfg["n_heads"] if qname.endswith(".wq") else cfg["n_kv_heads"]
                    data = np.ascontiguousarray(data[unpermute_rows(shape[0], n_head)])
                    data.flags.writeable = False
            self._arrays[qname] = data
            self.tensor_info[qname] = {"dtype": dtype, "shape": list(shape), "nbytes": int(data.nbytes)}

    @staticmethod
    def _norm(t, where) -> np.ndarray:
        if t.tensor_type.name == "F32":
            return t.data.reshape(-1)
        if t.tensor_type.name not in ("F16", "BF16"):
            raise FormatError(f"{where}: tensor {t.name} is {t.tensor_type.name}; a norm must be F32, F16 or BF16")
        raw = t.data.reshape(-1)
        if t.tensor_type.name == "F16":
            return raw.astype(np.float32)
        bits = np.frombuffer(raw.tobytes(), dtype="<u2").astype(np.uint32) << np.uint32(16)
        return bits.view(np.float32)

    # -- access --------------------------------------------------------------------------------

    def tensor(self, name: str) -> np.ndarray:
        """The tensor's storage as the engine reads it: float arrays for f32/f16, uint8 [rows, row
        bytes] for the block types; a view of the map except for wq/wk (rows put back) and
        widened norms."""
        if self._src is None:
            raise ValueError(f"{self.path}: file is closed")
        try:
            return self._arrays[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def gguf_name(self, name: str) -> str:
        return self._gguf_names[name]

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor decoded to a new float32 array (tests and tools; gguf-py's reference decoder)."""
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        t = self.tensor_info[name]
        gtype = dtypes.WEIGHT_TYPES[t["dtype"]].gguf
        return dequantize(self.tensor(name), GGMLQuantizationType[gtype]).astype(np.float32).reshape(t["shape"])

    def close(self) -> None:
        src, self._src = getattr(self, "_src", None), None
        self._arrays = {}
        self.guard = None
        if src is not None:
            src.close()

    @property
    def closed(self) -> bool:
        return self._src is None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        c = getattr(self, "config", {})
        return f"GGUFModelFile({str(self.path)!r}, {c.get('architecture')}, {c.get('n_layers')} layers)"
