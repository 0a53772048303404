"""KV cache reuse across requests: the Model's record of its cache, the longest-common-prefix reuse,
and that a warm (reusing) run gives the same tokens and logits as a cold one."""

from __future__ import annotations

import numpy as np
import pytest

import qora
from qora.generate import GenerationOptions, prompt_ids, stream_generate

OPTS = dict(greedy=True, max_tokens=12, logprobs=5, enable_thinking=False, today="2025-06-01")


@pytest.fixture(scope="module")
def model_path(tiny_model):
    return tiny_model("tiny-llama", "q8")


@pytest.fixture
def model(model_path):
    with qora.load(model_path, threads=1) as m:
        yield m


def run(model, messages, **over):
    rs = list(stream_generate(model, messages, GenerationOptions(**{**OPTS, **over})))
    return rs, [r.token for r in rs if r.token is not None]


def test_forward_records_the_cache(model):
    ids = model.tokenize("hello world, this is a test")
    model.forward(ids[:5])
    assert model.cache_tokens == ids[:5]
    model.forward(ids[5:], start_pos=5)
    assert model.cache_tokens == ids
    model.forward(ids[:2], start_pos=3)  # rewriting from 3 forgets everything after it
    assert model.cache_tokens == ids[:3] + ids[:2]
    model.forward(ids[:1], start_pos=20)  # positions 5..19 unknown: nothing past the gap is claimed
    assert model.cache_tokens == ids[:3] + ids[:2]
    model.reset()
    assert model.cache_tokens == []


def test_reuse_prefix_is_the_longest_common_prefix(model):
    ids = model.tokenize("the quick brown fox jumps over the lazy dog")
    model.forward(ids)
    other = ids[:4] + model.tokenize(" cat")
    assert model.reuse_prefix(other) == 4
    assert model.cache_tokens == ids[:4]  # what follows the common prefix is forgotten
    model.forward(ids)
    # the same prompt again: all but the last token (its logits must be computed again)
    assert model.reuse_prefix(ids) == len(ids) - 1
    model.forward(ids)
    assert model.reuse_prefix(ids + [5, 6]) == len(ids)
    assert model.reuse_prefix([]) == 0 and model.cache_tokens == []


def test_reused_prefix_gives_the_logits_of_a_cold_prefill(model):
    ids = model.tokenize("<|im_start|>user\nwhat is two plus two?<|im_end|>\n<|im_start|>assistant\n")
    cold = model.forward(ids)
    model.reset()
    model.forward(ids[:7] + model.tokenize("something else entirely"))
    n = model.reuse_prefix(ids)
    assert n == 7
    warm = model.forward(ids[n:], start_pos=n)
    np.testing.assert_allclose(warm, cold[n:], rtol=1e-5, atol=1e-5)


def test_follow_up_turn_prefills_only_new_tokens_and_matches_a_cold_run(model):
    tok = model.tokenizer
    turn1 = [{"role": "user", "content": "Tell me about the sea."}]
    rs1, toks1 = run(model, turn1)
    p1 = prompt_ids(tok, turn1, GenerationOptions(**OPTS))
    assert rs1[-1].cached_tokens == 0 and rs1[-1].prompt_tokens == len(p1)
    # the last sampled token was never fed: the cache holds the prompt and every other generated token
    assert model.cache_tokens == p1 + toks1[:-1]

    answer = "".join(r.text for r in rs1 if r.channel == "answer")
    turn2 = turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And the sky?"}]
    warm, warm_toks = run(model, turn2)
    p2 = prompt_ids(tok, turn2, GenerationOptions(**OPTS))
    assert p2[: len(p1)] == p1
    w = warm[-1]
    assert w.prompt_tokens == len(p2)
    # the whole first prompt is reused, and of the answer as much as re-tokenizes to the same ids
    common = 0
    cached_before = p1 + toks1[:-1]
    while common < min(len(cached_before), len(p2) - 1) and cached_before[common] == p2[common]:
        common += 1
    assert w.cached_tokens == common >= len(p1)
    assert w.prompt_tokens - w.cached_tokens < len(p2) - len(p1) + 1

    model.reset()
    cold, cold_toks = run(model, turn2)
    assert cold[-1].cached_tokens == 0
    assert warm_toks == cold_toks
    for a, b in zip(warm, cold, strict=True):
        assert (a.logprob is None) == (b.logprob is None)
        if a.logprob is not None:
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [i for i, _ in a.top_logprobs] == [i for i, _ in b.top_logprobs]
            np.testing.assert_allclose([lp for _, lp in a.top_logprobs], [lp for _, lp in b.top_logprobs], atol=1e-4)


def test_interrupted_forward_leaves_a_consistent_record(model, monkeypatch):
    """Ctrl-C inside an engine call: the positions it was writing are not claimed."""
    engine = model.engine
    real = engine.forward
    calls = {"n": 0}

    def flaky(tokens, start_pos, all_logits=False):
        calls["n"] += 1
        if calls["n"] == 4:  # the prefill, two decode steps, then Ctrl-C in the third
            raise KeyboardInterrupt
        return real(tokens, start_pos, all_logits)

    monkeypatch.setattr(engine, "forward", flaky)
    messages = [{"role": "user", "content": "Count to ten."}]
    rs, toks = run(model, messages, max_tokens=50)
    assert rs[-1].finish_reason == "interrupted"
    p = prompt_ids(model.tokenizer, messages, GenerationOptions(**OPTS))
    assert model.cache_tokens == p + toks[:2]  # the third token's forward never returned
    monkeypatch.setattr(engine, "forward", real)
    rs2, _ = run(model, messages)
    assert rs2[-1].cached_tokens == len(p) - 1


def test_logprobs_are_a_log_softmax_of_the_logits(model):
    messages = [{"role": "user", "content": "hi"}]
    rs, toks = run(model, messages, max_tokens=1)
    first = rs[0]
    model.reset()
    p = prompt_ids(model.tokenizer, messages, GenerationOptions(**OPTS))
    logits = model.forward(p)[-1].astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    assert first.token == int(np.argmax(logits))
    assert first.logprob == pytest.approx(logp[first.token], abs=1e-6)
    assert [i for i, _ in first.top_logprobs] == list(np.argsort(-logp, kind="stable")[:5])


def test_real_model_follow_up_costs_only_the_new_turn(demo_model):
    """SmolLM2-135M (the demo model) answers in plain text that re-tokenizes to the ids it generated, so
    everything but the unfed last token is reused and the follow-up prefills exactly its own tokens."""
    path = demo_model
    opts = {**OPTS, "max_tokens": 24, "logprobs": None}
    with qora.load(path, threads=1, max_seq_len=512) as m:
        turn1 = [{"role": "user", "content": "What is the capital of France?"}]
        rs1, toks1 = run(m, turn1, **opts)
        p1 = prompt_ids(m.tokenizer, turn1, GenerationOptions(**opts))
        answer = "".join(r.text for r in rs1 if r.channel == "answer")
        turn2 = turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And of Italy?"}]
        p2 = prompt_ids(m.tokenizer, turn2, GenerationOptions(**opts))
        # the transcript as rendered: the first prompt, the answer's tokens, then the new turn
        assert p2[: len(p1) + len(toks1) - 1] == p1 + toks1[:-1]
        warm, warm_toks = run(m, turn2, **opts)
        assert warm[-1].cached_tokens == len(p1) + len(toks1) - 1
        assert warm[-1].prompt_tokens - warm[-1].cached_tokens == len(p2) - len(p1) - len(toks1) + 1
        m.reset()
        cold, cold_toks = run(m, turn2, **opts)
        assert cold_toks == warm_toks
