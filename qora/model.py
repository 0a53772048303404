"""The public Model: a memory-mapped .qora file, its tokenizer, and an engine (qora.engine.Engine).
It is built by qora.loader.open_model (`qora.load`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qora.errors import QoraError


class TextStream:
    """Iterates an answer's text chunks (answer channel only); `result` (a qora.generate.GenerationResult)
    is set once the stream is exhausted, and `responses` keeps nothing: Responses are folded as they pass."""

    def __init__(self, responses):
        from qora.generate import ResultCollector

        self._responses = responses
        self._collect = ResultCollector()
        self.result = None

    def __iter__(self):
        for r in self._responses:
            self._collect.add(r)
            if r.text and r.channel == "answer":
                yield r.text
        self.result = self._collect.result()

    def close(self) -> None:
        """Stop generating (the generator's cleanup runs now)."""
        self._responses.close()


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
        # The token ids whose keys/values the engine's cache holds, at positions 0..len-1. Kept so the
        # next request prefills only what differs from the last sequence (reuse_prefix). Only what a
        # forward call has finished writing is recorded, so an interrupted call never leaves a claim
        # on positions it may have half written. Calls straight to `engine.forward` bypass it.
        self.cache_tokens: list[int] = []

    # -- low level -----------------------------------------------------------------
    def forward(self, token_ids, start_pos: int = 0) -> np.ndarray:
        """Logits (n_tokens, vocab) float32 for token_ids at positions start_pos.. (fills the KV cache)."""
        ids = [int(t) for t in np.asarray(token_ids).reshape(-1)]
        del self.cache_tokens[start_pos:]  # positions from start_pos on are being rewritten
        logits = self.engine.forward(token_ids, start_pos, all_logits=True)
        if start_pos == len(self.cache_tokens):  # else a gap of unknown positions: record nothing past it
            self.cache_tokens.extend(ids)
        return logits

    def reset(self):
        """Forget the cached sequence; the next forward should start at position 0."""
        self.engine.reset()
        self.cache_tokens.clear()

    def reuse_prefix(self, token_ids) -> int:
        """How many leading `token_ids` the cache already holds (their longest common prefix with the
        cached sequence), so a prefill can start there; the cached tokens past that point are forgotten.

        At most len(token_ids) - 1: the last prompt token is always run again, since its logits (the
        next token's distribution) are not kept. A follow-up chat turn thus costs its new tokens only.
        """
        cached = self.cache_tokens
        n = min(len(cached), max(len(token_ids) - 1, 0))
        if n and cached[:n] != list(token_ids[:n]):
            a = np.asarray(cached[:n], dtype=np.int64)
            b = np.asarray(token_ids[:n], dtype=np.int64)
            n = int(np.argmin(a == b))  # the first position where they differ
        del cached[n:]
        return n

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode(list(ids))

    # -- generation ------------------------------------------------------------------
    def _options(self, options):
        from qora.generate import GenerationOptions

        return GenerationOptions(**options)

    def stream(self, prompt, **options) -> TextStream:
        """The answer as text chunks (thinking is not included), as they are generated: iterate the
        returned TextStream; once it is exhausted its `result` is the GenerationResult (token ids,
        finish reason, usage, timings)."""
        from qora.generate import stream_generate

        return TextStream(stream_generate(self, prompt, self._options(options)))

    def generate(self, prompt, **options):
        """The answer to a prompt (a string, or a list of chat messages): a GenerationResult, which is
        the answer's text as a str and carries the token ids, finish reason, usage and timings."""
        from qora.generate import generate

        return generate(self, prompt, self._options(options))

    def chat(self, messages: list[dict], **options) -> str:
        """The assistant's answer to a list of {"role", "content"} messages."""
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise QoraError("chat() takes a list of {'role': ..., 'content': ...} messages")
        return self.generate(messages, **options)

    # -- lifetime --------------------------------------------------------------------
    def close(self):
        # The engine object stays (its native state is freed): a closed model then answers every
        # call with QoraError("the model is closed") instead of an AttributeError on None.
        if self.engine is not None:
            self.engine.close()
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
            f"vocab {c['vocab_size']}, engine {self.engine.device}>"
        )
