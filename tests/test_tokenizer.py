"""Tokenizer, chat template (sandbox included) and streaming detokenizer."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from qora.errors import QoraError
from qora.tokenizer import CHATML_TEMPLATE, REPLACEMENT_CHAR, StreamingDetokenizer, Tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
SMOLLM3_TEMPLATE = Path(__file__).resolve().parents[2] / "shared" / "smollm3-3b" / "chat_template.jinja"
SPECIALS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|endoftext|>"]
TEXTS = [
    "Hello, world!",
    "naïve café — déjà vu",
    "数学は楽しい。你好，世界！",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇩🇰",
    "combining e\u0301 and Zalgo a\u0300\u0301\u0302",
    "tabs\tand\nnewlines\n\n  spaces  ",
    "€100 ≈ ¥15,000 ± 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


def byte_level_json(merges: list[tuple[str, str]] = (), use_regex: bool = True) -> str:
    """A byte-level BPE tokenizer (GPT-2 / Llama-3 style): 256 byte tokens, optional merges, specials."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok.to_str()


def byte_char(b: int) -> str:
    """The ByteLevel alphabet character standing for byte b (GPT-2's bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if b in printable:
        return chr(b)
    return chr(256 + [x for x in range(256) if x not in printable].index(b))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(byte_level_json(), None, {})


def stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    d = tokenizer.detokenizer()
    pieces = [d.add(i) for i in ids]
    pieces.append(d.finalize())
    return pieces


# ───── encode / decode ─────


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text


def test_special_tokens_are_parsed_and_found(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == tok.im_start_id == tok.token_to_id("<|im_start|>")
    assert ids[-1] == tok.im_end_id
    assert (tok.think_id, tok.end_think_id) == (tok.token_to_id("<think>"), tok.token_to_id("</think>"))
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>"
    # No EOS in the file: the usual spellings are looked up; the end of turn always stops.
    assert tok.eos_ids == [tok.im_end_id]
    assert tok.im_end_id in tok.stop_ids
    assert tok.vocab_size == 256 + len(SPECIALS)


def test_special_tokens_from_the_file_win():
    eot = 256 + SPECIALS.index("<|endoftext|>")
    t = Tokenizer(byte_level_json(), None, {"eos": [eot], "bos": None, "think": None, "im_end": 257})
    assert t.eos_ids == [eot]
    assert t.stop_ids == {eot, 257}
    assert t.eos_token == "<|endoftext|>"
    assert t.bos_token is None
    assert t.think_id == t.token_to_id("<think>")  # null in the file: looked up by its spelling


def test_the_templates_end_of_turn_stops_whatever_the_metadata_says():
    """The demo GGUF trap: metadata naming <|im_start|> as EOS; and no im_end entry at all (a
    template whose turns end with another spelling): the turn ends where the template ends it."""
    im_start, im_end = (256 + SPECIALS.index(s) for s in ("<|im_start|>", "<|im_end|>"))
    chatml = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    t = Tokenizer(byte_level_json(), chatml, {"eos": [im_start]})
    assert t.eos_ids == [im_start] and im_end in t.stop_ids
    eot = 256 + SPECIALS.index("<|endoftext|>")
    ends_with_eot = "{% for m in messages %}{{ m.content }}<|endoftext|>{% endfor %}"
    t = Tokenizer(byte_level_json(), ends_with_eot, {"eos": [im_start], "im_end": None})
    assert eot in t.stop_ids
    assert eot not in Tokenizer(byte_level_json(), chatml, {"eos": [im_start]}).stop_ids  # not written: not a stop


def test_bad_input_is_a_qora_error(tok):
    with pytest.raises(QoraError):
        Tokenizer("{not json", None, {})
    with pytest.raises(QoraError):
        tok.decode([tok.vocab_size])
    with pytest.raises(QoraError):
        tok.encode(b"bytes")


# ───── streaming detokenizer ─────


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_never_splits_a_character(tok, text):
    ids = tok.encode(text)  # one token per byte: every multi-byte character is split across tokens
    pieces = stream(tok, ids)
    assert "".join(pieces) == text
    for p in pieces:
        assert REPLACEMENT_CHAR not in p
        p.encode("utf-8")  # no lone surrogates either


def test_streaming_tokens_holding_half_characters():
    # Merges that make tokens ending mid-character: "x" + first byte of "€" (E2 82 AC), and the two
    # middle bytes of "😀" (F0 9F 98 80) together.
    e2, x82, xac = byte_char(0xE2), byte_char(0x82), byte_char(0xAC)
    x9f, x98 = byte_char(0x9F), byte_char(0x98)
    merges = [("x", e2), (x9f, x98)]
    t = Tokenizer(byte_level_json(merges, use_regex=False), None, {})  # no regex: merges cross "x€"
    text = "x€ 😀x€"
    ids = t.encode(text)
    assert t.token_to_id("x" + e2) in ids and t.token_to_id(x9f + x98) in ids
    assert ids[:3] == [t.token_to_id("x" + e2), t.token_to_id(x82), t.token_to_id(xac)]
    d = t.detokenizer()
    assert d.add(ids[0]) == ""  # "x" + half of "€": held back whole
    assert d.add(ids[1]) == ""
    assert d.add(ids[2]) == "x€"
    rest = [d.add(i) for i in ids[3:]] + [d.finalize()]
    assert "".join(rest) == " 😀x€"
    assert all(REPLACEMENT_CHAR not in p for p in rest)
    assert d.text == text


def test_streaming_emits_invalid_bytes_eventually(tok):
    # A lone continuation byte never completes: after MAX_HOLD tokens it is emitted as U+FFFD.
    lone = tok.token_to_id(byte_char(0x80))
    a = tok.encode("a")[0]
    d = tok.detokenizer()
    out = [d.add(i) for i in [a, lone]]
    assert out == ["a", ""]
    out = [d.add(a) for _ in range(StreamingDetokenizer.MAX_HOLD)]
    assert "".join(out) == REPLACEMENT_CHAR + "a" * StreamingDetokenizer.MAX_HOLD
    d2 = tok.detokenizer()
    d2.add(lone)
    assert d2.finalize() == REPLACEMENT_CHAR


def test_streaming_sentencepiece_spaces():
    # Metaspace decoders drop the leading space of the *first* token only: the stream must agree with
    # decoding everything at once.
    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "!": 3, "▁again": 4}
    hf = HFTokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    t = Tokenizer(hf.to_str(), None, {})
    ids = [1, 2, 3, 4, 3]
    pieces = stream(t, ids)
    assert "".join(pieces) == t.decode(ids) == "Hello world! again!"
    assert pieces[:2] == ["Hello", " world"]


def test_streaming_special_tokens(tok):
    ids = tok.encode("a<|im_end|>b")
    assert "".join(stream(tok, ids)) == "a<|im_end|>b"
    d = tok.detokenizer(skip_special_tokens=True)
    assert "".join([d.add(i) for i in ids] + [d.finalize()]) == "ab"


def test_fixture_tokenizer_streams_like_decode():
    paths = sorted(FIXTURES.glob("**/tokenizer.json"))
    if not paths:
        pytest.skip("no fixture tokenizer.json yet")
    for path in paths:
        t = Tokenizer(path.read_text(encoding="utf-8"), None, {})
        for text in TEXTS:
            ids = t.encode(text)
            pieces = stream(t, ids)
            assert "".join(pieces) == t.decode(ids), path
            assert all(REPLACEMENT_CHAR not in p for p in pieces) or REPLACEMENT_CHAR in t.decode(ids)


# ───── chat template ─────


def smollm3_template() -> str:
    for path in (FIXTURES / "smollm3" / "chat_template.jinja", SMOLLM3_TEMPLATE):
        if path.is_file():
            return path.read_text(encoding="utf-8")
    pytest.skip("no copy of the SmolLM3 chat template")


def test_chat_template_matches_transformers_fixture():
    # Cases rendered by transformers from the real SmolLM3 template with a frozen date, and the same
    # text tokenized by the tiny fixture tokenizer (made by tests/fixtures/make_fixtures.py).
    path = FIXTURES / "chat_template_cases.json"
    if not path.is_file():
        pytest.skip("tests/fixtures/chat_template_cases.json not generated yet")
    cases = json.loads(path.read_text(encoding="utf-8"))
    tiny = FIXTURES / "tokenizer.json"
    tokenizer_json = tiny.read_text(encoding="utf-8") if tiny.is_file() else byte_level_json()
    t = Tokenizer(tokenizer_json, smollm3_template(), {"eos": [396]} if tiny.is_file() else {})
    assert len(cases) >= 10
    for case in cases:
        kwargs = dict(case["kwargs"])
        add_generation_prompt = kwargs.pop("add_generation_prompt", False)
        got = t.apply_chat_template(
            case["messages"], add_generation_prompt=add_generation_prompt, today=case["today"], **kwargs
        )
        assert got == case["expected"], case["name"]
        if tiny.is_file() and "expected_ids_tiny" in case:
            assert t.encode(got) == case["expected_ids_tiny"], case["name"]
            assert t.decode(case["expected_ids_tiny"]) == case["expected"], case["name"]


def test_chat_template_matches_transformers_live():
    pytest.importorskip("jinja2")
    ctu = pytest.importorskip("transformers.utils.chat_template_utils")
    template = smollm3_template()
    t = Tokenizer(byte_level_json(), template, {})
    tools = [{"name": "get_weather", "description": "Weather in a city", "parameters": {"type": "object"}}]
    cases = [
        ([{"role": "user", "content": "hi"}], {}),
        ([{"role": "user", "content": "hi"}], {"enable_thinking": False}),
        ([{"role": "system", "content": "Be brief. /no_think"}, {"role": "user", "content": "hi"}], {}),
        ([{"role": "system", "content": "/think"}, {"role": "user", "content": "hi"}], {"enable_thinking": False}),
        ([{"role": "system", "content": "Pirate. /system_override"}, {"role": "user", "content": "hi"}], {}),
        (
            [
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "\n4"},
                {"role": "user", "content": "and 3+3?"},
            ],
            {"enable_thinking": False},
        ),
        ([{"role": "user", "content": "Weather in Copenhagen?"}], {"tools": tools}),
    ]
    for messages, kwargs in cases:
        kwargs = dict(kwargs)
        tools_arg = kwargs.pop("tools", None)
        rendered, _ = ctu.render_jinja_template(
            [messages], tools=tools_arg, chat_template=template, add_generation_prompt=True, **kwargs
        )
        assert t.apply_chat_template(messages, tools=tools_arg, **kwargs) == rendered[0], (messages, kwargs)


def test_smollm3_template_modes_and_date():
    t = Tokenizer(byte_level_json(), smollm3_template(), {})
    msgs = [{"role": "user", "content": "hi"}]
    think = t.apply_chat_template(msgs, today=datetime.date(2025, 7, 9))
    assert "Today Date: 09 July 2025\n" in think
    assert think == t.apply_chat_template(msgs, today="09 July 2025")  # the way the template prints it
    assert "Reasoning Mode: /think" in think
    assert think.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    no_think = t.apply_chat_template(msgs, enable_thinking=False, today="2025-07-09")
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n")
    sys_flag = t.apply_chat_template([{"role": "system", "content": "/no_think"}] + msgs, today="2025-07-09")
    assert sys_flag == no_think
    assert t.apply_chat_template(msgs, add_generation_prompt=False, today="2025-07-09").endswith("hi<|im_end|>\n")
    # The assistant turn sits inside {% generation %}: rendered as its body.
    hist = msgs + [{"role": "assistant", "content": "hello"}]
    assert "<|im_start|>assistant\nhello<|im_end|>\n" in t.apply_chat_template(hist, add_generation_prompt=False)


def test_chatml_fallback_and_transformers_extras():
    t = Tokenizer(byte_level_json(), None, {})
    assert t.chat_template is None
    out = t.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert out == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    assert CHATML_TEMPLATE
    src = (
        "{{ messages | tojson }}|{{ bos_token }}|{{ eos_token }}|{{ extra }}|{{ strftime_now('%Y-%m-%d') }}"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}|{{ m.role }}{% endfor %}"
        "{% set ns = namespace(n=0) %}{% set ns.n = ns.n + 1 %}|{{ ns.n }}|{{ dict(a=1) | tojson }}"
        "{% generation %}|gen{% endgeneration %}"
    )
    t = Tokenizer(byte_level_json(), src, {"eos": [257], "bos": 256})
    msgs = [{"role": "user", "content": "<b>&'x'</b> é"}, {"role": "assistant", "content": None}]
    out = t.apply_chat_template(msgs, extra="E", today=datetime.datetime(2024, 2, 29, 13, 0))
    # tojson does not HTML-escape and keeps non-ASCII; None-valued keys are dropped as transformers does.
    assert out == (
        '[{"role": "user", "content": "<b>&\'x\'</b> é"}, {"role": "assistant"}]'
        '|<|im_start|>|<|im_end|>|E|2024-02-29|user|1|{"a": 1}|gen'
    )


def test_template_errors_are_qora_errors():
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(QoraError, match="syntax error on line 1"):
        Tokenizer(byte_level_json(), "{% if %}", {}).apply_chat_template(msgs)
    with pytest.raises(QoraError, match="only user and assistant"):
        Tokenizer(byte_level_json(), "{{ raise_exception('only user and assistant') }}", {}).apply_chat_template(msgs)
    with pytest.raises(QoraError, match="ZeroDivisionError"):
        Tokenizer(byte_level_json(), "{{ 1 / 0 }}", {}).apply_chat_template(msgs)
    t = Tokenizer(byte_level_json(), None, {})
    with pytest.raises(QoraError):
        t.apply_chat_template("hi")
    with pytest.raises(QoraError):
        t.apply_chat_template([{"content": "no role"}])
    with pytest.raises(QoraError):
        t.apply_chat_template(msgs, today="July 9th")


ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__ }}",
    "{{ messages.__class__.__base__ }}",
    "{{ cycler.__init__.__globals__.os.system('touch {marker}') }}",
    "{{ joiner.__init__.__globals__['os'].popen('touch {marker}').read() }}",
    "{{ lipsum.__globals__['os'].system('touch {marker}') }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ raise_exception.__globals__['__builtins__']['open']('{marker}', 'w') }}",
    "{% set ns = namespace(_x=1) %}",
    "{% set ns = namespace() %}{% set ns._private = 1 %}",
    "{{ messages.append({'role': 'user'}) }}",
    "{{ messages[0].update({'content': 'changed'}) }}",
    "{{ dict.__call__.__globals__ }}",
]


@pytest.mark.parametrize("src", ESCAPES)
def test_sandbox_refuses_escapes(tmp_path, src):
    marker = tmp_path / "pwned"
    t = Tokenizer(byte_level_json(), src.replace("{marker}", str(marker)), {})
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(QoraError):
        t.apply_chat_template(msgs)
    assert not marker.exists()
    assert msgs == [{"role": "user", "content": "hi"}]


def test_templates_see_plain_data_only():
    # A caller object with a dangerous method never reaches the template: it becomes a placeholder.
    class Evil:
        def run(self):  # pragma: no cover - must never be called
            raise AssertionError("template called a method of a caller object")

    t = Tokenizer(byte_level_json(), "{{ messages[0].content }}|{{ obj }}|{{ obj.run }}", {})
    assert t.apply_chat_template([{"role": "user", "content": "x"}], obj=Evil()) == "x|<Evil>|"
