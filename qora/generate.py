"""The generation loop, in three layers (as in mlx-lm):

    generate_tokens(engine, prompt_ids, choose)  -> token ids         one engine call per step
    stream_generate(model, prompt, options)      -> Response objects  text pieces, channel, stats
    generate(model, prompt, options)             -> str               the answer only

`stream_generate` owns everything between the sampler and the user: the chat template, EOS, stop
strings, thinking (`<think>...</think>` is the "think" channel, with a token budget after which
`</think>` is forced), loop detection, the sentence-boundary stop near the length limit, and a clean
stop on Ctrl-C.

Limits: `max_tokens` counts *answer* tokens and `think_budget` counts *thinking* tokens, separately;
so `--max-tokens 200` gets 200 tokens of answer whether or not the model thought first, and the most
a request can generate is think_budget + 1 (the forced `</think>`) + max_tokens.

The model object needs: `.engine` (`forward(tokens int32 array, start_pos, all_logits=False) ->
float32 (1, vocab)`, `.max_seq_len`), `.reset()`, `.tokenizer` (qora.tokenizer.Tokenizer),
`.config`, and optionally `.generation_defaults` (the file's generation_config dict).

KV reuse: a model with `reuse_prefix(ids) -> n` and `cache_tokens` (qora.Model) keeps its cache between
calls; only the prompt past the longest prefix it shares with the cached sequence is prefilled (a chat
follow-up costs its new tokens). The last sampled token is never fed, so it is not in the cache; the
next prompt re-renders it as text and the prefix comparison decides what is reused.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from qora import limits, sampling
from qora.errors import ContextOverflowError, QoraError
from qora.sampling import Sampler
from qora.system import default_limits

# ───── defaults: the sampling ones are sampling.DEFAULTS (see GenerationOptions.resolved) ─────

DEFAULTS = sampling.DEFAULTS
SENTENCE_STOP_FRACTION = 0.85

FINISH_REASONS = ("stop", "length", "loop", "interrupted")
MAX_TOP_LOGPROBS = 20


# ───── options and responses ─────


@dataclass
class GenerationOptions:
    """What to generate and how. None means "the default": sampling.DEFAULTS for the sampling values (the
    temperature depends on whether the model will think), available RAM for the two limits.

    max_tokens: answer tokens at most; think_budget: thinking tokens before `</think>` is forced.
    enable_thinking: None keeps the chat template's default; False passes enable_thinking=False to it.
    stop: strings that end the answer (not emitted). raw: feed the prompt as is, no chat template.
    system: a system message; length_hint: "short", "medium", "long", "N words" (or sentences,
    paragraphs, lines) -> one sentence added to the system message. show_think is for front ends
    (the CLI prints thinking to stderr with it); the stream always carries the think channel.
    today: the date the template's strftime_now sees (None: now). logprobs: None, or the number of
    most likely alternatives (0..20) to report with each token's log-probability.
    Structured output (qora/structured.py): json_schema (a dict or its JSON text), grammar (Lark or
    GBNF text, or a structured.Grammar) or response_format (OpenAI's {"type": "json_object"} /
    {"type": "json_schema", "json_schema": {"schema": ...}}), at most one; it becomes `grammar`, a
    structured.Grammar, and the answer (not the thinking) is kept inside it; thinking is off unless
    enable_thinking=True. logit_bias: {token id: -100..100} added to the logits. tools: function
    definitions (OpenAI's `tools` list) the chat template renders for the model.
    """

    max_tokens: int | None = None
    think_budget: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    repeat_window: int = DEFAULTS.repeat_window
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    greedy: bool = False
    enable_thinking: bool | None = None
    show_think: bool = False
    raw: bool = False
    system: str | None = None
    length_hint: str | None = None
    loop_detection: bool = True
    sentence_stop: bool = True
    today: _dt.date | str | None = None
    logprobs: int | None = None
    # Generate max_tokens tokens (benchmarks, load tests): end-of-turn tokens are never sampled, and
    # only max_tokens, a stop string or a full context end the answer.
    ignore_eos: bool = False
    json_schema: object = None
    grammar: object = None
    response_format: dict | None = None
    logit_bias: dict | None = None
    tools: list | None = None

    def __post_init__(self):
        if self.max_tokens is not None:
            self.max_tokens = sampling._integer("max_tokens", self.max_tokens, low=1)
        if self.think_budget is not None:
            self.think_budget = sampling._integer("think_budget", self.think_budget, low=0)
        for name in ("max_tokens", "think_budget"):  # no request may ask for more than any context holds
            if (getattr(self, name) or 0) > limits.MAX_TOKENS:
                raise QoraError(f"{name} must be at most {limits.MAX_TOKENS}, got {getattr(self, name)}")
        if self.temperature is not None:
            self.temperature = sampling.check_temperature(self.temperature)
        if self.top_k is not None:
            self.top_k = sampling.check_top_k(self.top_k)
        if self.top_p is not None:
            self.top_p = sampling.check_top_p(self.top_p)
        if self.min_p is not None:
            self.min_p = sampling.check_min_p(self.min_p)
        if self.repeat_penalty is not None:
            self.repeat_penalty = sampling.check_repeat_penalty(self.repeat_penalty)
        self.repeat_window = sampling._integer("repeat_window", self.repeat_window, low=0)
        if self.presence_penalty is not None:
            self.presence_penalty = sampling.check_penalty("presence_penalty", self.presence_penalty)
        if self.frequency_penalty is not None:
            self.frequency_penalty = sampling.check_penalty("frequency_penalty", self.frequency_penalty)
        if self.seed is not None:
            self.seed = sampling._integer("seed", self.seed, low=0)
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise QoraError(f"stop strings must be non-empty strings, got {s!r}")
        if self.enable_thinking is not None:
            self.enable_thinking = bool(self.enable_thinking)
        self.ignore_eos = bool(self.ignore_eos)
        if self.system is not None and not isinstance(self.system, str):
            raise QoraError("system must be a string")
        length_hint_sentence(self.length_hint)  # validates
        if self.logprobs is not None:
            self.logprobs = sampling._integer("logprobs", self.logprobs, low=0)
            if self.logprobs > MAX_TOP_LOGPROBS:
                raise QoraError(f"logprobs must be at most {MAX_TOP_LOGPROBS}, got {self.logprobs}")
        self._structured()

    def _structured(self) -> None:
        """json_schema / response_format / grammar -> one structured.Grammar in `grammar`; logit_bias checked."""
        self.logit_bias = sampling.check_logit_bias(self.logit_bias) or None
        if self.json_schema is None and self.response_format is None and self.grammar is None:
            return
        from qora import structured

        self.grammar = structured.grammar_from(self.grammar, self.json_schema, self.response_format)
        self.json_schema = self.response_format = None
        if self.grammar is not None:
            if self.ignore_eos:
                raise QoraError("ignore_eos cannot be combined with a JSON schema or grammar (it ends the answer)")
            if self.enable_thinking is None:
                self.enable_thinking = False

    def resolved(self, thinking: bool, generation_defaults: Mapping | None = None) -> GenerationOptions:
        """A copy with every None filled in. `thinking`: the model will think (picks the temperature).

        The product defaults (sampling.DEFAULTS) win over the file's generation_config: they were chosen for
        SmolLM3 in both modes (the file's temperature 0.6 / top_p 0.95 agree in think mode), and one
        set of defaults for every model keeps runs comparable. The file is only consulted for what the
        product leaves unset (min_p).
        """
        gen = dict(generation_defaults or {})
        max_tokens, think_budget = (self.max_tokens, self.think_budget)
        if max_tokens is None or think_budget is None:
            ram_max, ram_think = default_limits()
            max_tokens = ram_max if max_tokens is None else max_tokens
            think_budget = ram_think if think_budget is None else think_budget
        min_p = self.min_p
        if min_p is None:
            try:
                min_p = sampling.check_min_p(gen.get("min_p", DEFAULTS.min_p) or 0.0)
            except QoraError:
                min_p = DEFAULTS.min_p

        def pick(value, default):
            return default if value is None else value

        return dataclasses.replace(
            self,
            max_tokens=max_tokens,
            think_budget=think_budget,
            temperature=pick(self.temperature, DEFAULTS.temperature_think if thinking else DEFAULTS.temperature),
            top_k=pick(self.top_k, DEFAULTS.top_k),
            top_p=pick(self.top_p, DEFAULTS.top_p),
            min_p=min_p,
            # greedy means plain argmax (as transformers and llama.cpp do it): penalties apply only
            # when asked for explicitly
            repeat_penalty=pick(self.repeat_penalty, 1.0 if self.greedy else DEFAULTS.repeat_penalty),
            presence_penalty=pick(self.presence_penalty, 0.0 if self.greedy else DEFAULTS.presence_penalty),
            frequency_penalty=pick(self.frequency_penalty, 0.0 if self.greedy else DEFAULTS.frequency_penalty),
            loop_detection=self.loop_detection and not self.ignore_eos,
            # a structured answer ends where its grammar does, not at a sentence end
            sentence_stop=self.sentence_stop and not self.ignore_eos and self.grammar is None,
        )

    def sampler(self, exempt=frozenset(), banned=frozenset(), constraint=None) -> Sampler:
        """The Sampler for these (resolved) options; constraint: the structured.Constraint of `grammar`."""
        if self.temperature is None:
            raise QoraError("options must be resolved before building a sampler")
        return Sampler(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repeat_penalty=self.repeat_penalty,
            repeat_window=self.repeat_window,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            greedy=self.greedy,
            exempt=exempt,
            banned=banned,
            logit_bias=self.logit_bias,
            constraint=constraint,
        )


@dataclass
class Response:
    """One step of the stream. `text` is the new text (may be ""), in `channel` "think" or "answer";
    `token` the id sampled at this step (None on a closing response with nothing sampled).
    The last response has `finish_reason` set: "stop" (EOS or a stop string), "length" (max_tokens,
    the sentence stop near it, or a full context), "loop" (repetition detected) or "interrupted".
    Times are seconds; tps are tokens per second; generation counts every generated token.
    prompt_tokens is the whole prompt; cached_tokens of them were reused from the KV cache, so
    prompt_tokens - cached_tokens were prefilled (prompt_tps is over those). With the logprobs option,
    `logprob` is the log-probability of `token` under the model (before penalties and temperature)
    and `top_logprobs` the most likely (id, logprob) pairs."""

    text: str
    token: int | None
    channel: str = "answer"
    finish_reason: str | None = None
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    prompt_time: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    generation_time: float = 0.0
    think_tokens: int = 0
    cached_tokens: int = 0
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


# ───── prompt ─────

_LENGTH_WORDS = {
    "short": "Keep the answer short: a few sentences at most.",
    "brief": "Keep the answer short: a few sentences at most.",
    "medium": "Keep the answer to a paragraph or two.",
    "long": "Give a detailed, thorough answer.",
    "detailed": "Give a detailed, thorough answer.",
}
_LENGTH_COUNT = re.compile(r"^(\d+)\s*(words?|sentences?|paragraphs?|lines?)?$")


def length_hint_sentence(hint: str | None) -> str | None:
    """The system-prompt sentence for a length hint ("short", "120 words", ...), None for no hint."""
    if hint is None:
        return None
    if not isinstance(hint, str):
        raise QoraError(f"length hint must be a string, got {hint!r}")
    h = hint.strip().lower()
    if h in _LENGTH_WORDS:
        return _LENGTH_WORDS[h]
    m = _LENGTH_COUNT.match(h)
    if m and int(m.group(1)) > 0:
        n = int(m.group(1))
        unit = (m.group(2) or "words").rstrip("s")
        return f"Answer in about {n} {unit}{'' if n == 1 else 's'}."
    raise QoraError(
        f"length hint {hint!r} not understood: use short, medium, long, or a count like '100 words', "
        "'3 sentences', '2 paragraphs'"
    )


def build_messages(
    prompt: str | Sequence[Mapping], system: str | None = None, length_hint: str | None = None
) -> list[dict]:
    """Chat messages for a prompt: a string becomes one user message; `system` replaces (or adds) the
    system message; a length hint's sentence is put in front of the system message's text (in front,
    so flags like /no_think at its end stay where the template looks for them)."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, Sequence) and all(isinstance(m, Mapping) for m in prompt):
        messages = [dict(m) for m in prompt]
        if not messages:
            raise QoraError("the chat has no messages")
    else:
        raise QoraError("prompt must be a string or a list of {'role': ..., 'content': ...} dicts")
    has_system = messages[0].get("role") == "system"
    if system is not None:
        if has_system:
            messages[0]["content"] = system
        else:
            messages.insert(0, {"role": "system", "content": system})
            has_system = True
    hint = length_hint_sentence(length_hint)
    if hint:
        if has_system:
            old = messages[0].get("content") or ""
            messages[0]["content"] = f"{hint} {old}".strip() if isinstance(old, str) else hint
        else:
            messages.insert(0, {"role": "system", "content": hint})
    return messages


def prompt_ids(
    tokenizer, prompt: str | Sequence[Mapping], options: GenerationOptions, context: int | None = None
) -> list[int]:
    """Token ids to prefill: the rendered chat template, or (raw) the text as the tokenizer encodes it.
    With `context`, a prompt that cannot fit in it is refused before all of it is tokenized
    (check_prompt_size)."""
    if options.raw:
        if not isinstance(prompt, str):
            raise QoraError("a raw prompt must be a string (no chat template is applied)")
        if context is not None:
            check_prompt_size(tokenizer, prompt, context)
        # Raw text is a document: the tokenizer's own post-processing (e.g. a BOS) applies, like HF's
        # tokenizer(text). Chat text below carries its special tokens itself (no BOS for SmolLM3).
        # Special tokens spelled in a raw prompt are control tokens on purpose (the caller wrote it all).
        return tokenizer.encode(prompt, add_special_tokens=True, parse_special=True)
    messages = build_messages(prompt, options.system, options.length_hint)
    if context is not None:  # cheap first: the contents alone may already be far too long to render
        chars = sum(len(m.get("content")) for m in messages if isinstance(m.get("content"), str))
        _check_prompt_chars(tokenizer, chars, context)
    # Not encode(text): what a message spells (`<|im_end|>`...) stays text; only the template makes control
    # tokens. One render: the size check sees the rendered text before it is tokenized.
    return tokenizer.encode_chat_checked(
        (lambda text: check_prompt_size(tokenizer, text, context)) if context is not None else None,
        messages,
        add_generation_prompt=True,
        enable_thinking=options.enable_thinking,
        today=options.today,
        tools=options.tools,
    )


_LONGEST_TOKEN: dict[int, tuple[object, int]] = {}  # id(HF tokenizer) -> (it, its longest token in characters)


def _longest_token_chars(tokenizer) -> int | None:
    """Characters of the tokenizer's longest vocabulary entry (a token never covers more input than
    that: byte-level and metaspace vocabularies spell a token with at least one character per input
    character); None when the tokenizer does not say."""
    hf = getattr(tokenizer, "_tok", None)
    if hf is None or not hasattr(hf, "get_vocab"):
        return None
    hit = _LONGEST_TOKEN.get(id(hf))
    if hit is None or hit[0] is not hf:
        hit = (hf, max(map(len, hf.get_vocab(with_added_tokens=True)), default=1))
        if len(_LONGEST_TOKEN) > 16:
            _LONGEST_TOKEN.clear()
        _LONGEST_TOKEN[id(hf)] = hit
    return hit[1]


def _too_long(what: str, context: int) -> ContextOverflowError:
    return ContextOverflowError(
        f"the prompt is {what}: shorten it to at most {context - 1} tokens or load the model with a larger context"
    )


def _check_prompt_chars(tokenizer, chars: int, context: int) -> None:
    longest = _longest_token_chars(tokenizer)
    if chars > limits.PROMPT_COUNT_FROM and longest and chars > limits.PROMPT_CHAR_FACTOR * context * longest:
        raise _too_long(f"{chars} characters, more than a {context}-token context can hold", context)


def check_prompt_size(tokenizer, text: str, context: int) -> None:
    """Refuse a prompt that cannot fit in `context` tokens without tokenizing all of it (tokenizing
    costs hundreds of bytes per character: a 60 MB prompt took 9 GB). Short texts pass at once; a text
    longer than the context could hold even in the tokenizer's longest tokens is refused by its length;
    otherwise tokens are counted a chunk at a time, cut at a space or line break, and counting stops
    (ContextOverflowError) once PROMPT_TOKEN_FACTOR x context is passed. A text that passes may still
    be too long: the generation loop checks the exact count."""
    n = len(text)
    if n <= limits.PROMPT_COUNT_FROM:
        return
    _check_prompt_chars(tokenizer, n, context)
    budget, chunk = limits.PROMPT_TOKEN_FACTOR * context, limits.PROMPT_COUNT_CHUNK
    count = start = 0
    while start < n:
        end = min(n, start + chunk)
        if end < n:
            cut = max(text.rfind(" ", start + chunk // 2, end), text.rfind("\n", start + chunk // 2, end))
            end = cut if cut > start else end
        count += len(tokenizer.encode(text[start:end]))
        if count > budget:
            raise _too_long(f"more than {count} tokens but the context holds {context}", context)
        start = end


def _rindex(ids: Sequence[int], token: int | None) -> int:
    if token is None:
        return -1
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] == token:
            return i
    return -1


def thinking_state(ids: Sequence[int], tokenizer) -> tuple[bool, bool]:
    """(mode, open) for a prompt. Only the turn being generated counts (after the last <|im_start|>).
    mode: the model may think (it has think tags and the turn has no closed `<think></think>` block,
    which is how templates switch thinking off). open: the prompt ends inside a `<think>` block."""
    think, end = tokenizer.think_id, tokenizer.end_think_id
    if think is None or end is None:
        return False, False
    start = max(_rindex(ids, tokenizer.im_start_id), 0)
    tail = ids[start:]
    last_think, last_end = _rindex(tail, think), _rindex(tail, end)
    return last_end < 0, last_think > last_end


# ───── text filters ─────


class StopStrings:
    """Ends the text at the first stop string (not emitted) and holds back any tail that could be
    the start of one, until the next piece decides."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was found)."""
        if not self.stops:
            return text, False
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*(?=\s)|[\u3002\uff01\uff1f]")
_ENDS_WITH_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*$")


class SentenceStop:
    """Near the length limit, stop at the end of the current sentence instead of mid-sentence.

    A `.`, `!` or `?` ends a sentence only when whitespace follows (so "3.14" and "e.g." inside a
    word do not), which may only be known from the next piece: a piece ending in `.` sets `pending`
    and the next piece decides. CJK full stops end a sentence at once.
    """

    def __init__(self):
        self.pending = False

    def push(self, text: str, armed: bool) -> tuple[str, bool]:
        """(text to emit, whether to stop after it)."""
        if not text:
            return text, False
        if armed:
            if self.pending and text[0].isspace():
                return "", True
            m = _SENTENCE_END.search(text)
            if m:
                return text[: m.end()], True
        self.pending = bool(_ENDS_WITH_SENTENCE_END.search(text))
        return text, False


class LoopDetector:
    """Detects a model stuck repeating itself: the last tokens are one n-gram (1 <= n <= max_period)
    repeated back to back, at least `min_repeats` times and over at least `min_span` tokens.

    A sentence or phrase of 11 tokens or more is cut at its third copy in a row (a model that said
    the same sentence three times running is looping, not answering); shorter n-grams need 32
    tokens of repetition, so legitimate runs (a short table separator, "0, 0, 0, 0", an ellipsis)
    pass while a loop stops within a few dozen tokens instead of running to the length limit.
    """

    def __init__(self, max_period: int = 64, min_repeats: int = 3, min_span: int = 32):
        self.max_period, self.min_repeats, self.min_span = max_period, min_repeats, min_span
        self.keep = max(min_span, max_period * min_repeats)
        self.tokens: list[int] = []
        self._periods = np.arange(1, max_period + 1)

    def reset(self) -> None:
        self.tokens.clear()

    def add(self, token: int) -> bool:
        """Record a token; True when the recent tokens are a loop."""
        self.tokens.append(int(token))
        if len(self.tokens) > 2 * self.keep:
            del self.tokens[: -self.keep]
        if len(self.tokens) < self.min_span:
            return False
        h = np.asarray(self.tokens[-self.keep :], dtype=np.int64)
        # A period n needs h[-1] == h[-1-n]: test that for every n at once, then check the candidates.
        periods = self._periods[self._periods < h.size]
        candidates = periods[h[-1 - periods] == h[-1]]
        for n in candidates:
            span = max(self.min_span, self.min_repeats * int(n))
            if span > h.size:
                continue
            window = h[-span:]
            if np.array_equal(window[n:], window[:-n]):
                return True
        return False


# ───── layer 1: tokens ─────


@dataclass
class _Timing:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prompt_time: float = 0.0
    gen_start: float = 0.0


def engine_step(engine, token: int, pos: int):
    """One decode step: the logits of `token` at `pos`, (vocab,). An engine that can sample where its
    logits are (`forward_lazy`: the Vulkan engine) keeps them there; the Sampler then reads back only
    its candidates, and anything else that asks for the array gets the whole row."""
    lazy = getattr(engine, "forward_lazy", None)
    if lazy is not None:
        return lazy(token, pos)
    return engine.forward(np.array([token], dtype=np.int32), pos)[-1]


def generate_tokens(
    engine,
    prompt: Sequence[int],
    choose: Callable[[np.ndarray], int],
    timing: _Timing | None = None,
    cached: int = 0,
    record: list[int] | None = None,
) -> Iterator[int]:
    """Prefill `prompt` in one engine call, then yield one token per step: `choose(logits)` picks it
    (the sampler, or a forced token), and it is fed back on the next step. Stops on its own only when
    the context is full; a caller stops it by breaking out (a stop token is never fed).

    cached: the first `cached` prompt tokens are already in the engine's cache (prefill starts after
    them). record: a list equal to the cached tokens (prompt[:cached]) that is kept equal to them:
    tokens are appended once the forward call that wrote them has returned."""
    max_seq = int(engine.max_seq_len)
    n = len(prompt)
    if n == 0:
        raise QoraError("the prompt is empty: nothing to generate from")
    if n + 1 > max_seq:
        raise ContextOverflowError(
            f"the prompt is {n} tokens but the context holds {max_seq}: "
            f"shorten the prompt to at most {max_seq - 1} tokens or load the model with a larger context"
        )
    if not 0 <= cached < n:
        raise QoraError(f"cached must be in [0, {n}) for a {n}-token prompt, got {cached}")
    timing = timing if timing is not None else _Timing()
    t0 = time.perf_counter()
    new = [int(t) for t in prompt[cached:]]
    logits = engine.forward(np.asarray(new, dtype=np.int32), cached)
    if record is not None:
        record.extend(new)
    timing.prompt_tokens = n
    timing.cached_tokens = cached
    timing.prompt_time = time.perf_counter() - t0
    timing.gen_start = time.perf_counter()
    pos = n
    logits = np.asarray(logits)[-1]
    while True:
        token = int(choose(logits))
        yield token
        if pos + 1 > max_seq:
            return  # context full: the token was produced but cannot be fed
        logits = engine_step(engine, token, pos)
        if record is not None:
            record.append(token)
        pos += 1


# ───── layer 2: responses ─────


def token_logprobs(logits, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """log-softmax of the raw logits: (logprob of `token`, the `top` most likely (id, logprob) pairs)."""
    x = np.asarray(logits, dtype=np.float64).reshape(-1)
    m = x.max()
    lse = m + math.log(np.exp(x - m).sum())
    best: list[tuple[int, float]] = []
    if top > 0:
        ids = np.argpartition(-x, top - 1)[:top] if top < x.size else np.arange(x.size)
        ids = ids[np.argsort(-x[ids], kind="stable")]
        best = [(int(i), float(x[i] - lse)) for i in ids]
    return float(x[int(token)] - lse), best


def _merge_options(options: GenerationOptions | None, overrides: dict) -> GenerationOptions:
    if options is None:
        options = GenerationOptions()
    elif not isinstance(options, GenerationOptions):
        raise QoraError(f"options must be a GenerationOptions, not {type(options).__name__}")
    if overrides:
        names = {f.name for f in dataclasses.fields(GenerationOptions)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise QoraError(f"unknown generation option {unknown[0]!r}")
        options = dataclasses.replace(options, **overrides)
    return options


def stream_generate(
    model, prompt: str | Sequence[Mapping], options: GenerationOptions | None = None, **overrides
) -> Iterator[Response]:
    """Generate from `prompt` (a string: one user message; or a list of chat messages), yielding a
    Response per generated token and a closing one with finish_reason set. Keyword arguments override
    fields of `options`. Raises ContextOverflowError when the prompt leaves no room to generate."""
    yield from _Generation(model, prompt, _merge_options(options, overrides)).run()


class _Generation:
    """One answer in progress: the prompt's thinking state, the sampler, the two channels (think and
    answer) with their detokenizer and stop checks, and the counts a Response reports. `run` feeds each
    generated token to `_think_token` or `_answer_token`, which yield its Responses and say whether the
    answer ended."""

    def __init__(self, model, prompt, opts: GenerationOptions):
        self.model = model
        tok = self.tok = model.tokenizer
        self.ids = prompt_ids(tok, prompt, opts, context=int(model.engine.max_seq_len))
        thinking_mode, think_open = thinking_state(self.ids, tok)
        if opts.enable_thinking is False and tok.think_id is not None and thinking_mode and not opts.raw:
            thinking_mode = False  # the template ignores enable_thinking but the caller asked for no thinking
        o = self.o = opts.resolved(thinking_mode, getattr(model, "generation_defaults", None))
        constraint = o.grammar.start(tok) if o.grammar is not None else None
        self.sampler = o.sampler(
            exempt=tok.special_ids, banned=tok.stop_ids if o.ignore_eos else frozenset(), constraint=constraint
        )
        self.channel = "think" if think_open else "answer"
        self.history: list[int] = []  # generated tokens: the penalties' context
        self.n_think = self.n_answer = 0
        self.force: int | None = None  # a token to feed instead of sampling (the forced </think>)
        if think_open and o.think_budget == 0 and tok.end_think_id is not None:
            self.force = tok.end_think_id  # the prompt opened a thought with no budget for it
        self.detok = tok.detokenizer()
        self.stops = StopStrings(o.stop)
        self.sentence = SentenceStop()
        self.loops = LoopDetector()
        self.sentence_from = math.ceil(SENTENCE_STOP_FRACTION * o.max_tokens)
        self.timing = _Timing()
        self.finish: str | None = None
        self.closed = False  # the Response carrying the finish reason went out
        self.last_token: int | None = None
        self.chosen_logprobs: tuple[float, list[tuple[int, float]]] | None = None  # the last chosen token's

    def choose(self, logits: np.ndarray) -> int:
        if self.force is not None:
            token, self.force = self.force, None
        else:
            # the grammar of structured output holds for the answer, not the thinking before it
            token = self.sampler(logits, self.history, constrain=self.channel == "answer")
        if self.o.logprobs is not None:
            self.chosen_logprobs = token_logprobs(logits, token, self.o.logprobs)
        return token

    def response(self, text: str, token: int | None, ch: str, finish_reason: str | None = None) -> Response:
        timing = self.timing
        gen_time = time.perf_counter() - timing.gen_start if timing.gen_start else 0.0
        n_gen = len(self.history)
        prefilled = timing.prompt_tokens - timing.cached_tokens
        lp = self.chosen_logprobs if token is not None else None
        return Response(
            text=text,
            token=token,
            channel=ch,
            finish_reason=finish_reason,
            prompt_tokens=timing.prompt_tokens,
            prompt_tps=prefilled / timing.prompt_time if timing.prompt_time > 0 else 0.0,
            prompt_time=timing.prompt_time,
            generation_tokens=n_gen,
            generation_tps=n_gen / gen_time if gen_time > 0 else 0.0,
            generation_time=gen_time,
            think_tokens=self.n_think,
            cached_tokens=timing.cached_tokens,
            logprob=lp[0] if lp else None,
            top_logprobs=lp[1] if lp else None,
        )

    def flush_channel(self) -> str:
        """What the current channel still holds (partial characters, a possible stop-string start)."""
        text = self.detok.finalize()
        self.detok.reset()
        if self.channel == "answer":
            text, _ = self.stops.push(text)
            text += self.stops.flush()
        return text

    def _tokens(self):
        model = self.model
        if hasattr(model, "reuse_prefix"):
            cached, record = model.reuse_prefix(self.ids), model.cache_tokens
        else:  # a model without a record of its cache: start from an empty one
            model.reset()
            cached, record = 0, None
        return generate_tokens(model.engine, self.ids, self.choose, self.timing, cached=cached, record=record)

    def _switch(self, token: int) -> Iterator[Response]:
        """<think> or </think>: close the channel being left (its held text goes with the tag), open the other."""
        tok = self.tok
        if token == tok.think_id and tok.end_think_id is not None:
            # Entering thinking: what the answer channel held belongs to it.
            yield self.response(self.flush_channel() if self.channel == "answer" else "", token, self.channel)
            self.channel = "think"
            self.loops.reset()
            if self.n_think >= self.o.think_budget:
                self.force = tok.end_think_id
        else:
            yield self.response(self.flush_channel() if self.channel == "think" else "", token, "think")
            self.channel = "answer"
            self.loops.reset()

    def _think_token(self, token: int, piece: str) -> Iterator[Response]:
        """A token of the thought; sets finish when thinking loops with no way to close it."""
        self.n_think += 1
        yield self.response(piece, token, "think")
        looping = self.o.loop_detection and self.loops.add(token)
        if (self.n_think >= self.o.think_budget or looping) and self.tok.end_think_id is not None:
            # Budget spent (or thinking in circles): close the thought, go on with the answer.
            self.force = self.tok.end_think_id
        elif looping:
            self.finish = "loop"

    def _answer_token(self, token: int, piece: str) -> Iterator[Response]:
        """A token of the answer; sets finish when a stop string, the sentence stop, max_tokens or a loop
        ends it (the first two end with this token's response, which carries the finish reason)."""
        o = self.o
        self.n_answer += 1
        text, hit_stop = self.stops.push(piece)
        if hit_stop:
            self.finish = "stop"
            yield self.response(text, token, "answer", "stop")
            return
        if o.sentence_stop:
            text, hit_end = self.sentence.push(text, armed=self.n_answer >= self.sentence_from)
            if hit_end:
                self.finish = "length"
                yield self.response(text, token, "answer", "length")
                return
        yield self.response(text, token, "answer")
        if self.n_answer >= o.max_tokens:
            self.finish = "length"
        elif o.loop_detection and self.loops.add(token):
            self.finish = "loop"

    def on_token(self, token: int) -> Iterator[Response]:
        """A chosen token: yields its Responses, and sets `finish` when it ends the answer (`closed` too
        when one of these Responses carried the finish reason: a stop string, the sentence stop)."""
        tok = self.tok
        self.last_token = token
        self.history.append(token)
        if token in tok.stop_ids:
            self.finish = "stop"
            return
        if (token == tok.think_id and tok.end_think_id is not None) or (
            token == tok.end_think_id and tok.think_id is not None
        ):
            yield from self._switch(token)
            return
        piece = self.detok.add(token)
        step = self._think_token if self.channel == "think" else self._answer_token
        for r in step(token, piece):
            yield r
            if r.finish_reason is not None:
                self.closed = True  # this response closed the answer
                return

    def close(self, finish: str | None = None) -> Response | None:
        """The closing Response (held-back text, and the stop token when one ended the answer) with
        `finish` (default: the reason already set); None when the answer was closed already."""
        if self.closed:
            return None
        self.closed = True
        finish = finish or self.finish
        self.finish = finish
        return self.response(self.flush_channel(), self.last_token if finish == "stop" else None, self.channel, finish)

    def prefilled(self, cached: int, prompt_time: float) -> None:
        """For a driver that runs the prompt itself (the batching scheduler): the prompt is in the cache."""
        t = self.timing
        t.prompt_tokens, t.cached_tokens, t.prompt_time = len(self.ids), cached, prompt_time
        t.gen_start = time.perf_counter()

    def feed(self, logits) -> tuple[list[Response], int | None]:
        """One step for a driver that runs the engine itself: the next token chosen from `logits`, its
        Responses (the closing one included when it ended the answer) and the token to feed next
        (None once the answer is over)."""
        token = self.choose(logits)
        out = list(self.on_token(token))
        if self.finish is None:
            return out, token
        closing = self.close()
        if closing is not None:
            out.append(closing)
        return out, None

    def run(self) -> Iterator[Response]:
        tokens = self._tokens()
        try:
            for token in tokens:
                yield from self.on_token(token)
                if self.finish is not None:
                    break
            else:
                self.finish = "length"  # the context is full
        except KeyboardInterrupt:
            if self.closed:  # the closing Response is out already: the Ctrl-C is the caller's, not lost
                raise
            self.finish = "interrupted"
            tokens.close()
        closing = self.close()
        if closing is not None:
            yield closing


# A generation in progress as a state object (fed logits, returning tokens and Responses): what a
# scheduler that runs several sequences over one engine drives (qora.api.batch).
Generation = _Generation


# ───── layer 3: text ─────


@dataclass(frozen=True)
class Usage:
    """Token counts of one answer, as OpenAI's usage reports them: completion_tokens counts every
    generated token (thinking included, think_tokens of them); cached_tokens of the prompt were reused
    from a KV cache."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    think_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Timings:
    """Seconds and tokens per second: the prompt's prefill (over the tokens not cached) and generation."""

    prompt_time: float = 0.0
    prompt_tps: float = 0.0
    generation_time: float = 0.0
    generation_tps: float = 0.0


class GenerationResult(str):
    """An answer: the text (this object is that string, so code that wants a plain string keeps working)
    with `thinking` (the think channel's text), `tokens` (every generated token id, the closing stop token
    included), `finish_reason` (Response's: stop, length, loop, interrupted), `usage` (Usage) and
    `timings` (Timings)."""

    thinking: str
    tokens: list[int]
    finish_reason: str | None
    usage: Usage
    timings: Timings

    def __new__(cls, text: str = "", **fields):
        obj = super().__new__(cls, text)
        obj.thinking = fields.get("thinking", "")
        obj.tokens = list(fields.get("tokens", ()))
        obj.finish_reason = fields.get("finish_reason")
        obj.usage = fields.get("usage") or Usage()
        obj.timings = fields.get("timings") or Timings()
        return obj

    @property
    def text(self) -> str:
        return str(self)

    def __repr__(self):
        return f"GenerationResult({str(self)!r}, finish_reason={self.finish_reason!r}, usage={self.usage})"


class ResultCollector:
    """Gathers a stream's Responses into a GenerationResult (`add` each, then `result()`)."""

    def __init__(self):
        self.answer: list[str] = []
        self.think: list[str] = []
        self.tokens: list[int] = []
        self.last: Response | None = None

    def add(self, r: Response) -> Response:
        (self.answer if r.channel == "answer" else self.think).append(r.text)
        if r.token is not None:
            self.tokens.append(r.token)
        self.last = r
        return r

    def result(self) -> GenerationResult:
        last = self.last or Response("", None)
        return GenerationResult(
            "".join(self.answer),
            thinking="".join(self.think),
            tokens=self.tokens,
            finish_reason=last.finish_reason,
            usage=Usage(last.prompt_tokens, last.generation_tokens, last.cached_tokens, last.think_tokens),
            timings=Timings(last.prompt_time, last.prompt_tps, last.generation_time, last.generation_tps),
        )


def generate(
    model, prompt: str | Sequence[Mapping], options: GenerationOptions | None = None, **overrides
) -> GenerationResult:
    """The answer (thinking left out) as one string: a GenerationResult, which also carries the token ids,
    the finish reason, usage and timings."""
    collect = ResultCollector()
    for r in stream_generate(model, prompt, options, **overrides):
        collect.add(r)
    return collect.result()
