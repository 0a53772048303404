"""`qora perplexity` (qora/perplexity.py): llama-perplexity's method (chunks of ctx tokens, the
second half scored, BOS at each chunk's start, PPL ± its standard error) against a literal NumPy
transcription of llama.cpp's loop, the KL-divergence mode, the command line and its errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import qora
from qora import perplexity as P
from qora.cli import main as qora_main
from qora.errors import FormatError, QoraError

FIX = Path(__file__).parent / "fixtures"
TEXT = (
    "The quick brown fox jumps over the lazy dog. A model reads text one token at a time, and its "
    "perplexity says how surprised it was on average. Lower is better; a uniform guess over the "
    "vocabulary scores the vocabulary size. "
) * 3


def llama_loop(model, tokens, ctx, bos):
    """llama.cpp tools/perplexity perplexity(), transcribed: one chunk at a time from an empty cache."""
    n_chunk = len(tokens) // ctx
    first = ctx // 2
    nll = nll2 = 0.0
    count = 0
    for i in range(n_chunk):
        start, end = i * ctx, (i + 1) * ctx
        batch = list(tokens[start:end])
        if bos is not None:
            batch[0] = bos
        logits = model.forward(batch, 0).astype(np.float64)
        for j in range(first, ctx - 1):
            row = logits[j]
            mx = row.max()
            v = -(row[tokens[start + j + 1]] - mx - math.log(np.exp(row - mx).sum()))
            nll += v
            nll2 += v * v
            count += 1
    nll2 /= count
    nll /= count
    ppl = math.exp(nll)
    nll2 -= nll * nll
    return ppl, math.sqrt(nll2 / (count - 1)) * ppl, count


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with qora.load(FIX / "tiny-smollm3.q8_0.gguf", device="cpu", threads=1) as m:
        yield m


@pytest.mark.parametrize("ctx", [16, 21])
def test_matches_llama_perplexity_loop(tiny, ctx):
    tokens = P.tokenize_text(tiny.tokenizer, TEXT)
    r = P.perplexity(tiny, tokens, ctx)
    ppl, err, count = llama_loop(tiny, tokens, ctx, P.add_bos_id(tiny.tokenizer))
    assert r.chunks == len(tokens) // ctx and r.scored == count == r.chunks * (ctx - 1 - ctx // 2)
    assert r.ppl == pytest.approx(ppl, rel=1e-12) and r.error == pytest.approx(err, rel=1e-9)
    assert r.chunk_ppl[-1] == pytest.approx(r.ppl)


def test_bos_replaces_each_chunks_first_token(tmp_path):
    from _helpers_convert import hf_weights, make_gguf, qora_config

    cfg = qora_config()
    path = tmp_path / "bos.gguf"
    make_gguf(path, hf_weights(cfg), cfg, add_bos=True)
    with qora.load(path, device="cpu", threads=1) as m:
        bos = P.add_bos_id(m.tokenizer)
        tokens = P.tokenize_text(m.tokenizer, TEXT)
        assert bos == 1 and tokens[0] == bos
        seen = []
        forward = m.forward
        m.forward = lambda ids, pos: seen.append(ids[0]) or forward(ids, pos)
        r = P.perplexity(m, tokens, 16, chunks=3)
        assert seen == [bos] * 3 and r.chunks == 3
        m.forward = forward
        ppl, _, _ = llama_loop(m, tokens[: 3 * 16], 16, bos)
        assert r.ppl == pytest.approx(ppl, rel=1e-12)


def test_kl_divergence_against_itself_and_another_model(tiny, tmp_path):
    tokens = P.tokenize_text(tiny.tokenizer, TEXT)
    save = P.Reference(tokens, 16, tiny.config["vocab_size"])
    r0 = P.perplexity(tiny, tokens, 16, save=save)
    save.save(tmp_path / "ref.npz")
    base = P.Reference.load(tmp_path / "ref.npz")
    same = P.perplexity(tiny, tokens, 16, base=base)
    assert same.kl.mean < 1e-4 and same.kl.same_top == 1.0  # the 16-bit steps of the saved log-probs
    assert same.kl.base_ppl == pytest.approx(r0.ppl, rel=1e-4)
    with qora.load(FIX / "tiny-smollm3.q4_0.gguf", device="cpu", threads=1) as q4:
        other = P.perplexity(q4, tokens, 16, base=base)
    k = other.kl
    assert 1e-4 < k.mean and k.error > 0 and k.median <= k.p99 <= k.maximum and 0 < k.same_top < 1
    # KL of the first scored position, by hand
    with qora.load(FIX / "tiny-smollm3.q4_0.gguf", device="cpu", threads=1) as q4:
        lq = P.log_softmax(q4.forward(tokens[:16], 0)[8])
    lp = P.log_softmax(tiny.forward(tokens[:16], 0)[8])
    assert float((np.exp(lp) * (lp - lq)).sum()) <= k.maximum + 1e-6


def test_logprob_packing_is_16_bit_steps():
    rng = np.random.default_rng(0)
    lp = P.log_softmax(rng.standard_normal((5, 1000)).astype(np.float32) * 4)
    back = P.unpack_logprobs(*P.pack_logprobs(lp))
    span = lp.max(axis=1) - lp.min(axis=1)
    assert (np.abs(back - lp).max(axis=1) <= span / 65535 * 0.51).all()


def test_errors_are_one_line(tiny, tmp_path):
    tokens = P.tokenize_text(tiny.tokenizer, "short text")
    with pytest.raises(QoraError, match=r"at least 32 are needed for a 16-token context"):
        P.perplexity(tiny, tokens, 16)
    tokens = P.tokenize_text(tiny.tokenizer, TEXT)
    ref = P.Reference(tokens, 16, tiny.config["vocab_size"])
    P.perplexity(tiny, tokens, 16, chunks=2, save=ref)
    with pytest.raises(QoraError, match="computed with --ctx 16, not 20"):
        P.perplexity(tiny, tokens, 20, base=ref)
    with pytest.raises(QoraError, match="another text"):
        P.perplexity(tiny, tokens[1:], 16, chunks=2, base=ref)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(FormatError, match="bad.npz: not a reference saved by qora perplexity"):
        P.Reference.load(tmp_path / "bad.npz")


def test_command_line(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    gguf = str(FIX / "tiny-smollm3.q8_0.gguf")
    base = ["perplexity", "--load", gguf, "--file", str(text), "--ctx", "16", "--cpu", "--threads", "1"]
    assert qora_main([*base, "--save-logits", str(tmp_path / "ref.npz")]) == 0
    out, err = capsys.readouterr()
    assert "Final estimate: PPL = " in out and "PPL" in err
    assert qora_main([*base, "--json", "-q", "--kl-base", str(tmp_path / "ref.npz")]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["kl"]["same_top"] == 1.0 and r["ppl"] == pytest.approx(r["kl"]["base_ppl"], rel=1e-4)
    assert qora_main(["perplexity", "--load", gguf, "--file", str(tmp_path / "missing.txt")]) == 1
    assert capsys.readouterr().err.startswith("qora: error: ")


def test_demo_model_perplexity_is_sane(demo_model):
    """The demo model on plain English prose (tests/fixtures/prose.txt, four paragraphs about Paris
    written for these tests): a PPL in the range a 135M instruct model reaches on such text (14.3 for
    the q4 conversion when this was written)."""
    text = (FIX / "prose.txt").read_text(encoding="utf-8")
    with qora.load(demo_model, device="cpu", max_seq_len=128) as m:
        tokens = P.tokenize_text(m.tokenizer, text)
        r = P.perplexity(m, tokens, 128, chunks=2)
    assert 3 < r.ppl < 40 and r.error > 0 and r.scored == 2 * 63
