"""The generation loop over a fake NumPy engine: EOS, stop strings, thinking, limits, loops, Ctrl-C."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from qora.errors import ContextOverflowError, QoraError
from qora.generate import (
    GenerationOptions,
    LoopDetector,
    Response,
    SentenceStop,
    StopStrings,
    build_messages,
    generate,
    length_hint_sentence,
    stream_generate,
)
from qora.tokenizer import REPLACEMENT_CHAR, Tokenizer

SPECIALS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|endoftext|>"]
SMOLLM3_TEMPLATE = Path(__file__).resolve().parents[2] / "shared" / "smollm3-3b" / "chat_template.jinja"
FIXTURE_TEMPLATE = Path(__file__).parent / "fixtures" / "smollm3" / "chat_template.jinja"


def make_tokenizer(template: str | None = None) -> Tokenizer:
    """Byte-level BPE with no merges: one token per byte, so every multi-byte character is split."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    hf = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(SPECIALS)
    eot = 256 + SPECIALS.index("<|endoftext|>")
    return Tokenizer(hf.to_str(), template, {"eos": [eot]})


TOK = make_tokenizer()
IM_END, THINK, END_THINK, EOT = (TOK.token_to_id(s) for s in ("<|im_end|>", "<think>", "</think>", "<|endoftext|>"))


class FakeEngine:
    """Logits peaked on the token `policy(sequence so far)` picks; records every forward call."""

    def __init__(self, policy, vocab: int, max_seq_len: int = 4096, interrupt_at: int | None = None):
        self.policy, self.vocab, self.max_seq_len = policy, vocab, max_seq_len
        self.interrupt_at = interrupt_at
        self.calls: list[tuple[list[int], int]] = []
        self.seq: list[int] = []
        self.resets = 0

    def forward(self, tokens, start_pos, all_logits=False):
        tokens = np.asarray(tokens)
        assert tokens.dtype == np.int32 and tokens.ndim == 1 and tokens.size >= 1
        if start_pos + tokens.size > self.max_seq_len:
            raise ContextOverflowError("fake engine: context full")
        assert start_pos == len(self.seq), "positions must be contiguous"
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        self.calls.append((tokens.tolist(), start_pos))
        self.seq.extend(tokens.tolist())
        logits = np.full((1, self.vocab), -10.0, dtype=np.float32)
        logits[0, self.policy(self.seq)] = 10.0
        return logits

    def reset(self):
        self.seq = []
        self.resets += 1


class FakeModel:
    def __init__(self, policy, tokenizer: Tokenizer = TOK, **engine_kw):
        self.tokenizer = tokenizer
        self.engine = FakeEngine(policy, tokenizer.vocab_size, **engine_kw)
        self.config = {"architecture": "llama", "vocab_size": tokenizer.vocab_size}
        self.generation_defaults = {"temperature": 0.6, "top_p": 0.95}

    def reset(self):
        self.engine.reset()


def script(*parts, then: int | None = None):
    """A policy emitting the given pieces (str -> its byte tokens, int -> that id) after the prompt,
    then `then` forever (default: the end of turn)."""
    ids: list[int] = []
    for p in parts:
        ids.extend(TOK.encode(p) if isinstance(p, str) else [p])
    state = {"prompt": None}

    def policy(seq):
        if state["prompt"] is None:
            state["prompt"] = len(seq)
        i = len(seq) - state["prompt"]
        return ids[i] if i < len(ids) else (IM_END if then is None else then)

    return policy


def run(model, prompt="hi", **opts) -> list[Response]:
    opts.setdefault("greedy", True)
    opts.setdefault("max_tokens", 1000)
    opts.setdefault("think_budget", 1000)
    return list(stream_generate(model, prompt, GenerationOptions(**opts)))


def text_of(responses, channel="answer"):
    return "".join(r.text for r in responses if r.channel == channel)


def varied_text(n: int, seed: int = 0) -> str:
    """n letters with no repeating pattern (so loop detection stays quiet)."""
    rng = np.random.default_rng(seed)
    return "".join(chr(ord("a") + int(i)) for i in rng.integers(0, 26, size=n))


# ───── basics ─────


def test_eos_stops_and_engine_calls():
    model = FakeModel(script("Hello world."))
    rs = run(model)
    assert text_of(rs) == "Hello world."
    assert rs[-1].finish_reason == "stop" and rs[-1].token == IM_END
    assert all(r.finish_reason is None for r in rs[:-1])
    calls = model.engine.calls
    prompt = TOK.encode(TOK.apply_chat_template([{"role": "user", "content": "hi"}]))
    assert calls[0] == (prompt, 0)  # one prefill call with the rendered template
    assert [len(c[0]) for c in calls[1:]] == [1] * 12  # one call per token; EOS is never fed
    assert rs[-1].prompt_tokens == len(prompt)
    assert rs[-1].generation_tokens == 13
    assert model.engine.resets == 1
    assert generate(model, "hi", greedy=True) == "Hello world."


def test_other_eos_ids_stop():
    rs = run(FakeModel(script("ok", EOT, "never")))
    assert text_of(rs) == "ok" and rs[-1].finish_reason == "stop"


def test_utf8_pieces_are_whole_characters():
    text = "naïve 😀 数学"
    rs = run(FakeModel(script(text)))
    assert text_of(rs) == text
    for r in rs:
        assert REPLACEMENT_CHAR not in r.text


def test_stop_strings_are_held_back_and_not_emitted():
    model = FakeModel(script("abc ST and more STOP def"))
    rs = run(model, stop=["STOP"])
    assert text_of(rs) == "abc ST and more "
    assert rs[-1].finish_reason == "stop"
    emitted = []
    for r in rs:
        emitted.append(r.text)
        assert "STOP" not in "".join(emitted)
    # "S" and "T" of the first "ST" were held until " " proved they were not the start of "STOP".
    pieces = [r.text for r in rs if r.token is not None and r.channel == "answer"]
    assert pieces[:7] == ["a", "b", "c", " ", "", "", "ST "]


def test_stop_string_prefix_released_at_eos():
    rs = run(FakeModel(script("value: ST")), stop=["STOP"])
    assert text_of(rs) == "value: ST"
    assert rs[-1].finish_reason == "stop" and rs[-1].text == "ST"


def test_stop_strings_filter_unit():
    s = StopStrings(["</a>", "xyz"])
    assert s.push("hello <") == ("hello ", False)
    assert s.push("/a") == ("", False)
    assert s.push(">tail") == ("", True)
    s = StopStrings(["xyz"])
    assert s.push("axy") == ("a", False)
    assert s.push("q") == ("xyq", False)
    assert s.flush() == ""
    assert StopStrings([]).push("anything") == ("anything", False)


# ───── thinking ─────


def test_think_channel():
    model = FakeModel(script(THINK, "let me see", END_THINK, "\nThe answer."))
    rs = run(model)
    assert text_of(rs, "think") == "let me see"
    assert text_of(rs) == "\nThe answer."
    assert rs[-1].think_tokens == len("let me see")
    assert generate(FakeModel(script(THINK, "hmm", END_THINK, "yes")), "q", greedy=True) == "yes"


def test_think_budget_forces_end_think():
    thought = varied_text(500)

    def policy(seq):
        if END_THINK in seq:
            after = seq[seq.index(END_THINK) + 1 :]
            answer = TOK.encode("Done.")
            return answer[len(after)] if len(after) < len(answer) else IM_END
        n = len(seq) - seq.index(THINK) - 1 if THINK in seq else -1
        return THINK if n < 0 else TOK.encode(thought[n % len(thought)])[0]

    model = FakeModel(policy)
    rs = run(model, think_budget=10)
    think = text_of(rs, "think")
    assert think == thought[:10]
    assert rs[-1].think_tokens == 10
    assert text_of(rs) == "Done."
    assert rs[-1].finish_reason == "stop"
    # The forced </think> was fed to the engine right after the 10th thinking token.
    fed = [c[0][0] for c in model.engine.calls[1:]]
    assert fed[:12] == [THINK] + TOK.encode(thought[:10]) + [END_THINK]


def test_think_loop_closes_the_thought():
    looping = TOK.encode("again and ")

    def policy(seq):
        if END_THINK in seq:  # after the forced </think>: a short answer
            after = seq[seq.index(END_THINK) + 1 :]
            return TOK.encode("fine")[len(after)] if len(after) < 4 else IM_END
        if THINK not in seq:
            return THINK
        n = len(seq) - seq.index(THINK) - 1
        return looping[n % len(looping)]

    model = FakeModel(policy)
    rs = run(model)
    assert END_THINK in [c[0][0] for c in model.engine.calls[1:]]
    assert text_of(rs) == "fine" and rs[-1].finish_reason == "stop"
    assert 32 <= len(text_of(rs, "think")) < 64  # cut after min_span (32) tokens of the loop


def test_prompt_that_opens_a_thought():
    template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "<|im_start|>assistant\n<think>\n"
    )
    tok = make_tokenizer(template)
    model = FakeModel(script("reasoning", END_THINK, "answer"), tokenizer=tok)
    rs = run(model)
    assert text_of(rs, "think") == "reasoning" and text_of(rs) == "answer"
    model = FakeModel(script("ignored", END_THINK, "answer"), tokenizer=tok)
    rs = run(model, think_budget=0)
    assert model.engine.calls[1][0] == [END_THINK]  # forced at once: no budget at all
    assert text_of(rs, "think") == ""


# ───── limits ─────


def test_ignore_eos_generates_max_tokens():
    # the script ends its turn after "abc"; with ignore_eos the end-of-turn tokens are masked out, and
    # the repeated filler that follows is neither a loop nor a sentence end that stops the answer
    rs = run(FakeModel(script("abc")), max_tokens=150, ignore_eos=True)
    assert rs[-1].finish_reason == "length"
    answer = [r.token for r in rs if r.channel == "answer" and r.token is not None]
    assert len(answer) == 150
    assert not {IM_END, EOT} & set(answer)
    assert text_of(rs).startswith("abc")
    # without it: the turn ends after "abc"
    rs = run(FakeModel(script("abc")), max_tokens=150)
    assert (rs[-1].finish_reason, text_of(rs)) == ("stop", "abc")


def test_ignore_eos_keeps_stop_strings():
    rs = run(
        FakeModel(script("one two. three", then=TOK.encode("x")[0])), max_tokens=500, ignore_eos=True, stop=["two"]
    )
    assert (rs[-1].finish_reason, text_of(rs)) == ("stop", "one ")


def test_loop_detection_stops():
    rs = run(FakeModel(script("the cat sat on the mat. " * 100)), max_tokens=5000, sentence_stop=False)
    assert rs[-1].finish_reason == "loop"
    assert rs[-1].generation_tokens == 3 * 24  # cut at the third copy of the 24-token sentence
    assert text_of(rs).startswith("the cat sat on the mat. the cat")


def test_loop_detector_unit():
    d = LoopDetector()
    assert not any(d.add(t) for t in TOK.encode(varied_text(400, seed=1)))
    d.reset()
    hits = [d.add(t) for t in [7] * 120]
    assert hits.index(True) == 31  # single-token loop: caught after min_span (32) tokens
    d.reset()
    unit = TOK.encode(varied_text(50, seed=2))
    hits = [d.add(t) for t in unit * 4]
    assert hits.index(True) == 149  # a 50-token n-gram repeated 3 times
    d.reset()
    hits = [d.add(t) for t in TOK.encode(varied_text(20, seed=4) + "The capital is Paris, " * 4)]
    assert hits.index(True) == 20 + 3 * 22 - 1  # a sentence: cut at its third copy
    # A few repeats of a short pattern (a table row, a list) are not a loop.
    d.reset()
    assert not any(d.add(t) for t in TOK.encode(varied_text(30, seed=3) + "| --- |" * 4))
    d.reset()
    assert not any(d.add(t) for t in TOK.encode(varied_text(30, seed=3) + "0, " * 10))


def test_max_tokens_is_answer_tokens():
    rs = run(FakeModel(script(THINK, "abc", END_THINK, varied_text(100))), max_tokens=7, sentence_stop=False)
    assert rs[-1].finish_reason == "length"
    assert text_of(rs, "think") == "abc"
    assert len(text_of(rs)) == 7


def test_sentence_boundary_stop():
    body = "Alpha beta gamma delta epsilon zeta. Eta theta iota kappa lambda 3.14 rho mu. Nu xi omicron."
    max_tokens = 78
    start = int(np.ceil(0.85 * max_tokens)) - 1  # index of the first armed character
    m = re.compile(r"[.!?](?=\s)").search(body, start)
    expected = body[: m.end()]
    assert len(expected) <= max_tokens and body.index("3.14") + 1 >= start  # the decimal point is armed
    rs = run(FakeModel(script(body)), max_tokens=max_tokens)
    assert text_of(rs) == expected
    assert rs[-1].finish_reason == "length"
    assert expected.endswith("3.14 rho mu.")  # "3.14" did not end the sentence


def test_sentence_stop_unit():
    s = SentenceStop()
    assert s.push("Hello there.", armed=False) == ("Hello there.", False)
    assert s.push(" Next", armed=True) == ("", True)
    s = SentenceStop()
    assert s.push("3.", armed=True) == ("3.", False)
    assert s.push("14 is pi! And", armed=True) == ("14 is pi!", True)
    assert SentenceStop().push("数学。次", armed=True) == ("数学。", True)


def test_context_overflow():
    prompt_len = len(TOK.encode(TOK.apply_chat_template([{"role": "user", "content": "hi"}])))
    with pytest.raises(ContextOverflowError) as e:
        run(FakeModel(script("x"), max_seq_len=prompt_len))
    assert str(prompt_len) in str(e.value)
    assert isinstance(e.value, QoraError)
    # prompt + 1 fits: the first token is fed, the second is sampled from its logits, then the
    # context is full (the last token never needs a cache slot).
    rs = run(FakeModel(script("xyzw"), max_seq_len=prompt_len + 1))
    assert text_of(rs) == "xy" and rs[-1].finish_reason == "length"
    rs = run(FakeModel(script("xyzw"), max_seq_len=prompt_len + 2))
    assert text_of(rs) == "xyz" and rs[-1].finish_reason == "length"


def test_keyboard_interrupt_stops_cleanly():
    model = FakeModel(script("abcdefghij"), interrupt_at=5)
    rs = run(model)
    assert rs[-1].finish_reason == "interrupted"
    assert text_of(rs) == "abcde"  # the tokens produced before Ctrl-C, all emitted


def test_keyboard_interrupt_after_the_closing_response_reaches_the_caller(monkeypatch):
    """A stop string closes the answer with that token's own Response; a Ctrl-C landing in the generator
    after it went out (on_token's tail) has no Response left to report it in, so it is raised to the
    caller, not swallowed (it was: a Ctrl-C then did nothing at all)."""
    from qora import generate

    plain = generate._Generation.on_token

    def on_token(self, token):
        yield from plain(self, token)
        if self.closed:
            raise KeyboardInterrupt  # as if the signal landed here

    monkeypatch.setattr(generate._Generation, "on_token", on_token)
    seen = []
    with pytest.raises(KeyboardInterrupt):
        for r in stream_generate(FakeModel(script("value: STOP and more")), "hi", GenerationOptions(stop=["STOP"])):
            seen.append(r)
    assert seen[-1].finish_reason == "stop"


# ───── prompt building and options ─────


def smollm3_tokenizer() -> Tokenizer:
    for p in (FIXTURE_TEMPLATE, SMOLLM3_TEMPLATE):
        if p.is_file():
            return make_tokenizer(p.read_text(encoding="utf-8"))
    pytest.skip("no SmolLM3 chat template available")


def test_chat_template_no_think_and_length_hint():
    tok = smollm3_tokenizer()
    model = FakeModel(script("ok"), tokenizer=tok)
    run(model, enable_thinking=False, length_hint="20 words", today="2025-07-09")
    prompt = tok.decode(model.engine.calls[0][0])
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n")
    assert "## Custom Instructions\n\nAnswer in about 20 words.\n\n" in prompt
    assert "Reasoning Mode: /no_think" in prompt
    # A system message with /no_think keeps its flag working with a hint in front.
    model = FakeModel(script("ok"), tokenizer=tok)
    msgs = [{"role": "system", "content": "You are terse. /no_think"}, {"role": "user", "content": "hi"}]
    run(model, prompt=msgs, length_hint="short")
    prompt = tok.decode(model.engine.calls[0][0])
    assert "Reasoning Mode: /no_think" in prompt
    assert "Keep the answer short: a few sentences at most. You are terse.\n\n" in prompt


def test_raw_prompt_and_messages():
    model = FakeModel(script("!"))
    run(model, prompt="Once upon a time", raw=True)
    assert model.engine.calls[0][0] == TOK.encode("Once upon a time")
    with pytest.raises(QoraError):
        run(FakeModel(script("!")), prompt=[{"role": "user", "content": "x"}], raw=True)
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    model = FakeModel(script("!"))
    run(model, prompt=msgs, system="S")
    assert TOK.decode(model.engine.calls[0][0]) == TOK.apply_chat_template([{"role": "system", "content": "S"}] + msgs)


def test_build_messages_and_hints():
    assert build_messages("q") == [{"role": "user", "content": "q"}]
    assert build_messages("q", system="S")[0] == {"role": "system", "content": "S"}
    msgs = [{"role": "system", "content": "old"}, {"role": "user", "content": "q"}]
    assert build_messages(msgs, system="new")[0]["content"] == "new"
    assert length_hint_sentence("short").startswith("Keep the answer short")
    assert length_hint_sentence("1 sentence") == "Answer in about 1 sentence."
    assert length_hint_sentence("3 paragraphs") == "Answer in about 3 paragraphs."
    assert length_hint_sentence("50") == "Answer in about 50 words."
    for bad in ("very very long", "0 words", "-3 words"):
        with pytest.raises(QoraError):
            length_hint_sentence(bad)
    with pytest.raises(QoraError):
        build_messages(42)
    with pytest.raises(QoraError):
        build_messages([])


def test_options_validation_and_defaults():
    for bad in (
        {"max_tokens": 0},
        {"think_budget": -1},
        {"temperature": -1},
        {"top_p": 0},
        {"top_p": 1.5},
        {"top_k": -2},
        {"min_p": 1},
        {"repeat_penalty": 0},
        {"stop": [""]},
        {"seed": -5},
        {"length_hint": "huge"},
    ):
        with pytest.raises(QoraError):
            GenerationOptions(**bad)
    assert GenerationOptions(stop="END").stop == ["END"]
    think = GenerationOptions().resolved(thinking=True)
    assert (think.temperature, think.top_k, think.top_p, think.repeat_penalty, think.presence_penalty) == (
        0.6,
        20,
        0.95,
        1.1,
        1.5,
    )
    assert think.repeat_window == 64 and think.min_p == 0.0
    assert think.max_tokens in (512, 1024, 2048, 8192) and think.think_budget in (256, 1024, 2048, 8192)
    no_think = GenerationOptions(temperature=None).resolved(thinking=False)
    assert no_think.temperature == 0.7
    assert GenerationOptions(temperature=0.2).resolved(thinking=True).temperature == 0.2
    with pytest.raises(QoraError, match="unknown generation option"):
        list(stream_generate(FakeModel(script("x")), "hi", bogus=1))


def test_temperature_default_follows_thinking_mode():
    tok = smollm3_tokenizer()
    import qora.generate as g

    seen = []
    real = g.GenerationOptions.sampler

    def spy(self, exempt=frozenset(), banned=frozenset(), **kw):
        seen.append(self.temperature)
        return real(self, exempt, banned, **kw)

    g.GenerationOptions.sampler = spy
    try:
        list(stream_generate(FakeModel(script("ok"), tokenizer=tok), "hi", GenerationOptions(max_tokens=5)))
        list(stream_generate(FakeModel(script("ok"), tokenizer=tok), "hi", enable_thinking=False, max_tokens=5))
        list(stream_generate(FakeModel(script("ok")), "hi", max_tokens=5))  # no-think ChatML prompt
    finally:
        g.GenerationOptions.sampler = real
    assert seen == [0.6, 0.7, 0.6]


def test_sampled_generation_is_reproducible():
    # Near-uniform logits: sampling matters; the same seed gives the same text.
    class Noisy(FakeEngine):
        def forward(self, tokens, start_pos, all_logits=False):
            super().forward(tokens, start_pos, all_logits)
            rng = np.random.default_rng(len(self.seq))
            logits = rng.normal(size=(1, self.vocab)).astype(np.float32)
            logits[0, 256:] = -50  # no specials
            return logits

    def make():
        m = FakeModel(lambda seq: 0)
        m.engine = Noisy(lambda seq: 0, TOK.vocab_size)
        return m

    a = list(stream_generate(make(), "hi", max_tokens=30, seed=7, sentence_stop=False))
    b = list(stream_generate(make(), "hi", max_tokens=30, seed=7, sentence_stop=False))
    c = list(stream_generate(make(), "hi", max_tokens=30, seed=8, sentence_stop=False))
    assert [r.token for r in a] == [r.token for r in b] != [r.token for r in c]
    assert a[-1].finish_reason == "length"
    assert a[-1].generation_tps > 0 and a[-1].prompt_tps > 0


def test_thinking_state_on_fixture_prompts():
    import json

    from qora.generate import thinking_state

    fixtures = Path(__file__).parent / "fixtures"
    if not (fixtures / "chat_template_cases.json").is_file() or not (fixtures / "tokenizer.json").is_file():
        pytest.skip("chat template fixtures not generated yet")
    tok = Tokenizer((fixtures / "tokenizer.json").read_text(encoding="utf-8"), None, {"eos": [396]})
    for case in json.loads((fixtures / "chat_template_cases.json").read_text(encoding="utf-8")):
        if not case["kwargs"].get("add_generation_prompt"):
            continue
        no_think = "<think>\n\n</think>\n" in case["expected"][-30:]
        assert thinking_state(case["expected_ids_tiny"], tok) == (not no_think, False), case["name"]


def test_greedy_is_plain_argmax_unless_penalties_are_asked_for():
    from qora.generate import GenerationOptions

    r = GenerationOptions(greedy=True, max_tokens=8, think_budget=8).resolved(thinking=False)
    assert (r.repeat_penalty, r.presence_penalty, r.frequency_penalty) == (1.0, 0.0, 0.0)
    r = GenerationOptions(greedy=True, repeat_penalty=1.3, max_tokens=8, think_budget=8).resolved(thinking=False)
    assert r.repeat_penalty == 1.3
    r = GenerationOptions(max_tokens=8, think_budget=8).resolved(thinking=False)
    assert (r.repeat_penalty, r.presence_penalty) == (1.1, 1.5)


def test_prompt_ids_renders_the_template_once(monkeypatch):
    from qora.generate import GenerationOptions, prompt_ids

    tok = make_tokenizer()
    calls = []
    render = tok._render
    monkeypatch.setattr(tok, "_render", lambda *a: calls.append(1) or render(*a))
    ids = prompt_ids(tok, "hello", GenerationOptions(), context=4096)
    assert len(calls) == 1
    assert ids == tok.encode_chat([{"role": "user", "content": "hello"}], add_generation_prompt=True)
