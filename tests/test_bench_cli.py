"""`qora bench`: the llama-bench-like report on the tiny fixture models (text and JSON), the weight
bytes behind its GB/s, and argument errors. Nothing here asserts a speed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from qora import bench, cli, quant
from qora.engine import ISA_NAMES
from qora.errors import QoraError
from qora.format import read_qora

FIX = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]
JSON_KEYS = {"pp_tok_s", "tg_tok_s", "pp_std", "tg_std", "gb_s", "isa", "threads"}


@pytest.fixture(scope="module")
def models(tiny_model):
    """Tied-embedding SmolLM3 in q4 and untied Llama in q8, converted from the fixtures (conftest.py)."""
    return {"smollm3": tiny_model("tiny-smollm3", "q4"), "llama": tiny_model("tiny-llama", "q8")}


def run_main(capsys, *args):
    rc = cli.main(["bench", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def bench_json(capsys, *args) -> dict:
    rc, out, err = run_main(capsys, *args, "--json")
    assert rc == 0, err
    return json.loads(out)


def test_json_report(models, capsys):
    r = bench_json(capsys, "--load", models["smollm3"], "--pp", 24, "--tg", 8, "--reps", 2, "--threads", 1, "--cpu")
    assert JSON_KEYS <= set(r)
    assert r["threads"] == 1 and r["device"] == "cpu"
    assert isinstance(r["isa"], str) and r["isa"] in ISA_NAMES
    for test in ("pp", "tg"):
        assert isinstance(r[f"{test}_tok_s"], float) and r[f"{test}_tok_s"] > 0
        assert isinstance(r[f"{test}_std"], float) and r[f"{test}_std"] >= 0
        assert len(r[f"{test}_samples"]) == 2 and all(s > 0 for s in r[f"{test}_samples"])
        assert r[f"{test}_tok_s"] == pytest.approx(sum(r[f"{test}_samples"]) / 2)
    assert r["pp"] == 24 and r["tg"] == 8 and r["reps"] == 2
    assert r["gb_s"] > 0 and r["gb_s"] == pytest.approx(r["weight_bytes_per_token"] * r["tg_tok_s"] / 1e9)
    assert r["model"] == "tiny-smollm3-q4.qora" and r["weight_type"] == "q4"


def test_threads_as_given(models, capsys):
    r = bench_json(capsys, "--load", models["llama"], "--pp", 8, "--tg", 4, "--reps", 1, "--threads", 2, "--cpu")
    assert r["threads"] == 2 and r["pp_std"] == 0.0 and r["tg_std"] == 0.0  # one run: no spread


def test_text_report(models, capsys):
    rc, out, err = run_main(capsys, "--load", models["llama"], "--pp", 16, "--tg", 8, "--threads", 1, "--cpu")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("| model") and "t/s" in lines[0] and "GB/s" in lines[0]
    rows = {ln.split("|")[6].strip(): [c.strip() for c in ln.split("|")[1:-1]] for ln in lines[2:4]}
    assert set(rows) == {"pp16", "tg8"}
    for cells in rows.values():
        assert cells[0] == "tiny-llama-q8" and cells[4] == "1" and cells[3].startswith("CPU (")
        mean, std = (float(x) for x in cells[6].split("±"))
        assert mean > 0 and std >= 0
    assert rows["pp16"][7] == "-" and float(rows["tg8"][7]) > 0
    assert "llama, 3 layers, dim 64, q8 weights" in out
    assert "pp16: 1 warm-up + 3 timed runs" in err  # progress on stderr, the report alone on stdout


def test_pp_zero_skips_prefill(models, capsys):
    r = bench_json(capsys, "--load", models["smollm3"], "--pp", 0, "--tg", 4, "--reps", 1, "--threads", 1, "--cpu")
    assert r["pp_tok_s"] is None and r["pp_std"] is None and r["pp_samples"] == []
    assert r["tg_tok_s"] > 0 and r["gb_s"] > 0
    rc, out, _ = run_main(capsys, "--load", models["smollm3"], "--pp", 4, "--tg", 0, "--reps", 1, "--threads", 1, "-q")
    assert rc == 0 and "| pp4 " in out and "| tg" not in out


def _gpu_usable() -> bool:
    from qora.engine import vulkan

    try:
        vulkan.choose_device(vulkan.devices(), required=True)
    except QoraError:
        return False
    return True


@pytest.mark.skipif(not _gpu_usable(), reason="no usable Vulkan device (CI installs lavapipe)")
def test_gpu_report(models, capsys, monkeypatch):
    monkeypatch.setenv("QORA_VK_ALLOW_CPU", "1")  # --gpu on lavapipe: run it there anyway
    r = bench_json(capsys, "--load", models["smollm3"], "--pp", 8, "--tg", 4, "--reps", 1, "--gpu")
    assert r["device"] == "vulkan" and r["isa"] == "vulkan" and r["device_name"]
    assert r["pp_tok_s"] > 0 and r["tg_tok_s"] > 0 and r["gb_s"] > 0
    rc, out, _ = run_main(capsys, "--load", models["smollm3"], "--pp", 8, "--tg", 0, "--reps", 1, "--gpu", "-q")
    assert rc == 0 and f"Vulkan ({r['device_name']}," in out  # the name, then the prefill kernel family


def _expected_weight_bytes(path) -> int:
    """From the config alone: every layer matrix and norm, the final norm, the LM head."""
    with read_qora(path) as q:
        c, dtype = q.config, q.tensor_info["layers.0.wq"]["dtype"]
        head_dtype = q.tensor_info["output" if "output" in q.tensor_info else "tok_embeddings"]["dtype"]
    d, h, qd, kv = c["dim"], c["hidden_dim"], c["n_heads"] * c["head_dim"], c["n_kv_heads"] * c["head_dim"]
    shapes = [(qd, d), (kv, d), (kv, d), (d, qd), (h, d), (h, d), (d, h)]
    layer = sum(quant.nbytes(dtype, s) for s in shapes) + 2 * 4 * d
    return c["n_layers"] * layer + 4 * d + quant.nbytes(head_dtype, (c["vocab_size"], d))


@pytest.mark.parametrize("kind", ["smollm3", "llama"])
def test_weight_bytes_count_the_lm_head_once(models, kind):
    size, params = bench.model_sizes(models[kind])
    assert size == _expected_weight_bytes(models[kind])
    with read_qora(models[kind]) as q:
        c = q.config
        assert bench.model_sizes(q) == (size, params)  # an open file or a path
    d, h = c["dim"], c["hidden_dim"]
    per_layer = d * (2 * c["n_heads"] * c["head_dim"] + 2 * c["n_kv_heads"] * c["head_dim"]) + 3 * d * h
    assert params == c["n_layers"] * per_layer + c["vocab_size"] * d


@pytest.mark.parametrize(
    "args, status, message",
    [
        (["--reps", "0"], 2, "argument --reps: must be >= 1"),
        (["--pp", "-1"], 2, "argument --pp: must be >= 0"),
        (["--tg", "many"], 2, "argument --tg: expected an integer"),
        (["--threads", "0"], 2, "argument --threads: must be >= 1"),
        (["--cpu", "--gpu"], 2, "not allowed with argument"),
        (["--bogus"], 2, "unrecognized arguments: --bogus"),
        (["--pp", "0", "--tg", "0"], 1, "qora: error: nothing to measure"),
        (["--pp", "200", "--tg", "57"], 1, "qora: error: --depth 0 + --pp 200 + --tg 57 = 257 tokens exceed the model"),
    ],
)
def test_argument_errors(models, capsys, args, status, message):
    argv = ["bench", "--load", str(models["smollm3"]), *args]
    if status == 2:  # argparse: usage and exit 2
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
    else:
        assert cli.main(argv) == status
    out, err = capsys.readouterr()
    assert message in err and "Traceback" not in err and out == ""


def test_console_command(models):
    """The real `python -m qora bench` process: exit status, JSON on stdout, a bad model path."""
    cmd = [sys.executable, "-m", "qora", "bench", "--load", str(models["llama"]), "--pp", "8", "--tg", "4"]
    r = subprocess.run([*cmd, "--reps", "1", "--threads", "1", "--json"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert JSON_KEYS <= set(report) and all(math.isfinite(report[k]) for k in ("pp_tok_s", "tg_tok_s", "gb_s"))
    r = subprocess.run([*cmd[:4], "--load", str(REPO / "no-such.qora")], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1 and r.stderr.strip().endswith("no-such.qora: no such file")
    r = subprocess.run([*cmd[:4], "--pp", "x"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "qora bench: error: argument --pp" in r.stderr
