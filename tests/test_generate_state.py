"""The generation state object (qora.generate.Generation: fed logits, returns the next token and its
Responses), which the batching scheduler drives, gives the same stream as stream_generate; and the
Python API's result object (GenerationResult, Model.stream's TextStream)."""

from __future__ import annotations

import numpy as np
import pytest
from test_generate import END_THINK, EOT, IM_END, THINK, FakeModel, run, script, varied_text

from qora.generate import Generation, GenerationOptions, GenerationResult, generate, stream_generate
from qora.model import TextStream


def drive(model, prompt="hi", **opts) -> list:
    """stream_generate's Responses, produced by feeding a Generation logits step by step."""
    opts.setdefault("greedy", True)
    opts.setdefault("max_tokens", 1000)
    opts.setdefault("think_budget", 1000)
    g = Generation(model, prompt, GenerationOptions(**opts))
    engine = model.engine
    engine.reset()
    logits = engine.forward(np.asarray(g.ids, np.int32), 0)
    g.prefilled(0, 0.0)
    out, pos = [], len(g.ids)
    while True:
        responses, token = g.feed(logits[-1])
        out.extend(responses)
        if token is None:
            return out
        if pos + 1 > engine.max_seq_len:
            out.append(g.close("length"))
            return out
        logits = engine.forward(np.array([token], np.int32), pos)
        pos += 1


def _shape(responses):
    return [(r.text, r.token, r.channel, r.finish_reason, r.generation_tokens, r.think_tokens) for r in responses]


CASES = {
    "eos": (lambda: script("Hello there."), {}),
    "stop string": (lambda: script("one, two, STOP three"), {"stop": ["STOP"]}),
    "think": (lambda: script(THINK, "hmm", END_THINK, "answer"), {}),
    "think budget": (lambda: script(THINK, "a long thought that goes on", then=ord("x")), {"think_budget": 5}),
    "max tokens": (lambda: script(varied_text(40), then=EOT), {"max_tokens": 12, "sentence_stop": False}),
    "loop": (lambda: script("ab" * 200), {}),
    "sentence stop": (lambda: script("First one. Second one goes on and on. More"), {"max_tokens": 20}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_feeding_logits_gives_the_same_stream(case):
    policy, opts = CASES[case]
    want = run(FakeModel(policy()), **opts)
    got = drive(FakeModel(policy()), **opts)
    assert _shape(got) == _shape(want)
    assert got[-1].finish_reason is not None and all(r.finish_reason is None for r in got[:-1])


def test_full_context_closes_with_length():
    model = FakeModel(script(varied_text(100)), max_seq_len=12)
    got = drive(model, "hi", raw=True)
    want = run(FakeModel(script(varied_text(100)), max_seq_len=12), "hi", raw=True)
    assert _shape(got) == _shape(want) and got[-1].finish_reason == "length"


def test_generate_returns_a_result_that_is_the_text():
    model = FakeModel(script(THINK, "ok", END_THINK, "Hi you", IM_END))
    res = generate(model, "hi", GenerationOptions(greedy=True, max_tokens=50, think_budget=50))
    responses = run(FakeModel(script(THINK, "ok", END_THINK, "Hi you", IM_END)), max_tokens=50, think_budget=50)
    assert isinstance(res, GenerationResult) and isinstance(res, str)
    assert res == "Hi you" == res.text and res.thinking == "ok"
    assert res.finish_reason == "stop"
    assert res.tokens == [r.token for r in responses if r.token is not None]
    assert res.tokens[0] == THINK and res.tokens[-1] == IM_END
    last = responses[-1]
    assert res.usage.prompt_tokens == last.prompt_tokens > 0
    assert res.usage.completion_tokens == len(res.tokens) and res.usage.think_tokens == 2
    assert res.usage.total_tokens == res.usage.prompt_tokens + res.usage.completion_tokens
    assert res.timings.generation_time >= 0 and res.timings.prompt_time >= 0
    assert "finish_reason='stop'" in repr(res)


def test_text_stream_result_after_iteration():
    model = FakeModel(script("abc def", IM_END))
    stream = TextStream(stream_generate(model, "hi", GenerationOptions(greedy=True, max_tokens=5)))
    assert stream.result is None
    chunks = list(stream)
    assert "".join(chunks) == stream.result == "abc d"
    assert stream.result.finish_reason == "length" and stream.result.usage.completion_tokens == 5
