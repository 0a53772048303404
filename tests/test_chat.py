"""`qora chat`: the conversation logic in process (transcript, thinking, context trimming, save/load,
input), and the REPL driven through a pseudo-terminal on the demo model (SmolLM2-135M)."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

import pexpect
import pytest

import qora
from qora import demo
from qora.chat import Conversation, read_message
from qora.convert import convert
from qora.errors import ContextOverflowError, QoraError
from qora.generate import GenerationOptions, prompt_ids

FIX = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]
STATS = re.compile(
    r"\[prompt (\d+) tokens: (\d+) new, (\d+) cached, [\d.]+ s · answer (\d+) tokens, [\d.]+ tok/s · (\w+)\]"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = convert(
        FIX / "tiny-llama", tmp_path_factory.mktemp("chat") / "tiny-llama-q8.qora", quant="q8", progress=False
    )
    with qora.load(path, threads=1, max_seq_len=160) as m:
        yield m


@pytest.fixture(scope="module")
def demo_model():
    return demo.ensure_demo_model(demo.default_cache_dir())


# ───── input ─────


def reader(*lines):
    it = iter(lines)

    def read(prompt):
        return next(it)

    return read


def test_read_message_forms():
    assert read_message(reader("hello")) == "hello"
    assert read_message(reader('"""', "line one", "", 'line three"""')) == "line one\n\nline three"
    assert read_message(reader('"""first', 'second"""')) == "first\nsecond"
    assert read_message(reader('"""all on one line"""')) == "all on one line"
    assert read_message(reader("a \\", "b")) == "a \nb"


# ───── the conversation ─────


def test_turns_are_recorded_and_the_cache_is_reused(tiny):
    conv = Conversation(tiny, GenerationOptions(greedy=True, max_tokens=6, system="Be brief."))
    list(conv.ask("hello"))
    first = conv.last
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant"]
    assert first.cached_tokens == 0
    list(conv.ask("and again"))
    assert conv.last.cached_tokens >= first.prompt_tokens  # at least the whole first prompt
    assert len(conv.messages) == 5
    conv.clear()
    assert conv.messages == [{"role": "system", "content": "Be brief."}]


def test_thinking_is_kept_in_the_transcript_as_the_template_renders_it():
    """The assistant message holds what the model wrote, <think> block included, so the next turn's
    rendering starts with exactly the tokens of the first prompt and the answer."""
    from test_generate import END_THINK, IM_END, SMOLLM3_TEMPLATE, THINK, FakeModel, make_tokenizer, script

    template = SMOLLM3_TEMPLATE if SMOLLM3_TEMPLATE.is_file() else FIX / "smollm3" / "chat_template.jinja"
    tok = make_tokenizer(template.read_text())
    model = FakeModel(script(THINK, "\nhmm\n", END_THINK, "\nIt is 4.", IM_END), tokenizer=tok)
    conv = Conversation(model, GenerationOptions(greedy=True, max_tokens=50, think_budget=50))
    rs = list(conv.ask("2+2?"))
    assert "".join(r.text for r in rs if r.channel == "answer").strip() == "It is 4."
    assert conv.messages[-1] == {"role": "assistant", "content": "<think>\nhmm\n</think>\nIt is 4."}
    opts = conv.turn_options()
    p1 = prompt_ids(tok, conv.messages[:1], opts)
    generated = [r.token for r in rs if r.token is not None]
    p2 = prompt_ids(tok, conv.messages + [{"role": "user", "content": "and 3+3?"}], opts)
    assert p2[: len(p1) + len(generated)] == p1 + generated


def test_oldest_turns_are_dropped_whole_when_the_context_fills(tiny):
    conv = Conversation(tiny, GenerationOptions(greedy=True, max_tokens=20, system="sys"))
    turns = [(f"question {i} " + "x" * 30, f"answer {i} " + "y" * 30) for i in range(6)]
    for q, a in turns:
        conv.messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    msgs, dropped = conv.fit("the new question")
    assert dropped > 0 and dropped % 2 == 0  # whole turns only
    assert msgs[0]["role"] == "system" and msgs[-1] == {"role": "user", "content": "the new question"}
    assert msgs[1:-1] == conv.messages[1 + dropped :]  # the most recent turns, intact
    assert conv.prompt_length(msgs) + conv.answer_room() <= conv.context
    with pytest.raises(ContextOverflowError, match="context holds 160"):
        conv.fit("z" * 400)


def test_save_and_load(tiny, tmp_path):
    conv = Conversation(tiny, GenerationOptions(greedy=True, max_tokens=4, enable_thinking=False))
    list(conv.ask("hi"))
    path = tmp_path / "chat.json"
    conv.save(str(path))
    data = json.loads(path.read_text())
    assert data["messages"] == conv.messages and data["enable_thinking"] is False
    other = Conversation(tiny, GenerationOptions(), today="1999-01-01")
    other.load(str(path))
    assert other.messages == conv.messages and other.today == conv.today and other.enable_thinking is False
    path.write_text("[{'role': 1}]")
    with pytest.raises(QoraError, match="not JSON"):
        other.load(str(path))
    path.write_text(json.dumps({"messages": [{"role": "wizard", "content": "x"}]}))
    with pytest.raises(QoraError, match="message 0"):
        other.load(str(path))
    with pytest.raises(QoraError, match="cannot read"):
        other.load(str(tmp_path / "missing.json"))


# ───── the REPL in a pseudo-terminal ─────


def spawn(model_path, *args, timeout=90):
    env = dict(os.environ, TERM="dumb", NO_COLOR="1", PYTHONIOENCODING="utf-8")
    cmd = ["-m", "qora", "chat", "--load", str(model_path), "--threads", "1", "--context", "1024", *args]
    # Ctrl-C as a terminal sends it: the child must not inherit SIGINT ignored (a test run started in the
    # background by a non-interactive shell has it so, and Python then never raises KeyboardInterrupt)
    child = pexpect.spawn(
        sys.executable,
        cmd,
        cwd=str(REPO),
        env=env,
        encoding="utf-8",
        timeout=timeout,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    child.expect_exact(">>> ")
    return child


def ask(child, text):
    """Send a message; (answer text as shown, prompt tokens, new, cached, answer tokens, finish)."""
    child.sendline(text)
    child.expect(STATS)
    shown = child.before.replace("\r\n", "\n").split(text, 1)[-1].strip()
    p, new, cached, gen = (int(child.match.group(i)) for i in range(1, 5))
    finish = child.match.group(5)
    child.expect_exact(">>> ")
    return shown, p, new, cached, gen, finish


def test_repl_two_turns_reuse_the_cache_and_clear_resets(demo_model, tmp_path):
    child = spawn(demo_model, "--greedy", "--max-tokens", "24", "--verbose")
    try:
        q1, q2 = "What is the capital of France?", "And of Italy?"
        a1, p1_n, new1, cached1, gen1, _ = ask(child, q1)
        a2, p2_n, new2, cached2, gen2, _ = ask(child, q2)
        saved = tmp_path / "chat.json"
        child.sendline(f"/save {saved}")
        child.expect_exact("saved 4 messages")
        child.expect_exact(">>> ")
        child.sendline("/clear")
        child.expect_exact("conversation cleared")
        child.expect_exact(">>> ")
        a3, p3_n, new3, cached3, gen3, _ = ask(child, q1)
        child.sendline('"""')
        child.sendline("Say yes")
        child.sendline('or no."""')
        child.expect(STATS)
        child.expect_exact(">>> ")
        child.sendline(f"/save {saved}.2")
        child.expect_exact("saved 4 messages")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0

    data = json.loads(saved.read_text())
    msgs = data["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[0]["content"] == q1 and msgs[2]["content"] == q2 and msgs[1]["content"].strip() == a1
    with qora.load(demo_model, threads=1, max_seq_len=64) as m:
        opts = GenerationOptions(today=data["today"])
        p1 = prompt_ids(m.tokenizer, msgs[:1], opts)
        p2 = prompt_ids(m.tokenizer, msgs[:3], opts)
    # turn 1: a cold prefill of the whole prompt
    assert (p1_n, new1, cached1) == (len(p1), len(p1), 0)
    # turn 2: everything of turn 1 is reused but the last sampled token, which was never fed; the
    # prefill is the new turn only (the end-of-turn marker, the user message, the assistant header)
    assert p2_n == len(p2)
    assert cached2 == len(p1) + gen1 - 1
    assert new2 == len(p2) - cached2 < len(p2) - len(p1)
    # /clear: the conversation starts over (same prompt as turn 1, same greedy answer); the cache still
    # holds that prompt, so only its last token is run again
    assert p3_n == len(p1) and cached3 == len(p1) - 1 and a3 == a1
    multi = json.loads(Path(f"{saved}.2").read_text())["messages"]
    assert multi[2] == {"role": "user", "content": "Say yes\nor no."}


def test_repl_ctrl_c_stops_the_answer_but_not_the_repl(demo_model):
    child = spawn(demo_model, "--max-tokens", "2000", "--seed", "3", "--ignore-eos")  # no early end
    try:
        child.sendline("Write a very long story about a dragon who learns to cook.")
        child.expect_exact("cook.\r\n")
        child.expect(r"\w\w")  # the answer has started
        child.sendintr()
        child.expect_exact("[interrupted]")
        child.expect_exact(">>> ")
        child.sendline("/help")
        child.expect_exact("/save FILE")
        child.expect_exact(">>> ")
        child.sendline("/nonsense")
        child.expect_exact("unknown command /nonsense")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_chat_bad_model_is_one_error_line(tmp_path):
    child = pexpect.spawn(sys.executable, ["-m", "qora", "chat", "--load", str(tmp_path / "x.qora")], encoding="utf-8")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1
    assert child.before.strip() == f"qora: error: {tmp_path / 'x.qora'}: no such file"
