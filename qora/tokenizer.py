"""Tokenizer, chat template and streaming detokenizer.

- `Tokenizer` wraps a HF `tokenizers.Tokenizer` built from the tokenizer.json text stored in the .qora
  file, and knows the model's special tokens (turn markers, think tags, EOS).
- `Tokenizer.apply_chat_template` renders the model's *own* Jinja chat template, the way transformers
  does (same sandbox, same globals and filters, the `{% generation %}` tag), so the prompt qora feeds
  the model is byte-for-byte the prompt it was trained on. Templates come from model files, i.e. from
  strangers: they run in jinja2's immutable sandbox, only see plain data (str/int/float/bool/None,
  lists, dicts), and any attempt to reach Python internals is an error, not a silent empty string.
- `StreamingDetokenizer` turns token ids into text pieces one token at a time without ever cutting a
  UTF-8 character in two (byte-level BPE tokens can hold half a character).
"""

from __future__ import annotations

import _string
import contextvars
import ctypes
import dataclasses
import datetime as _dt
import functools
import inspect
import json
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from struct import error as struct_error
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import jinja2.visitor
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from qora import limits
from qora.errors import ContextOverflowError, FormatError, QoraError

# Plain ChatML, used when a model file carries no chat template (e.g. a bare GGUF).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Strings looked up in the vocabulary when the file's special_tokens does not name an id.
_SPECIAL_STRINGS = {
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "think": "<think>",
    "end_think": "</think>",
}
# End-of-sequence spellings of common Llama-family vocabularies, tried when the file lists no EOS.
_EOS_STRINGS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>")

REPLACEMENT_CHAR = "\ufffd"


# ───── chat template machinery (mirrors transformers' _compile_jinja_template) ─────


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers marks assistant text with it; we render the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _render_body(caller):
        return caller()


class _TemplateDict:
    """`dict(...)` for templates without handing them the real type (no `dict.__subclasses__` games)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja2's `namespace()` that refuses underscore names, as transformers does."""

    def __init__(*args, **kwargs):  # noqa: N805 (same signature trick as jinja2.utils.Namespace)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


# Worst-case growth of text through each tokenizers component type, per input character. Replace,
# Prepend, Precompiled and Sequence depend on their settings (_growth); a type not listed is refused.
_NORMALIZER_GROWTH = {
    "NFC": 3, "NFD": 4, "NFKC": 18, "NFKD": 18, "Lowercase": 3, "Strip": 1, "StripAccents": 1, "Nmt": 1,
    "ByteLevel": 4, "BertNormalizer": 36,
}  # fmt: skip
_PRETOKENIZER_GROWTH = {
    "ByteLevel": 5, "Metaspace": 2, "Split": 1, "Digits": 1, "WhitespaceSplit": 1, "Whitespace": 1,
    "Punctuation": 1, "CharDelimiterSplit": 1, "UnicodeScripts": 1, "BertPreTokenizer": 1, "FixedLength": 1,
}  # fmt: skip
_DECODER_GROWTH = {
    "ByteFallback": 1, "Fuse": 1, "Strip": 1, "ByteLevel": 1, "Metaspace": 1, "WordPiece": 1, "BPEDecoder": 1,
    "CTC": 1,
}  # fmt: skip
_SEQUENCE_KEYS = ("normalizers", "pretokenizers", "decoders")


def _precompiled_growth(spec: dict) -> int:
    """Sentencepiece's charsmap: a trie, then the replacement strings, NUL-separated; a matched
    character becomes at most the longest of them."""
    import base64
    import struct

    blob = base64.b64decode(spec.get("precompiled_charsmap") or b"")
    if len(blob) < 4:
        return 1
    (trie,) = struct.unpack("<I", blob[:4])
    strings = blob[4 + trie :]
    return max([1, *(len(s.decode("utf-8", "replace")) for s in strings.split(b"\0"))])


def _growth(spec, table: dict, what: str, depth: int = 0) -> float:
    """An upper bound on how many times longer one component (normalizer, pre-tokenizer or decoder)
    can make its input, from its settings alone (nothing is run)."""
    if spec is None:
        return 1
    if not isinstance(spec, dict) or depth > 16:
        raise ValueError(f"{what} is malformed")
    kind = spec.get("type")
    if kind == "Sequence":
        factor = 1.0
        for part in next((spec[k] for k in _SEQUENCE_KEYS if isinstance(spec.get(k), list)), []):
            factor *= _growth(part, table, what, depth + 1)
        return factor
    if kind == "Replace":
        pattern, content = spec.get("pattern") or {}, spec.get("content") or ""
        if isinstance(pattern, dict) and isinstance(pattern.get("String"), str) and pattern["String"]:
            return max(1.0, len(content) / len(pattern["String"]))
        return 1.0 + len(content)  # a regex may match the empty string: content between every character
    if kind == "Prepend" and table is _NORMALIZER_GROWTH:
        return 1.0 + len(spec.get("prepend") or "")
    if kind == "Precompiled" and table is _NORMALIZER_GROWTH:
        return _precompiled_growth(spec)
    if kind in table:
        return table[kind]
    raise ValueError(f"{what} type {kind!r} is not supported")


def check_tokenizer_growth(text: str, where) -> float:
    """Refuse a tokenizer.json whose normalizer, pre-tokenizer or decoder could grow text past the
    limits (a Replace of one character by many, nested, made 3 GB of one prompt); return the worst
    growth of normalizer x pre-tokenizer, which bounds the input an encode may take."""
    try:
        spec = json.loads(text)
    except (ValueError, RecursionError):
        return 1.0  # not JSON: tokenizers gives the error
    if not isinstance(spec, dict):
        return 1.0
    try:
        norm = _growth(spec.get("normalizer"), _NORMALIZER_GROWTH, "normalizer")
        pre = _growth(spec.get("pre_tokenizer"), _PRETOKENIZER_GROWTH, "pre_tokenizer")
        dec = _growth(spec.get("decoder"), _DECODER_GROWTH, "decoder")
    except (ValueError, TypeError, KeyError, struct_error) as e:
        raise FormatError(f"{where}: tokenizer.json: {e}") from None
    for name, factor, cap in (
        ("normalizer", norm, limits.TOKENIZER_MAX_EXPANSION),
        ("pre_tokenizer", pre, limits.TOKENIZER_MAX_PRETOKENIZER_EXPANSION),
        ("decoder", dec, limits.TOKENIZER_MAX_EXPANSION),
    ):
        if factor > cap:
            raise FormatError(
                f"{where}: tokenizer.json: the {name} can make text {factor:.3g} times longer (limit {cap})"
            )
    return norm * pre


def load_hf_tokenizer(text: str, where, check: bool = True) -> _HFTokenizer:
    """A `tokenizers.Tokenizer` from tokenizer.json text. tokenizers is Rust: a crafted file can make
    it panic, which surfaces as pyo3's PanicException, a BaseException. Both become a FormatError.
    Its normalizer, pre-tokenizer and decoder are checked first (check_tokenizer_growth): loading
    already normalizes the added tokens."""
    if check:
        check_tokenizer_growth(text, where)
    try:
        return _HFTokenizer.from_str(text)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: B036 - PanicException derives from BaseException
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FormatError(f"{where}: tokenizer.json cannot be loaded by tokenizers ({msg})") from None


def load_checked_tokenizer(text: str, where) -> tuple[_HFTokenizer, float, str]:
    """load_hf_tokenizer's tokenizer, check_tokenizer_growth's growth and the text they came from: what
    Tokenizer(loaded=) takes (only for that very text)."""
    growth = check_tokenizer_growth(text, where)
    return load_hf_tokenizer(text, where, check=False), growth, text


def _rust_call(what: str, fn, *args, **kwargs):
    """Call into tokenizers; an error or a Rust panic becomes a QoraError."""
    try:
        return fn(*args, **kwargs)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: B036 - PanicException derives from BaseException
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise QoraError(f"tokenizer: {what} failed ({msg})") from None


# ───── caller text stays text ─────
# A chat's contents come from whoever talks to the model (a user, an API client, a saved chat file).
# If `<|im_end|>\n<|im_start|>system\n...` typed in a message were tokenized as control tokens, a
# message could close its own turn and forge a system or assistant turn. So before a render every
# string the caller supplied (message contents, roles, tool definitions, extra variables) has each
# added-token spelling in it swapped for a placeholder; the template's own literals are the only place
# a control token can come from. After the render each placeholder is tokenized as plain text.


class ModelText(str):
    """Text the model itself wrote (an answer recorded by `qora chat`). Re-rendered in a later turn,
    its control tokens (think tags) stay control tokens, as the model produced them. Every other
    string in a chat is plain text, whatever it spells."""

    __slots__ = ()


# Placeholders are made of Unicode noncharacters (never in real text; caller text that has them is
# quarantined too): OPEN, the index in base 16 (one noncharacter per digit), CLOSE.
_PH_OPEN, _PH_CLOSE, _PH_DIGIT0 = "\ufdd0", "\ufdd1", 0xFDE0
_PH_CHARS = "\ufdd0-\ufdef"
_PH_RE = re.compile(f"{_PH_OPEN}([\ufde0-\ufdef]+){_PH_CLOSE}")
_PH_STRAY_RE = re.compile(f"[{_PH_CHARS}]")


class _Quarantine:
    """Swaps added-token spellings (and placeholder characters) in caller strings for placeholders."""

    def __init__(self, pattern: re.Pattern):
        self.pattern = pattern
        self.held: list[str] = []

    def __call__(self, text: str) -> str:
        return self.pattern.sub(self._hold, text)

    def _hold(self, m: re.Match) -> str:
        self.held.append(m.group())
        digits = "".join(chr(_PH_DIGIT0 + int(d, 16)) for d in f"{len(self.held) - 1:x}")
        return f"{_PH_OPEN}{digits}{_PH_CLOSE}"

    def split(self, text: str) -> list[tuple[bool, str]]:
        """The rendered text as (is_caller_text, piece) pairs. A placeholder the template cut apart
        (slicing a content) leaves stray noncharacters, which are dropped."""
        out, pos = [], 0
        for m in _PH_RE.finditer(text):
            index = int("".join(f"{ord(c) - _PH_DIGIT0:x}" for c in m.group(1)), 16)
            if index >= len(self.held):
                continue
            out.append((False, _PH_STRAY_RE.sub("", text[pos : m.start()])))
            out.append((True, self.held[index]))
            pos = m.end()
        out.append((False, _PH_STRAY_RE.sub("", text[pos:])))
        return [(plain, piece) for plain, piece in out if piece]


# ───── resource bounds for one render ─────
# The sandbox stops a template from reaching Python; these stop it from eating the machine:
# - every operator, call, filter, test, comparison and output goes through a check that runs BEFORE the
#   operation where one operation can multiply a size (`*`, `+`, `~`, `%`, format widths, replace,
#   join, center, indent, expandtabs, wordwrap, tojson indent, stringifying a nested list);
# - every result counts against the characters one render may create (TEMPLATE_MAX_PRODUCED);
# - the deadline is checked at each of those points and each loop step, and a watchdog interrupts
#   long pure-Python work inside one filter (textwrap, unique, urlize) at the deadline;
# - calls nest at most TEMPLATE_MAX_CALL_DEPTH deep (a recursive macro is an error, not a RecursionError).

_TEMPLATE_WIDTH_LIMIT = limits.TEMPLATE_MAX_WIDTH


class _RenderTimeout(Exception):
    """Raised inside the rendering thread by the watchdog (see _Watchdog)."""


def _refused(msg: str) -> jinja2.exceptions.SecurityError:
    return jinja2.exceptions.SecurityError(msg)


def _too_big(what: str) -> jinja2.exceptions.SecurityError:
    return _refused(f"{what} would exceed the {limits.TEMPLATE_MAX_OUTPUT}-character limit of a rendered template")


class _RenderBudget:
    """Loop steps, characters created, call depth and wall time of one render."""

    def __init__(self):
        self.steps = 0
        self.produced = 0
        self.depth = 0
        self.deadline = time.monotonic() + limits.TEMPLATE_MAX_SECONDS

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise _refused(f"rendering took longer than {limits.TEMPLATE_MAX_SECONDS:g} s (a runaway template?)")

    def charge(self, n: int) -> None:
        self.produced += n
        if self.produced > limits.TEMPLATE_MAX_PRODUCED:
            raise _refused(
                f"the template created more than {limits.TEMPLATE_MAX_PRODUCED} characters of values "
                "(a runaway template?)"
            )
        self.check_time()

    def loop(self, iterable):
        for item in iterable:
            self.steps += 1
            if self.steps > limits.TEMPLATE_MAX_LOOP_STEPS:
                raise _refused(f"the template ran more than {limits.TEMPLATE_MAX_LOOP_STEPS} loop iterations")
            self.check_time()
            yield item

    def concat(self, *parts):
        # `a ~ b`: jinja's Concat node, rewritten into a call so its size can be checked first
        for p in parts:
            _check_text_size(p, "~")
        strs = [p if isinstance(p, str) else str(p) for p in parts]
        if sum(len(p) for p in strs) > limits.TEMPLATE_MAX_OUTPUT:
            raise _too_big("~")
        return _check_size("".join(strs), "~")

    @staticmethod
    def compare(value):
        # each operand of a comparison: comparing nested lists of huge strings is unbounded C work
        _check_text_size(value, "a comparison")
        return value


_BUDGET: contextvars.ContextVar[_RenderBudget | None] = contextvars.ContextVar("qora_render_budget", default=None)


def _budget() -> _RenderBudget | None:
    return _BUDGET.get()


def _size(v) -> int:
    return len(v) if isinstance(v, (str, list, tuple, dict)) else 0


def _cost(v) -> int:
    # what a value counts against TEMPLATE_MAX_PRODUCED: a character each, an element of a list or
    # dict as much as the ~64 bytes a small Python object costs
    return len(v) if isinstance(v, str) else len(v) * 16 if isinstance(v, (list, tuple, dict)) else 0


def _check_size(v, what: str = "a value"):
    """A result: its size against the one-value limit, and against what the render may create."""
    n = _size(v)
    if n > limits.TEMPLATE_MAX_OUTPUT:
        raise _too_big(what)
    b = _budget()
    if b is not None:
        b.charge(_cost(v))
    return v


_DICT_VIEWS = (type({}.keys()), type({}.values()), type({}.items()))


def _text_size(v, limit: int, indent: int = 0, sep: int = 2) -> int:
    """An upper bound on the characters str(), repr() or json.dumps(indent=indent) make of `v`, computed
    only until it passes `limit` (a list holding a huge string a million times is found at once).
    Escapes: printable ASCII may double (backslashes, quotes), anything else up to 12 characters each.

    A container referenced twice is printed twice, so it counts in full every time: `[x, x]` doubled
    20 times is a few dozen objects but a million characters of text. Each container's full size is
    computed once (memo by id, and by depth when indenting) and added at every reference; only a
    container on the current path (a cycle, which str() prints as `[...]`) counts as a few characters."""
    total = 0
    memo: dict[tuple[int, int], int] = {}
    on_path: set[int] = set()
    # frames: (iterator over the items, depth, id of the container or None, total when it was entered);
    # iterators, so a long list is never copied
    stack = [(iter((v,)), 0, None, 0)]
    while stack:
        it, depth, cid, start = stack[-1]
        x = next(it, stack)
        if x is stack:
            stack.pop()
            if cid is not None:
                on_path.discard(cid)
                memo[(cid, depth if indent else 0)] = total - start
            continue
        if isinstance(x, str):
            total += len(x) * (2 if x.isascii() and x.isprintable() else 12) + 2
        elif isinstance(x, bool) or x is None:
            total += 5
        elif isinstance(x, int):
            total += x.bit_length() // 3 + 2
        elif isinstance(x, (float, range)):
            total += 32
        elif isinstance(x, (list, tuple, dict, jinja2.utils.Namespace, *_DICT_VIEWS)):
            key = (id(x), depth + 1 if indent else 0)
            if id(x) in on_path:
                total += 8  # a cycle: str() prints [...], json.dumps refuses it
            elif key in memo:
                total += memo[key]
            else:
                start = total
                items = x._Namespace__attrs if isinstance(x, jinja2.utils.Namespace) else x
                # brackets, each item's separator and (indenting) its line, and the closing bracket's line
                total += 16 + len(items) * (sep + (indent * (depth + 1) + 1 if indent else 0))
                total += indent * depth + 1 if indent else 0
                if isinstance(items, dict):
                    flat = (kv for pair in items.items() for kv in pair)
                elif isinstance(items, type({}.items())):
                    flat = (kv for pair in items for kv in pair)
                else:
                    flat = iter(items)
                on_path.add(id(x))
                stack.append((flat, depth + 1, id(x), start))
        else:
            total += 64  # macros, undefined values, loop objects: a short repr
        if total > limit:
            return total
    return total


def _check_text_size(v, what: str) -> None:
    """Refuse a value whose text (str(), as output, `~`, `%s`, `|string`) would be too large, before it is made."""
    if isinstance(v, str):
        if len(v) > limits.TEMPLATE_MAX_OUTPUT:
            raise _too_big(what)
    elif not isinstance(v, (int, float, bool)) and v is not None:
        if _text_size(v, limits.TEMPLATE_MAX_OUTPUT) > limits.TEMPLATE_MAX_OUTPUT:
            raise _too_big(what)


def _check_width(n, what: str) -> None:
    if isinstance(n, int) and not isinstance(n, bool) and abs(n) > _TEMPLATE_WIDTH_LIMIT:
        raise _refused(f"{what} {n} is larger than {_TEMPLATE_WIDTH_LIMIT}")


def _printf_size(fmt: str, args) -> int:
    """An upper bound on the length of `fmt % args`, refusing any width or precision over the limit."""
    args = args if isinstance(args, tuple) else (args,)
    total = len(fmt)
    for spec in re.findall(r"%[-+ #0]*(\*|\d*)(?:\.(\*|\d*))?", fmt):
        for num in spec:
            if num and num != "*" and (len(num) > 6 or int(num) > _TEMPLATE_WIDTH_LIMIT):
                raise _refused(f"format width {num} is too large")
            if num and num != "*":
                total += int(num)
    for a in args:
        if isinstance(a, Mapping) and len(args) == 1:  # '%(name)s' % dict
            total += _text_size(a, limits.TEMPLATE_MAX_OUTPUT)
        elif isinstance(a, int) and not isinstance(a, bool):
            _check_width(a, "format argument")
            total += abs(a) + 32  # a `*` width, or the number itself
        else:
            total += _text_size(a, limits.TEMPLATE_MAX_OUTPUT)
    return total


def _check_printf(fmt: str, args) -> None:
    if _printf_size(fmt, args) > limits.TEMPLATE_MAX_OUTPUT:
        raise _too_big("%-formatting")


def _check_str_format(fmt: str, args, kwargs) -> None:
    """str.format / format_map: every field's spec, nested `{}` fields resolved first, within the
    width limit; the arguments' text within the output limit."""
    try:
        parts = list(_string.formatter_parser(fmt))
    except ValueError:
        return  # str.format will raise the same error itself
    total = len(fmt)
    for _, field, spec, _ in parts:
        spec = spec or ""
        if "{" in spec:  # a nested field: '{0:{1}}' takes its width from an argument
            try:
                nested = [n for _, n, _, _ in _string.formatter_parser(spec) if n is not None]
            except ValueError:
                return
            if len(parts) * len(nested) > 1024:
                raise _refused("too many nested format fields")
            for a in (*args, *kwargs.values()):
                _check_width(a, "format argument")
                if isinstance(a, str) and len(a) > 16:
                    raise _refused("a nested format spec taken from a long string")
            try:
                spec = spec.format(*args, **kwargs)
            except Exception:
                return  # str.format will raise the same error itself
        for num in re.findall(r"\d+", spec):
            if len(num) > 6 or int(num) > _TEMPLATE_WIDTH_LIMIT:
                raise _refused(f"format width {num} is too large")
            total += int(num)
        if field is not None:
            total += 32
    for a in (*args, *kwargs.values()):
        total += len(parts) * _text_size(a, limits.TEMPLATE_MAX_OUTPUT) if not isinstance(a, (int, float)) else 0
        if total > limits.TEMPLATE_MAX_OUTPUT:
            raise _too_big("str.format")


def _check_join(sep, items) -> None:
    if isinstance(items, (list, tuple, str)):
        if len(items) > limits.TEMPLATE_MAX_OUTPUT:
            raise _too_big("join")
        total = len(sep) * max(len(items) - 1, 0)
        for x in items:
            total += len(x) if isinstance(x, str) else _text_size(x, limits.TEMPLATE_MAX_OUTPUT)
            if total > limits.TEMPLATE_MAX_OUTPUT:
                raise _too_big("join")


def _check_replace(s, old, new, count=-1) -> None:
    if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
        hits = s.count(old) if old else len(s) + 1
        if isinstance(count, int) and count >= 0:
            hits = min(hits, count)
        if len(s) + hits * max(len(new) - len(old), 0) > limits.TEMPLATE_MAX_OUTPUT:
            raise _too_big("replace")


def _check_str_method(obj, args, kwargs) -> None:
    """Pre-checks for the str methods that can grow a string by a large factor in one call."""
    name = getattr(obj, "__name__", "")
    target = getattr(obj, "__self__", None)
    if not isinstance(target, str):
        return
    if name == "join" and args:  # (format and format_map: _StrictSandbox.wrap_str_format)
        _check_join(target, args[0])
    elif name == "replace" and len(args) >= 2:
        _check_replace(target, args[0], args[1], args[2] if len(args) > 2 else kwargs.get("count", -1))
    elif name in ("center", "ljust", "rjust", "zfill"):
        for a in (*args, *kwargs.values()):
            _check_width(a, f"str.{name} width")
            if isinstance(a, str) and len(a) > 1:
                return  # the fill must be one character: str raises
    elif name == "expandtabs":
        size = next((a for a in (*args, *kwargs.values()) if isinstance(a, int)), 8)
        _check_width(size, "tab size")
        if len(target) + target.count("\t") * max(size, 0) > limits.TEMPLATE_MAX_OUTPUT:
            raise _too_big("expandtabs")


def _filter_value_and_rest(args, kwargs):
    # Filters with a pass_context/environment marker get that object first; the value follows.
    values = [
        a for a in args if not isinstance(a, (jinja2.runtime.Context, jinja2.Environment, jinja2.nodes.EvalContext))
    ]
    return values, list(kwargs.values())


# Filters that neither stringify nor compare their whole argument (O(1) or one pass over references).
_CHEAP_FILTERS = frozenset(
    "length count first last default d attr list reverse batch slice select reject selectattr rejectattr map "
    "items random abs int float bool safe round filesizeformat defined undefined none boolean false true "
    "integer number string_test mapping iterable callable sequence sameas odd even divisibleby".split()
)
# Filters that run Python code per word or per match: their input is bounded more tightly.
_SLOW_FILTERS = frozenset({"wordwrap", "title", "urlize", "wordcount", "striptags", "truncate"})


def _guard_filter(name: str, f):
    """Wrap a jinja filter (or test) with the size pre-checks above and a size check of its result."""

    @functools.wraps(f)
    def guarded(*args, **kwargs):
        values, kw = _filter_value_and_rest(args, kwargs)
        b = _budget()
        if b is not None:
            b.check_time()
        if name not in _CHEAP_FILTERS:  # the others may stringify, sort or compare what they are given
            for a in values + kw:
                _check_text_size(a, f"the {name} filter's argument")
        if values:
            value, rest = values[0], values[1:] + kw
            if name in (
                "center",
                "indent",
                "wordwrap",
                "truncate",
                "tojson",
                "batch",
                "slice",
                "round",
                "filesizeformat",
            ):
                for a in rest:
                    _check_width(a, f"{name} argument")
            if name == "indent" and isinstance(value, str):
                width = next((a for a in rest if not isinstance(a, bool)), 4)
                width = len(width) if isinstance(width, str) else abs(width) if isinstance(width, int) else 4
                if len(value) + (value.count("\n") + 1) * width > limits.TEMPLATE_MAX_OUTPUT:
                    raise _too_big("indent")
            if name in _SLOW_FILTERS and isinstance(value, str) and len(value) > limits.TEMPLATE_MAX_SLOW_FILTER:
                raise _refused(f"the {name} filter on more than {limits.TEMPLATE_MAX_SLOW_FILTER} characters")
            if name == "wordwrap":
                text = value if isinstance(value, str) else ""
                width = next((a for a in rest if isinstance(a, int) and not isinstance(a, bool)), 79)
                wrap = next((a for a in rest if isinstance(a, str)), "\n")
                if len(text) + (len(text) // max(width, 1) + 1) * len(wrap) > limits.TEMPLATE_MAX_OUTPUT:
                    raise _too_big("wordwrap")
            elif name == "replace" and len(rest) >= 2:
                _check_replace(value, rest[0], rest[1], rest[2] if len(rest) > 2 else -1)
            elif name == "join":
                _check_join(rest[0] if rest and isinstance(rest[0], str) else "", value)
            elif name == "format" and isinstance(value, str):
                _check_printf(value, tuple(rest) if rest else ())
            elif name == "center" and isinstance(value, str):
                width = next((a for a in rest if isinstance(a, int)), 80)
                if max(len(value), width) > limits.TEMPLATE_MAX_OUTPUT:
                    raise _too_big("center")
            elif name == "tojson":
                indent = kwargs.get("indent", rest[1] if len(rest) > 1 else None)
                seps = kwargs.get("separators") or (", ", ": ")
                width = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
                _check_width(width, "tojson indent")
                sep = sum(len(s) for s in seps if isinstance(s, str)) if isinstance(seps, (list, tuple)) else 2
                if (
                    _text_size(value, limits.TEMPLATE_MAX_OUTPUT, indent=max(width, 0), sep=sep)
                    > limits.TEMPLATE_MAX_OUTPUT
                ):
                    raise _too_big("tojson")
        return _check_size(f(*args, **kwargs), f"the {name} filter's result")

    return guarded


def _finalize(value):
    """Every `{{ expression }}` output passes here before jinja turns it into text."""
    _check_text_size(value, "an output value")
    return value


_LOOP_NAME, _CONCAT_NAME, _CMP_NAME, _SIZE_FILTER = "__qora_loop", "__qora_concat", "__qora_cmp", "__qora_size"


class _BudgetRewriter(jinja2.visitor.NodeTransformer):
    """Route every `for` through _RenderBudget.loop, every `~` through _RenderBudget.concat, every
    comparison's operands through _RenderBudget.compare and every `{% set x %}...{% endset %}` block
    through a size check."""

    def visit_Name(self, node):
        if node.name.startswith("__qora"):
            raise jinja2.exceptions.SecurityError(f"the name {node.name!r} is reserved")
        return node

    def visit_Filter(self, node):
        if node.name.startswith("__qora"):
            raise jinja2.exceptions.SecurityError(f"the name {node.name!r} is reserved")
        return self.generic_visit(node)

    def visit_For(self, node):
        node = self.generic_visit(node)
        node.iter = jinja2.nodes.Call(
            jinja2.nodes.Name(_LOOP_NAME, "load"), [node.iter], [], None, None, lineno=node.lineno
        )
        return node

    def visit_Concat(self, node):
        node = self.generic_visit(node)
        name = jinja2.nodes.Name(_CONCAT_NAME, "load")
        return jinja2.nodes.Call(name, node.nodes, [], None, None, lineno=node.lineno)

    def _checked(self, expr):
        return jinja2.nodes.Call(jinja2.nodes.Name(_CMP_NAME, "load"), [expr], [], None, None, lineno=expr.lineno)

    def visit_Compare(self, node):
        node = self.generic_visit(node)
        node.expr = self._checked(node.expr)
        for op in node.ops:
            op.expr = self._checked(op.expr)
        return node

    def visit_AssignBlock(self, node):
        node = self.generic_visit(node)
        node.filter = jinja2.nodes.Filter(node.filter, _SIZE_FILTER, [], [], None, None, lineno=node.lineno)
        return node


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, but reaching for an unsafe attribute (`''.__class__`) fails at once.

    jinja2 would return an undefined value that only fails when used further, so `{{ x.__class__ }}`
    would silently print nothing; a template doing that is hostile or broken, and we say so.
    Operators, calls and filters that can make a value huge are checked before they run.
    """

    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def unsafe_undefined(self, obj, attribute):
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    def _parse(self, source, name, filename):
        return _BudgetRewriter().visit(super()._parse(source, name, filename))

    def wrap_str_format(self, value):
        # jinja hands templates its own wrapper of str.format / format_map: check before it formats
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        target, name = value.__self__, value.__name__

        def checked(*args, **kwargs):
            if name == "format_map":
                _check_str_format(target, (), args[0] if len(args) == 1 and isinstance(args[0], Mapping) else {})
            else:
                _check_str_format(target, args, kwargs)
            return wrapped(*args, **kwargs)

        return checked

    def getattr(self, obj, attribute):
        b = _budget()
        if b is not None:
            b.check_time()
        return super().getattr(obj, attribute)

    def call_binop(self, context, operator, left, right):
        seqs = (str, list, tuple)
        if operator == "*":
            for a, b in ((left, right), (right, left)):
                if isinstance(a, seqs) and isinstance(b, int) and len(a) * max(b, 0) > limits.TEMPLATE_MAX_OUTPUT:
                    raise _too_big("*")
            if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > 1 << 16:
                raise jinja2.exceptions.SecurityError("integer product too large")
        elif operator == "+":
            if isinstance(left, seqs) and isinstance(right, seqs):
                if len(left) + len(right) > limits.TEMPLATE_MAX_OUTPUT:
                    raise _too_big("+")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
                if right > limits.TEMPLATE_MAX_POWER or left.bit_length() * right > 1 << 16:
                    raise jinja2.exceptions.SecurityError(
                        f"exponent {right} is too large for a {left.bit_length()}-bit number"
                    )
        elif operator == "%" and isinstance(left, str):
            _check_printf(left, right)
        return _check_size(super().call_binop(context, operator, left, right), f"the result of {operator}")

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        b = _budget()
        if b is not None:
            b.check_time()
        target = getattr(__obj, "__self__", None)
        for a in (*args, *kwargs.values(), *((target,) if isinstance(target, (list, tuple, dict)) else ())):
            _check_text_size(a, "a call's argument")
        _check_str_method(__obj, args, kwargs)
        if b is None:
            return _check_size(super().call(__context, __obj, *args, **kwargs), "a call's result")
        b.depth += 1
        try:
            if b.depth > limits.TEMPLATE_MAX_CALL_DEPTH:
                raise _refused(f"calls nested more than {limits.TEMPLATE_MAX_CALL_DEPTH} deep (a recursive macro?)")
            return _check_size(super().call(__context, __obj, *args, **kwargs), "a call's result")
        finally:
            b.depth -= 1


def _raise_exception(message):
    message = str(message)
    raise jinja2.exceptions.TemplateError(message if len(message) <= 500 else message[:500] + "...")


def _strftime(now: _dt.datetime, fmt) -> str:
    if not isinstance(fmt, str) or len(fmt) > 256:
        raise _refused("strftime_now takes a format string of at most 256 characters")
    return now.strftime(fmt)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' override: jinja's own tojson HTML-escapes (<, >, &, '), which would change prompts.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _plain(value: Any, hold=None) -> Any:
    """A copy of `value` made only of JSON-like types, so templates never touch caller objects' methods.
    hold (a _Quarantine): applied to every string but ModelText, keys included."""
    if value is None or type(value) in (int, float, bool):
        return value
    if type(value) is str:
        return hold(value) if hold else value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, ModelText):
        return str.__str__(value)
    if isinstance(value, str):
        value = str.__str__(value)
        return hold(value) if hold else value
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k, hold): _plain(v, hold) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, hold) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name), hold) for f in dataclasses.fields(value)}
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        try:
            return _plain(value.item(), hold)
        except Exception:
            pass
    return f"<{type(value).__name__}>"


def _as_datetime(today: Any) -> _dt.datetime:
    if today is None:
        return _dt.datetime.now()
    if isinstance(today, _dt.datetime):
        return today
    if isinstance(today, _dt.date):
        return _dt.datetime(today.year, today.month, today.day)
    if isinstance(today, str):
        try:
            return _dt.datetime.fromisoformat(today)
        except ValueError:
            pass
        for fmt in ("%d %B %Y", "%B %d, %Y", "%d %b %Y"):  # "05 March 2025", as templates print it
            try:
                return _dt.datetime.strptime(today, fmt)
            except ValueError:
                pass
        raise QoraError(f"chat template: date {today!r} not understood (use YYYY-MM-DD)")
    raise QoraError(f"chat template: date must be a datetime, date or ISO string, not {type(today).__name__}")


def check_template_source(source, where="chat template") -> None:
    """Refuse a template source over TEMPLATE_MAX_SOURCE characters (compiling is ~8 µs a character)."""
    if isinstance(source, str) and len(source) > limits.TEMPLATE_MAX_SOURCE:
        raise FormatError(
            f"{where}: chat template of {len(source)} characters is over the "
            f"{limits.TEMPLATE_MAX_SOURCE}-character limit"
        )


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the sandbox, within the source-size limit and the render deadline
    (the watchdog interrupts the compiler's Python parts); a syntax error becomes a QoraError."""
    env = _StrictSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols], finalize=_finalize
    )
    env.filters["tojson"] = _tojson
    env.filters = {name: _guard_filter(name, f) for name, f in env.filters.items()}
    env.filters[_SIZE_FILTER] = lambda value: _check_size(value, "a {% set %} block")
    env.tests = {name: _guard_filter(name, f) for name, f in env.tests.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    # strftime_now is bound per render (so tests can pin the date); this default keeps compile-only use valid.
    env.globals["strftime_now"] = lambda fmt: _strftime(_dt.datetime.now(), fmt)
    if not isinstance(source, str):
        raise QoraError(f"chat template must be a string, not {type(source).__name__}")
    check_template_source(source)
    try:
        with _Watchdog(limits.TEMPLATE_MAX_SECONDS):
            return env.from_string(source)
    except _RenderTimeout:
        raise FormatError(
            f"chat template: compiling took longer than {limits.TEMPLATE_MAX_SECONDS:g} s "
            f"({len(source)} characters; a runaway template?)"
        ) from None
    except jinja2.TemplateSyntaxError as e:
        raise QoraError(f"chat template: syntax error on line {e.lineno}: {e.message}") from None
    except jinja2.exceptions.SecurityError as e:
        raise QoraError(f"chat template refused: {e}") from None
    except RecursionError:
        raise QoraError("chat template: nested too deeply to compile") from None
    except Exception as e:  # the compiler on a pathological template (e.g. an operand too large)
        raise QoraError(f"chat template cannot be compiled: {type(e).__name__}: {e}") from None


class _Watchdog:
    """Interrupts the rendering thread at the deadline, for work the checks above cannot see into
    (one filter running pure-Python code for a long time: textwrap, unique, urlize). The exception is
    delivered at the next bytecode boundary of that thread (CPython's PyThreadState_SetAsyncExc), only
    while the render runs: leaving clears one still pending. Where it lands in code whose exceptions
    Python ignores (a weakref callback, a __del__), it is lost: so it is sent again every
    REPEAT_SECONDS until the work ends. Long C calls are bounded by the size checks instead."""

    _set_async_exc = getattr(getattr(ctypes, "pythonapi", None), "PyThreadState_SetAsyncExc", None)
    REPEAT_SECONDS = 0.05

    def __init__(self, seconds: float):
        self._lock = threading.Lock()
        self._thread = threading.get_ident()
        self._active = True
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        with self._lock:
            if self._active and self._set_async_exc is not None:
                self._set_async_exc(ctypes.c_ulong(self._thread), ctypes.py_object(_RenderTimeout))
                self._timer = threading.Timer(self.REPEAT_SECONDS, self._fire)
                self._timer.daemon = True
                self._timer.start()

    def __enter__(self):
        if self._set_async_exc is not None:
            self._timer.start()
        return self

    def __exit__(self, *exc):
        with self._lock:
            self._active = False
            self._timer.cancel()
            if self._set_async_exc is not None:
                self._set_async_exc(ctypes.c_ulong(self._thread), None)  # one fired but not yet delivered
        return False


def render_chat_template(template: jinja2.Template, context: dict) -> str:
    """Render with the resource bounds above: loop steps, characters created, call depth, deadline
    (checked throughout, and a watchdog), output size."""
    budget = _RenderBudget()
    context = dict(context)
    context[_LOOP_NAME] = budget.loop
    context[_CONCAT_NAME] = budget.concat
    context[_CMP_NAME] = budget.compare
    token = _BUDGET.set(budget)
    out, size = [], 0
    try:
        with _Watchdog(limits.TEMPLATE_MAX_SECONDS):
            for piece in template.generate(**context):
                size += len(piece)
                if size > limits.TEMPLATE_MAX_OUTPUT:
                    raise _too_big("the rendered prompt")
                out.append(piece)
                budget.check_time()
    except _RenderTimeout:
        raise _refused(f"rendering took longer than {limits.TEMPLATE_MAX_SECONDS:g} s (a runaway template?)") from None
    finally:
        _BUDGET.reset(token)
    return "".join(out)


# ───── Tokenizer ─────


class Tokenizer:
    """A model's tokenizer: text <-> ids, its special tokens, and its chat template.

    tokenizer_json: the content of a HF tokenizer.json; chat_template: Jinja source or None (plain
    ChatML is used then); special_tokens: the .qora header's dict (bos, eos list, pad, im_start,
    im_end, think, end_think ids; missing entries are looked up by their usual spelling).
    """

    def __init__(
        self,
        tokenizer_json: str,
        chat_template: str | None = None,
        special_tokens: dict | None = None,
        where: str = "model file",
        loaded: tuple | None = None,
    ):
        if not isinstance(tokenizer_json, str):
            raise QoraError(f"{where}: tokenizer.json could not be read: expected its text")
        # loaded: what load_checked_tokenizer made of this very text already (a GGUF's parse needs the
        # tokenizer for its special tokens; checking and loading 128K tokens again cost ~0.3 s of a load)
        if loaded is None or loaded[2] is not tokenizer_json:
            loaded = load_checked_tokenizer(tokenizer_json, where)
        self._tok, growth = loaded[0], loaded[1]
        # the longest text one encode takes: tokenizers' working memory grows with the normalized text
        self.max_input_chars = int(min(limits.TOKENIZER_MAX_INPUT, limits.TOKENIZER_MAX_WORK / max(growth, 1.0)))
        self.chat_template = chat_template
        self._template: jinja2.Template | None = None
        self._added_map: dict[str, int] | None = None
        self._added_re: re.Pattern | None = None
        self._plain_hf: _HFTokenizer | None = None
        st = dict(special_tokens or {})
        n = self.vocab_size

        def valid(i):
            return i is not None and 0 <= int(i) < n

        def pick(key):
            i = st.get(key)
            if valid(i):
                return int(i)
            return self.token_to_id(_SPECIAL_STRINGS[key])

        self.im_start_id: int | None = pick("im_start")
        self.im_end_id: int | None = pick("im_end")
        self.think_id: int | None = pick("think")
        self.end_think_id: int | None = pick("end_think")
        self.bos_id: int | None = int(st["bos"]) if valid(st.get("bos")) else None
        self.pad_id: int | None = int(st["pad"]) if valid(st.get("pad")) else None
        eos = st.get("eos")
        if eos is None or eos == []:
            eos = [i for i in (self.token_to_id(s) for s in _EOS_STRINGS) if i is not None][:1]
        elif isinstance(eos, int):
            eos = [eos]
        self.eos_ids: list[int] = [int(i) for i in eos if valid(i)]
        # Ids that end generation: every EOS, the end of a chat turn, and any end-of-turn spelling the
        # chat template writes (a GGUF may name another token as EOS: SmolLM2's files say <|im_start|>
        # in some conversions; a turn must end where the template ends it, whatever the metadata says)
        turn_ends = {self.token_to_id(s) for s in _EOS_STRINGS if chat_template and s in chat_template}
        self.stop_ids: frozenset[int] = frozenset(self.eos_ids) | {
            i for i in (self.im_end_id, *turn_ends) if i is not None and valid(i)
        }

    @classmethod
    def from_qora(cls, qfile) -> Tokenizer:
        """Build from an open QoraFile (its tokenizer_json, chat_template and special_tokens)."""
        return cls(qfile.tokenizer_json, qfile.chat_template, qfile.special_tokens)

    # ── vocabulary ──

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def id_limit(self) -> int:
        """One more than the largest id the tokenizer can produce (ids may be sparse, so this can
        exceed vocab_size): the engine's embedding must have at least this many rows."""
        vocab = self._tok.get_vocab(with_added_tokens=True)
        return max(vocab.values(), default=-1) + 1

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    @property
    def bos_token(self) -> str | None:
        return self.id_to_token(self.bos_id) if self.bos_id is not None else None

    @property
    def eos_token(self) -> str | None:
        return self.id_to_token(self.eos_ids[0]) if self.eos_ids else None

    @property
    def pad_token(self) -> str | None:
        return self.id_to_token(self.pad_id) if self.pad_id is not None else None

    @property
    def special_ids(self) -> frozenset[int]:
        """Control tokens qora handles itself: turn markers, think tags, BOS/EOS/PAD."""
        ids = {self.im_start_id, self.im_end_id, self.think_id, self.end_think_id, self.bos_id, self.pad_id}
        return frozenset(i for i in ids if i is not None) | self.stop_ids

    # ── text <-> ids ──

    def encode(self, text: str, add_special_tokens: bool = False, parse_special: bool = True) -> list[int]:
        """Token ids of `text`, a raw document.

        parse_special=True (raw prompts, `--raw`): special and added tokens written in the text
        (`<|im_start|>`) become their control-token ids, on purpose. parse_special=False: the text is
        plain text whatever it spells. add_special_tokens=True also applies the tokenizer's
        post-processor (e.g. a BOS prefix). Chat messages go through `encode_chat`, never this."""
        if not isinstance(text, str):
            raise QoraError(f"encode() takes a str, not {type(text).__name__}")
        self.check_length(len(text))
        if not parse_special:
            ids = self._encode_plain(text)
            if add_special_tokens:  # the post-processor's own tokens (e.g. a BOS) around the plain text
                enc = _rust_call("encode", self._plain_tok().encode, text, add_special_tokens=False)
                if enc.ids == ids:
                    ids = _rust_call("encode", self._tok.post_process, enc, add_special_tokens=True).ids
            return ids
        return _rust_call("encode", self._tok.encode, text, add_special_tokens=add_special_tokens).ids

    def check_length(self, n_chars: int) -> None:
        """Refuse (ContextOverflowError) a text of n_chars before it is tokenized when it is longer than
        one encode may take (max_input_chars: TOKENIZER_MAX_INPUT, less for a tokenizer whose normalizer
        can grow text). Callers that know the context check it against that first (a prompt far longer
        than the context is refused by qora.generate.check_prompt_size)."""
        if n_chars > self.max_input_chars:
            raise ContextOverflowError(
                f"the text is {n_chars} characters, more than the {self.max_input_chars} one tokenization may take: "
                "far beyond any context"
            )

    # ── caller text as plain text (see _Quarantine) ──

    def _added(self) -> dict[str, int]:
        """Spelling -> id of every added token (special or not)."""
        if self._added_map is None:
            decoder = _rust_call("reading added tokens", self._tok.get_added_tokens_decoder)
            self._added_map = {t.content: int(i) for i, t in decoder.items() if t.content}
        return self._added_map

    def _added_pattern(self) -> re.Pattern:
        if self._added_re is None:
            # Longest spelling first, so `<|im_end|>` wins over a shorter token it starts with.
            names = sorted(self._added(), key=len, reverse=True)
            alts = [re.escape(n) for n in names] + [f"[{_PH_CHARS}]"]
            self._added_re = re.compile("|".join(alts))
        return self._added_re

    def _plain_tok(self) -> _HFTokenizer:
        """The same tokenizer without its added tokens (nor post-processor): text in, text tokens out."""
        if self._plain_hf is None:
            spec = json.loads(_rust_call("serializing", self._tok.to_str))
            spec["added_tokens"] = []
            spec["post_processor"] = spec["padding"] = spec["truncation"] = None
            self._plain_hf = load_hf_tokenizer(json.dumps(spec), "tokenizer", check=False)
        return self._plain_hf

    def _encode_plain(self, text: str) -> list[int]:
        """`text` as plain text: no added-token matching; should the model's merges still spell an
        added token, that part is tokenized a character at a time."""
        if not text:
            return []
        added = set(self._added().values())
        ids = _rust_call("encode", self._plain_tok().encode, text, add_special_tokens=False).ids
        if added.isdisjoint(ids):
            return ids
        out: list[int] = []
        for ch in text:
            piece = _rust_call("encode", self._plain_tok().encode, ch, add_special_tokens=False).ids
            if not added.isdisjoint(piece):
                raise QoraError(f"tokenizer: the character {ch!r} only tokenizes as a control token")
            out += piece
        return out

    def _encode_template(self, text: str) -> list[int]:
        """Rendered template text holding no caller-written token spelling: encoded as the model's
        tokenizer does. Every added-token id must come from its exact spelling in `text`; a match made
        any other way (a normalizer mapping look-alike characters onto a token) is undone: then only
        exact spellings count and the rest is plain text."""
        enc = _rust_call("encode", self._tok.encode, text, add_special_tokens=False)
        added = self._added()
        names = {i: n for n, i in added.items()}
        exact = all(
            i not in names or text[s:e].strip() == names[i].strip()
            for i, (s, e) in zip(enc.ids, enc.offsets, strict=True)
        )
        if exact:
            return enc.ids
        out, pos = [], 0
        for m in self._added_pattern().finditer(text):
            if m.group() in added:
                out += self._encode_plain(text[pos : m.start()]) + [added[m.group()]]
                pos = m.end()
        return out + self._encode_plain(text[pos:])

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        n = self.vocab_size
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise QoraError(f"decode(): token id {bad[0]} is outside the vocabulary (size {n})")
        return _rust_call("decode", self._tok.decode, ids, skip_special_tokens=skip_special_tokens)

    def detokenizer(self, skip_special_tokens: bool = False) -> StreamingDetokenizer:
        return StreamingDetokenizer(self, skip_special_tokens=skip_special_tokens)

    # ── chat ──

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        today: _dt.date | _dt.datetime | str | None = None,
        tools: list | None = None,
        **kwargs: Any,
    ) -> str:
        """Render the model's chat template as transformers' `apply_chat_template(tokenize=False)` would.

        enable_thinking=None leaves it undefined so the template's own default applies; `today` pins the
        date `strftime_now` returns (tests, reproducible prompts). Extra keyword arguments are passed to
        the template as variables. Any template failure is a QoraError.

        This is the prompt as text, for people to read. Its token ids come from `encode_chat` (same
        arguments), not from encode() of this text: there, text written in a message stays text.
        """
        return self._render(messages, add_generation_prompt, enable_thinking, today, tools, kwargs, None)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], *args: Any, **kwargs: Any) -> list[int]:
        """Token ids of the rendered chat; the arguments are apply_chat_template's.

        Control tokens come only from the template's own markup (and BOS/EOS/PAD variables): a
        `<|im_end|>`, `<think>` or any other added token's spelling in a message, a role, a tool
        definition or an extra variable is tokenized as plain text, so a message cannot end its turn
        or forge another. `ModelText` contents (the model's own answers) keep their control tokens.
        A chat with no such spelling tokenizes exactly as encode(apply_chat_template(...))."""
        return self.encode_chat_checked(None, messages, *args, **kwargs)

    def encode_chat_checked(self, check, messages: Sequence[Mapping[str, Any]], *args: Any, **kwargs: Any) -> list[int]:
        """encode_chat, calling check(text) with the rendered chat (apply_chat_template's text) before
        tokenizing it: one render for a caller that must look at the text first (a size check)."""
        chat = _CHAT_ARGUMENTS.bind(self, messages, *args, **kwargs)
        chat.apply_defaults()
        a = chat.arguments
        hold = _Quarantine(self._added_pattern())
        text = self._render(
            a["messages"], a["add_generation_prompt"], a["enable_thinking"], a["today"], a["tools"], a["kwargs"], hold
        )
        pieces = hold.split(text)
        if check is not None:
            check("".join(piece for _, piece in pieces))
        self.check_length(len(text))
        ids: list[int] = []
        for plain, piece in pieces:
            ids += self._encode_plain(piece) if plain else self._encode_template(piece)
        return ids

    def _render(self, messages, add_generation_prompt, enable_thinking, today, tools, kwargs, hold) -> str:
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise QoraError("chat messages must be a list of {'role': ..., 'content': ...} dicts")
        for m in messages:
            if not isinstance(m, Mapping) or "role" not in m:
                raise QoraError(f"chat message {m!r} is not a dict with a 'role'")
        if self._template is None:
            self._template = compile_chat_template(self.chat_template or CHATML_TEMPLATE)
        now = _as_datetime(today)
        # The caller's variables are caller text; the tokenizer's own special-token strings are markup.
        context = _plain(dict(kwargs), hold)
        for name in ("bos_token", "eos_token", "pad_token"):
            value = getattr(self, name)
            if value is not None and name not in kwargs:
                context[name] = value
        if enable_thinking is not None:
            context["enable_thinking"] = bool(enable_thinking)
        # transformers drops None-valued message keys (many templates mishandle content=None).
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        context.update(
            messages=_plain(chat, hold),
            tools=_plain(tools, hold),
            documents=None,
            add_generation_prompt=bool(add_generation_prompt),
            strftime_now=functools.partial(_strftime, now),
        )
        try:
            return render_chat_template(self._template, context)
        except jinja2.exceptions.SecurityError as e:
            raise QoraError(f"chat template refused: {e}") from None
        except jinja2.TemplateError as e:
            raise QoraError(f"chat template error: {e}") from None
        except QoraError:
            raise
        except RecursionError:
            raise QoraError("chat template failed: recursion too deep") from None
        except MemoryError:
            raise QoraError("chat template failed: out of memory") from None
        except Exception as e:  # TypeError, KeyError, ... inside the template
            raise QoraError(f"chat template failed: {type(e).__name__}: {e}") from None


# apply_chat_template's parameters: encode_chat takes the very same ones without spelling them again
# (and shows them to help() and editors).
_CHAT_ARGUMENTS = inspect.signature(Tokenizer.apply_chat_template)
Tokenizer.encode_chat.__signature__ = _CHAT_ARGUMENTS.replace(return_annotation="list[int]")


# ───── streaming detokenizer ─────


class StreamingDetokenizer:
    """Token ids in, text pieces out, never splitting a UTF-8 character.

    It decodes a short window: the tokens since the last emitted piece plus the token(s) before them
    as context (so decoders that treat the first token specially, like SentencePiece's leading space,
    give the same text as decoding everything at once), and emits what the new tokens added. When the
    decoded text ends in U+FFFD the last token stopped mid-character: the piece is held back until the
    character completes. A character is at most 4 bytes, so once 4 held tokens still end in U+FFFD the
    bytes are invalid for good and are emitted as they decode.

    add(id) -> str (possibly ""), finalize() -> str (whatever was held back), text: all emitted so far.
    """

    MAX_HOLD = 4

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self.reset()

    def reset(self) -> None:
        self.tokens: list[int] = []
        self._prefix_offset = 0  # start of the context window
        self._read_offset = 0  # tokens before this index have been emitted
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_id: int) -> str:
        self.tokens.append(int(token_id))
        prefix = self._decode(self.tokens[self._prefix_offset : self._read_offset])
        full = self._decode(self.tokens[self._prefix_offset :])
        held = len(self.tokens) - self._read_offset
        if held < self.MAX_HOLD and (full.endswith(REPLACEMENT_CHAR) or len(full) <= len(prefix)):
            return ""  # mid-character, or nothing new yet (a token that decodes to no text)
        return self._advance(full[len(prefix) :])

    def _advance(self, piece: str) -> str:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.tokens)
        if piece:
            self._pieces.append(piece)
        return piece

    def finalize(self) -> str:
        """Flush held-back tokens (an incomplete character decodes as U+FFFD)."""
        if self._read_offset >= len(self.tokens):
            return ""
        prefix = self._decode(self.tokens[self._prefix_offset : self._read_offset])
        full = self._decode(self.tokens[self._prefix_offset :])
        return self._advance(full[len(prefix) :])
