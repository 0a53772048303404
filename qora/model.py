"""The public Model: a memory-mapped .qora file, its tokenizer, and an engine."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from qora.errors import QoraError


class Model:
    """A loaded model. Use `qora.load(path)`; close it (or use `with`) to release the mapping."""

    def __init__(self, qfile, engine, tokenizer, load_seconds: float = 0.0):
        self.file = qfile
        self.path = Path(qfile.path)
        self.config = qfile.config
        self.generation_defaults = dict(qfile.generation or {})
        self.special_tokens = dict(qfile.special_tokens or {})
        self.engine = engine
        self.tokenizer = tokenizer
        self.load_seconds = load_seconds

    # -- low level -----------------------------------------------------------------
    def forward(self, token_ids, start_pos: int = 0) -> np.ndarray:
        """Logits (n_tokens, vocab) float32 for token_ids at positions start_pos.. (fills the KV cache)."""
        return self.engine.forward(token_ids, start_pos, all_logits=True)

    def reset(self):
        """Forget the cached sequence; the next forward should start at position 0."""
        self.engine.reset()

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode(list(ids))

    # -- generation ------------------------------------------------------------------
    def _options(self, options):
        from qora.generate import GenerationOptions

        return GenerationOptions(**options)

    def stream(self, prompt, **options):
        """Yield the answer as text chunks (thinking is not included)."""
        from qora.generate import stream_generate

        for r in stream_generate(self, prompt, self._options(options)):
            if r.text and r.channel == "answer":
                yield r.text

    def generate(self, prompt, **options) -> str:
        """The answer to a prompt (a string, or a list of chat messages) as one string."""
        return "".join(self.stream(prompt, **options))

    def chat(self, messages: list[dict], **options) -> str:
        """The assistant's answer to a list of {"role", "content"} messages."""
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise QoraError("chat() takes a list of {'role': ..., 'content': ...} messages")
        return self.generate(messages, **options)

    # -- lifetime --------------------------------------------------------------------
    def close(self):
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        if self.file is not None:
            self.file.close()
            self.file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        c = self.config
        return (
            f"<qora.Model {self.path.name}: {c['architecture']} {c['n_layers']} layers, dim {c['dim']}, "
            f"vocab {c['vocab_size']}, engine {getattr(self.engine, 'device', None)}>"
        )


def load(path, threads=None, device="auto", max_seq_len=None, verbose=False) -> Model:
    """Open a .qora file by mmap and build the engine for it."""
    from qora.engine import CpuEngine
    from qora.format import read_qora
    from qora.tokenizer import Tokenizer

    if device not in ("auto", "cpu", "gpu"):
        raise QoraError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
    if device == "gpu":
        raise QoraError("no GPU backend is available in this build of qora (use device='cpu')")
    path = os.fspath(path)
    t0 = time.perf_counter()
    qfile = read_qora(path)
    try:
        tokenizer = Tokenizer(qfile.tokenizer_json, qfile.chat_template, qfile.special_tokens)
        engine = CpuEngine(qfile, n_threads=threads, max_seq_len=max_seq_len)
    except BaseException:
        qfile.close()
        raise
    model = Model(qfile, engine, tokenizer, load_seconds=time.perf_counter() - t0)
    if verbose:
        print(
            f"qora: loaded {path} in {model.load_seconds:.2f}s on cpu ({engine.isa}, {engine.n_threads} threads)",
            file=sys.stderr,
        )
    return model
