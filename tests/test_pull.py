"""`qora pull REPO_ID`: the real download path (huggingface_hub.snapshot_download) against a fake hub on
loopback (HF_ENDPOINT), the real converter, and `--load REPO_ID` finding the result."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fake_hub import FakeHub

import qora
from qora import hub
from qora.convert import convert
from qora.errors import QoraError

FIX = Path(__file__).parent / "fixtures"
REPO = "test-org/tiny-smollm3"


@pytest.fixture(scope="module")
def repo_folder(tmp_path_factory):
    """The tiny sharded checkpoint as a hub repo would hold it, with files a pull must skip."""
    folder = tmp_path_factory.mktemp("repo") / "tiny-smollm3"
    shutil.copytree(FIX / "tiny-smollm3", folder)
    (folder / "README.md").write_text("# tiny\n")
    (folder / "onnx").mkdir()
    (folder / "onnx" / "model.safetensors").write_bytes(b"not for us")
    (folder / "original").mkdir()
    (folder / "original" / "consolidated.pth").write_bytes(b"not for us either")
    return folder


@pytest.fixture(scope="module")
def fake_hub(repo_folder, tmp_path_factory):
    bare = tmp_path_factory.mktemp("bare")
    (bare / "config.json").write_text((FIX / "tiny-smollm3" / "config.json").read_text())
    with FakeHub({REPO: repo_folder, "test-org/no-weights": bare}) as h:
        yield h


@pytest.fixture
def env(fake_hub, tmp_path):
    e = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    e.update(
        HF_ENDPOINT=fake_hub.url,
        HF_HUB_CACHE=str(tmp_path / "hf"),
        QORA_CACHE=str(tmp_path / "qora"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )
    return e


def qora_cmd(env, *args):
    return subprocess.run([sys.executable, "-m", "qora", *args], env=env, capture_output=True, text=True, timeout=120)


def test_pull_converts_once_and_load_finds_it(env, fake_hub, tmp_path):
    fake_hub.requests.clear()
    p = qora_cmd(env, "pull", REPO, "--quant", "q8")
    assert p.returncode == 0, p.stderr
    path = Path(p.stdout.strip())
    assert path == tmp_path / "qora" / "hub" / "test-org--tiny-smollm3" / "q8.qora" and path.is_file()
    fetched = {name for method, name in fake_hub.requests if method == "GET" and "/resolve/" in name}
    fetched = {name.rsplit("/", 1)[-1] for name in fetched}
    assert fetched == {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    }  # no README, nothing from subfolders
    assert (tmp_path / "hf" / "models--test-org--tiny-smollm3" / "snapshots").is_dir()  # the hub's own cache

    # the pulled file is the converter's output for that checkpoint
    direct = convert(FIX / "tiny-smollm3", tmp_path / "direct.qora", quant="q8", progress=False)
    ids = [1, 5, 9, 42, 7]
    with qora.load(path, threads=1) as a, qora.load(direct, threads=1) as b:
        np.testing.assert_array_equal(a.forward(ids), b.forward(ids))

    # pulling again: nothing converted, nothing downloaded again
    mtime = path.stat().st_mtime_ns
    fake_hub.requests.clear()
    again = qora_cmd(env, "pull", REPO, "--quant", "q8")
    assert again.returncode == 0 and again.stdout.strip() == str(path)
    assert "up to date" in again.stderr and path.stat().st_mtime_ns == mtime
    assert not [r for r in fake_hub.requests if r[0] == "GET" and "/resolve/" in r[1]]

    # offline, the cached snapshot is enough
    offline = qora_cmd({**env, "HF_HUB_OFFLINE": "1"}, "pull", REPO, "--quant", "q8")
    assert offline.returncode == 0 and "up to date" in offline.stderr

    # --load REPO_ID (and REPO_ID:QUANT) finds it
    run = qora_cmd(env, "--load", REPO, "--prompt", "hi", "--no-think", "--greedy", "--max-tokens", "3")
    assert run.returncode == 0, run.stderr
    run = qora_cmd(env, "--load", f"{REPO}:q8", "--raw", "--prompt", "hi", "--greedy", "--max-tokens", "3")
    assert run.returncode == 0, run.stderr
    missing = qora_cmd(env, "--load", f"{REPO}:q4", "--prompt", "hi")
    assert missing.returncode == 1
    assert missing.stderr.strip() == (
        f"qora: error: {REPO}:q4: not pulled as q4 (pulled: q8); run: qora pull {REPO} --quant q4"
    )


def test_pull_errors_are_one_line(env, tmp_path):
    p = qora_cmd(env, "pull", "test-org/nope")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert (
        p.stderr.strip().splitlines()[-1]
        == "qora: error: test-org/nope: no such model on the hub (a private one needs HF_TOKEN)"
    )
    p = qora_cmd(env, "pull", "test-org/no-weights")
    assert p.returncode == 1 and "no .safetensors weights" in p.stderr.splitlines()[-1]
    p = qora_cmd({**env, "HF_HUB_OFFLINE": "1"}, "pull", REPO)
    assert p.returncode == 1 and "not cached" in p.stderr.splitlines()[-1]
    p = qora_cmd(env, "pull", "not a repo id")
    assert p.returncode == 1 and "not a Hugging Face model id" in p.stderr
    p = qora_cmd(env, "--load", "test-org/never-pulled", "--prompt", "hi")
    assert p.returncode == 1
    assert (
        p.stderr.strip()
        == "qora: error: test-org/never-pulled: no such file, and not pulled yet; run: qora pull test-org/never-pulled"
    )


def test_find_pulled_picks_a_quant(tmp_path):
    folder = hub.repo_dir("org/m", tmp_path)
    folder.mkdir(parents=True)
    (folder / "q8.qora").write_bytes(b"")
    assert hub.find_pulled("org/m", tmp_path) == folder / "q8.qora"  # the only one
    (folder / "f16.qora").write_bytes(b"")
    with pytest.raises(QoraError, match="pulled as f16, q8: say which"):
        hub.find_pulled("org/m", tmp_path)
    (folder / "q4.qora").write_bytes(b"")
    assert hub.find_pulled("org/m", tmp_path) == folder / "q4.qora"  # the default when several
    assert hub.find_pulled("org/m:f16", tmp_path) == folder / "f16.qora"
    assert hub.looks_like_repo_id("HuggingFaceTB/SmolLM3-3B") and hub.looks_like_repo_id("a/b:q8")
    for not_id in ("model.qora", "dir/model.qora", "/abs/path", "a/b/c", "a/b:q9", "./x"):
        assert not hub.looks_like_repo_id(not_id), not_id
