"""`qora bench --depth N` (llama-bench -d N): the tests run after N tokens already in the KV cache.
What is checked is that the cache really holds them (the same logits as one long prompt), the report
and the label; nothing here asserts a speed."""

from __future__ import annotations

import json

import numpy as np
import pytest

import qora
from qora import bench, cli
from qora.errors import QoraError


@pytest.fixture(scope="module")
def model_path(tiny_model):
    return tiny_model("tiny-smollm3", "q4")


class RecordingRunner(bench.Runner):
    """A Runner that keeps every token id it hands to the engine, in order."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.drawn = []

    def token_ids(self, n):
        ids = super().token_ids(n)
        self.drawn.append(ids)
        return ids


@pytest.mark.parametrize("depth,chunk", [(37, 512), (70, 16), (1, 512)])
def test_depth_fill_is_the_cache_the_tests_read(model_path, depth, chunk):
    with qora.load(model_path, threads=1, device="cpu", max_seq_len=depth + 24) as m:
        r = RecordingRunner(m.engine, depth=depth)
        r.fill(chunk=chunk)
        prompt = r.token_ids(9)
        got = np.asarray(r.prefill(prompt))[-1]
        all_ids = np.concatenate(r.drawn)
        assert len(all_ids) == depth + 9
        want = np.asarray(m.engine.forward(all_ids, 0, all_logits=False))[-1]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        # decode starts at the same depth: step t sits at position depth + t
        r.fill(chunk=chunk)
        steps = r.token_ids(3)
        got = np.asarray(r.decode(steps))[-1]
        n_chunks = -(-depth // chunk)
        fill_ids = np.concatenate(r.drawn[-1 - n_chunks : -1])
        want = np.asarray(m.engine.forward(np.concatenate([fill_ids, steps]), 0))[-1]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_depth_in_json_and_table(model_path, capsys):
    assert cli.main(["bench", "--load", str(model_path), "--pp", "8", "--tg", "4", "--depth", "20",
                     "--reps", "1", "--threads", "1", "--cpu", "--json"]) == 0  # fmt: skip
    r = json.loads(capsys.readouterr().out)
    assert r["depth"] == 20 and r["pp"] == 8 and r["tg"] == 4
    assert r["pp_tok_s"] > 0 and r["tg_tok_s"] > 0
    assert cli.main(["bench", "--load", str(model_path), "--pp", "8", "--tg", "0", "--depth", "20",
                     "--reps", "1", "--threads", "1", "--cpu"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "pp8 @ d20" in out
    assert cli.main(["bench", "--load", str(model_path), "--pp", "8", "--tg", "0",
                     "--reps", "1", "--threads", "1", "--cpu", "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["depth"] == 0


def test_depth_past_the_context_is_refused(model_path):
    from qora.format import read_qora

    with read_qora(model_path) as q:
        ctx = int(q.config["max_seq_len"])
    with pytest.raises(QoraError, match="--depth"):
        bench.main(["--load", str(model_path), "--pp", "8", "--tg", "8", "--depth", str(ctx)])


def test_read_bandwidth_probe():
    gb_s = bench.read_bandwidth(2, gib=0.05, reps=2)
    assert np.isfinite(gb_s) and gb_s > 0


def test_bandwidth_share_of_decode(model_path, capsys, monkeypatch):
    probes, real = [], bench.read_bandwidth

    def probe(threads, *a, **k):  # the real probe reads 2 GiB; its own test above covers it
        probes.append(threads)
        return real(threads, gib=0.05, reps=1)

    monkeypatch.setattr(bench, "read_bandwidth", probe)
    args = ["bench", "--load", str(model_path), "--pp", "0", "--tg", "4", "--reps", "1", "--threads", "1", "--cpu"]
    assert cli.main([*args, "--bandwidth", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert probes == [1]  # measured at the bench's own thread count
    assert r["read_gb_s"] > 0
    assert r["tg_bandwidth_pct"] == pytest.approx(100 * r["gb_s"] / r["read_gb_s"])
    assert cli.main([*args, "--bandwidth"]) == 0
    assert "memory read bandwidth, 1 threads" in capsys.readouterr().out
    assert cli.main([*args, "--json"]) == 0  # not asked: not measured
    r = json.loads(capsys.readouterr().out)
    assert r["read_gb_s"] is None and r["tg_bandwidth_pct"] is None and probes == [1, 1]
