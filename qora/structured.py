"""Structured output: token masks that keep an answer inside a JSON schema or a grammar.

A `Grammar` is what the caller asked for (a JSON schema, "any JSON object", or a Lark / GBNF grammar),
checked once when the options are made; a `Constraint` is one answer's progress through it: before
each sampled answer token the Sampler asks it for the mask of the tokens that may come next
(`apply`: the others' logits become -inf, before temperature / top-k / top-p), then tells it the
token chosen (`advance`). Once the grammar is complete only the end-of-turn tokens are allowed, so
the answer ends with finish reason "stop".

The masks come from llguidance (the Rust library behind Guidance; llama.cpp and vLLM use it too): an
Earley parser over a lexer that walks the tokenizer's token trie. Chosen over outlines-core on the
measurement of bench/structured_masks.py (dev box, AMD Zen 3, 2 cores shared with other work; the 23
schemas of tests/structured_schemas.py, a valid instance of each fed token by token, 331 steps;
128,256: the demo tokenizer grown to SmolLM3's vocabulary size):

    library      vocab    tokenizer setup  schema compile median / max  mask median  valid tokens refused
    llguidance   49,152       0.7 s             0.6 ms /    33 ms          30 µs       0 / 23 schemas
    llguidance  128,256       3.0 s             0.7 ms /    26 ms          47 µs       0 / 23
    outlines    49,152       0.3 s              99 ms / 1,047 ms            3 µs       0 / 23
    outlines   128,256       1.2 s           2,430 ms / 22,247 ms           4 µs       0 / 23

Both are correct on the suite, and both masks are small against a decode step (the share of decode
time: `bench/structured_masks.py --decode MODEL`); llguidance's first mask of a schema builds its
lexer lazily (up to 36 ms at 128K, its p99). The difference is the compile: outlines-core builds an
automaton over the whole vocabulary for each schema, 2.4 s median and 22 s worst at 128K, which every
request with a new schema would wait before its first token (a server sees a new schema per client).
llguidance also takes Lark and GBNF grammars (outlines-core: regex and JSON schema only) and has
resource limits for hostile grammars (`LLParserLimits`). Both wheels are dependency-free (3.1 MB and
2.3 MB) and actively released. The tokenizer setup is paid once per loaded model (cached below).
"""

from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass

import numpy as np

from qora import limits
from qora.errors import QoraError


class GrammarError(QoraError):
    """A JSON schema or grammar that cannot be used (invalid, unsupported, or too large)."""


def _ll():
    try:
        import llguidance
    except ImportError as e:  # pragma: no cover - a run-time dependency
        raise QoraError(f"structured output needs llguidance ({e}): pip install llguidance") from None
    return llguidance


def _limits():
    # The library's defaults are generous for trusted grammars; a server takes schemas from anyone.
    return _ll().LLParserLimits(
        max_grammar_size=limits.GRAMMAR_MAX_SIZE,
        step_lexer_fuel=limits.GRAMMAR_STEP_FUEL,
        max_lexer_states=limits.GRAMMAR_MAX_LEXER_STATES,
        verbose_errors=False,
    )


@dataclass(frozen=True)
class Grammar:
    """What an answer must match, as llguidance's grammar text. Build one with `json_schema`,
    `json_object` or `lark` (which also takes GBNF); each checks the grammar and raises GrammarError."""

    source: str  # llguidance's grammar (JSON text)
    kind: str  # "json_schema", "json_object" or "grammar": for messages

    @classmethod
    def json_schema(cls, schema) -> Grammar:
        """From a JSON schema (a dict, or its JSON text)."""
        if isinstance(schema, str):
            if len(schema) > limits.GRAMMAR_MAX_CHARS:
                raise GrammarError(f"the JSON schema is longer than {limits.GRAMMAR_MAX_CHARS} characters")
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
        text = json.dumps(schema)
        if len(text) > limits.GRAMMAR_MAX_CHARS:
            raise GrammarError(f"the JSON schema is longer than {limits.GRAMMAR_MAX_CHARS} characters")
        try:
            # compact JSON: with free whitespace a small model can emit newlines until the length limit
            source = _ll().LLMatcher.grammar_from_json_schema(text, defaults={"whitespace_flexible": False})
        except Exception as e:  # the library's own ValueError / RuntimeError on a schema it refuses
            raise GrammarError(f"JSON schema not supported: {_one_line(e)}") from None
        return cls._checked(source, "json_schema")

    @classmethod
    def json_object(cls) -> Grammar:
        """Any JSON object (OpenAI's response_format {"type": "json_object"})."""
        return cls.json_schema({"type": "object"})

    @classmethod
    def lark(cls, text: str) -> Grammar:
        """From a Lark grammar (llguidance's dialect) or a GBNF grammar (llama.cpp's): `start` / `root` rule."""
        if not isinstance(text, str) or not text.strip():
            raise GrammarError("a grammar must be non-empty text")
        if len(text) > limits.GRAMMAR_MAX_CHARS:
            raise GrammarError(f"the grammar is longer than {limits.GRAMMAR_MAX_CHARS} characters")
        from llguidance._grammar_from import grammar_from

        try:
            source = grammar_from("grammar", text)
        except Exception as e:
            raise GrammarError(f"grammar not understood: {_one_line(e)}") from None
        return cls._checked(source, "grammar")

    @classmethod
    def _checked(cls, source: str, kind: str) -> Grammar:
        what = {"json_schema": "JSON schema", "json_object": "JSON object", "grammar": "grammar"}[kind]
        try:
            message = _ll().LLMatcher.validate_grammar(source, None, limits=_limits())
        except Exception as e:
            raise GrammarError(f"{what} refused: {_one_line(e)}") from None
        if message and not message.startswith("WARNING"):
            raise GrammarError(f"{what} refused: {_one_line(message)}")
        return cls(source, kind)

    def start(self, tokenizer, vocab: int | None = None) -> Constraint:
        """A fresh Constraint for one answer over `tokenizer` (a qora Tokenizer)."""
        return Constraint(self, tokenizer, vocab)


def _one_line(e) -> str:
    text = " ".join(str(e).split())
    return text[:300] + "…" if len(text) > 300 else text


# llguidance's view of a tokenizer costs ~1 s to build at a 128K vocabulary: one per Tokenizer object.
_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TOKENIZERS_LOCK = threading.Lock()


def ll_tokenizer(tokenizer):
    """llguidance's tokenizer for a qora Tokenizer (built once, kept while the Tokenizer lives). The
    end-of-answer tokens are the Tokenizer's stop ids: a completed grammar allows only those."""
    with _TOKENIZERS_LOCK:
        lt = _TOKENIZERS.get(tokenizer)
        if lt is None:
            hf = tokenizer._tok
            try:
                lt = _ll().LLTokenizer(hf.to_str(), eos_token=sorted(tokenizer.stop_ids) or None)
            except Exception as e:
                raise QoraError(f"structured output is not available for this tokenizer: {_one_line(e)}") from None
            _TOKENIZERS[tokenizer] = lt
        return lt


class Constraint:
    """One answer's position in a Grammar: `apply(logits)` masks what may not come next, `advance(token)`
    records what came."""

    def __init__(self, grammar: Grammar, tokenizer, vocab: int | None = None):
        ll = _ll()
        self.grammar = grammar
        self.tokenizer = ll_tokenizer(tokenizer)
        self.matcher = ll.LLMatcher(self.tokenizer, grammar.source, log_level=0, limits=_limits())
        self._check()
        self.words = np.full((self.tokenizer.vocab_size + 31) // 32, -1, dtype=np.int32)
        self.vocab = vocab

    def _check(self) -> None:
        if self.matcher.is_error():
            raise GrammarError(f"structured output failed: {_one_line(self.matcher.get_error())}")

    def allowed(self) -> np.ndarray:
        """A bool per token id of the tokenizer: may it come next."""
        self.matcher.unsafe_compute_mask_ptr(self.words.ctypes.data, self.words.nbytes)
        self._check()
        bits = np.unpackbits(self.words.view(np.uint8), bitorder="little")
        return bits[: self.tokenizer.vocab_size].view(bool)

    def mask_words(self) -> tuple[np.ndarray, int]:
        """The allowed ids as bits (bit i of word i // 32: id i may come next) and how many ids they cover."""
        self.matcher.unsafe_compute_mask_ptr(self.words.ctypes.data, self.words.nbytes)
        self._check()
        return self.words.view(np.uint32), self.tokenizer.vocab_size

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """The logits with every token the grammar refuses here set to -inf (a new array)."""
        ok = self.allowed()
        n = min(ok.size, logits.size)
        out = np.full_like(logits, -np.inf)
        out[:n] = np.where(ok[:n], logits[:n], np.float32(-np.inf))  # ids past the tokenizer's: never
        return out

    def advance(self, token: int) -> None:
        """Record the token chosen (it must be one `apply` allowed)."""
        if not self.matcher.consume_token(int(token)):
            self._check()
            raise GrammarError(f"token {int(token)} does not fit the grammar here")

    @property
    def done(self) -> bool:
        """The grammar is complete: only the end of the answer may follow."""
        return self.matcher.is_stopped()


def grammar_from(grammar=None, json_schema=None, response_format=None) -> Grammar | None:
    """The one Grammar of generation options: `grammar` (Lark / GBNF text or a Grammar), `json_schema`
    (a dict or JSON text) or `response_format` (OpenAI's); None when none is given. More than one is
    refused."""
    given = [
        name
        for name, v in (("grammar", grammar), ("json_schema", json_schema), ("response_format", response_format))
        if v is not None
    ]
    if len(given) > 1:
        raise GrammarError(f"give one of {' and '.join(given)}, not both")
    if isinstance(grammar, Grammar):
        return grammar
    if grammar is not None:
        return Grammar.lark(grammar)
    if json_schema is not None:
        return Grammar.json_schema(json_schema)
    if response_format is not None:
        return from_response_format(response_format)
    return None


def from_response_format(rf) -> Grammar | None:
    """OpenAI's response_format: {"type": "text"} (None), {"type": "json_object"}, or {"type":
    "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}."""
    if not isinstance(rf, dict):
        raise GrammarError("response_format must be an object with a 'type'")
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Grammar.json_object()
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise GrammarError("response_format json_schema needs 'json_schema': {'name': ..., 'schema': {...}}")
        return Grammar.json_schema(spec["schema"])
    raise GrammarError(f"response_format type {kind!r} is not supported (text, json_object, json_schema)")
