"""End-to-end CPU speed: qora against llama.cpp on the same weights, same threads, same lengths.

    python -m pytest bench [--pp 128,512] [--tg 64] [--threads N] [--reps 3] [--llama-bench PATH]

Models: the random SmolLM3-3B-shaped Q4 model (bench/random_model.py + its GGUF twin) and the real
SmolLM2-135M demo model (q4, and its GGUF Q4_0 twin). qora is timed by pytest-benchmark (one warm-up
round, then --reps rounds), so --benchmark-save / --benchmark-compare catch regressions; llama.cpp is
measured in the same run (llama-bench, or the llama-cpp-python binding) and its figures and the
qora/peer ratios go into each benchmark's extra_info and the table printed at the end.
"""

from __future__ import annotations

import harness
import numpy as np
import pytest

MODELS = ["random", "demo"]


def _bench_qora(benchmark, qora_runners, models, peer_results, settings, kind, test):
    model = models(kind)
    peer = peer_results(kind, model)  # the peer first, before qora has the model mapped and repacked
    runner = qora_runners(kind, model)
    fn, n = runner.target(test)
    logits = benchmark.pedantic(
        fn, setup=lambda: ((runner.token_ids(n),), {}), rounds=settings["reps"], warmup_rounds=1, iterations=1
    )
    assert logits.shape == (1, runner.vocab) and np.isfinite(logits).all()
    times = benchmark.stats.stats.data if benchmark.stats else []
    if not times:  # --benchmark-disable: nothing was timed
        return
    ours = harness.Result("qora", test, runner.threads, [n / t for t in times], f"qora {runner.isa}")
    theirs = peer.get(test) if isinstance(peer, dict) else None
    benchmark.extra_info.update(harness.extra_info(ours, model, theirs))
    benchmark.extra_info["isa"] = runner.isa
    harness.record(model, test, qora=ours, peer=theirs)


@pytest.mark.parametrize("kind", MODELS)
def test_prefill_qora(benchmark, qora_runners, models, peer_results, settings, kind, pp_test):
    """Prompt processing: one ppN prompt from an empty cache."""
    _bench_qora(benchmark, qora_runners, models, peer_results, settings, kind, pp_test)


@pytest.mark.parametrize("kind", MODELS)
def test_decode_qora(benchmark, qora_runners, models, peer_results, settings, kind, tg_test):
    """Token generation: tgN single-token steps from an empty cache."""
    _bench_qora(benchmark, qora_runners, models, peer_results, settings, kind, tg_test)


@pytest.mark.parametrize("kind", MODELS)
def test_peer_llama_cpp(models, peer_results, settings, kind):
    """llama.cpp on the GGUF twin: every requested test ran, with the requested threads."""
    model = models(kind)
    res = peer_results(kind, model)
    if isinstance(res, harness.PeerUnavailable):
        pytest.skip(f"peer skipped: {res}")
    if isinstance(res, Exception):
        raise res
    assert sorted(res) == sorted(settings["tests"])
    for test, r in res.items():
        assert r.threads == settings["threads"] and len(r.samples) == settings["reps"]
        assert all(s > 0 for s in r.samples)
        harness.record(model, test, peer=r)
