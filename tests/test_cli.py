"""The command line (argparse, errors, exit codes, streaming) and the demo-model setup.

A fake model stands in for qora.load here; end-to-end runs on real weights live with the engine tests.
"""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

import qora
from qora import cli, demo
from qora.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


def qora_cmd(*args, stdin=subprocess.DEVNULL, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "qora", *args], capture_output=True, text=True, stdin=stdin, cwd=cwd or REPO
    )


# ───── argparse and errors (real subprocess) ─────


def test_unknown_flag_exits_2():
    p = qora_cmd("--bogus", "-p", "hi")
    assert p.returncode == 2
    assert "usage: qora" in p.stderr and "unrecognized arguments: --bogus" in p.stderr


def test_version(monkeypatch):
    p = qora_cmd("--version")
    assert p.returncode == 0
    lines = p.stdout.splitlines()
    assert lines[0].startswith(f"qora {qora.__version__} (Python ")
    info = qora.cpu_info()
    assert lines[1].startswith(f"cpu: isa {info['isa']} (")
    assert f"; decode walk {info['kernel']} ({info['kernel_reason']})" in lines[1]
    assert lines[2].startswith("openmp: ") and f"threads {info['threads']} " in lines[2]
    assert lines[3].startswith("vulkan: ")
    # Reported, not fatal: a bad QORA_ISA still prints the facts for the bug report.
    monkeypatch.setenv("QORA_ISA", "bogus")
    p = qora_cmd("--version")
    assert p.returncode == 0 and "cpu: isa none (QORA_ISA='bogus' is not one of" in p.stdout
    monkeypatch.setenv("QORA_KERNEL", "bogus")
    p = qora_cmd("--version")
    assert p.returncode == 0 and "decode walk none (QORA_KERNEL='bogus' is not one of seq, seg4, stream)" in p.stdout


def test_qora_error_is_one_line_exit_1(tmp_path):
    missing = tmp_path / "nope.qora"
    p = qora_cmd("--load", str(missing), "--prompt", "hi")
    assert p.returncode == 1
    assert p.stderr.splitlines() == [f"qora: error: {missing}: no such file"]
    assert "Traceback" not in p.stderr and p.stdout == ""


def test_convert_help():
    p = qora_cmd("convert", "--help")
    assert p.returncode == 0
    assert "usage: qora convert" in p.stdout
    for flag in ("-o", "--quant", "--embed-quant", "q4", "q8", "f16", "f32"):
        assert flag in p.stdout


def test_help_lists_every_flag():
    p = qora_cmd("--help")
    assert p.returncode == 0
    flags = "--load --prompt --max-tokens --think-budget --no-think --greedy --show-think --raw --cpu --gpu "
    flags += "--temperature --top-k --top-p --min-p --repeat-penalty --presence-penalty --seed --threads --stop "
    flags += "--ignore-eos --verbose --version"
    for flag in flags.split():
        assert flag in p.stdout, flag


# ───── in-process runs with a fake model ─────


def _tokenizer() -> Tokenizer:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    hf = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(["<|im_start|>", "<|im_end|>", "<think>", "</think>"])
    return Tokenizer(hf.to_str(), None, {})


TOK = _tokenizer()


class FakeEngine:
    max_seq_len = 4096

    def __init__(self, ids, interrupt_at=None):
        self.ids, self.interrupt_at, self.step = ids, interrupt_at, 0

    def forward(self, tokens, start_pos, all_logits=False):
        if self.interrupt_at is not None and self.step == self.interrupt_at:
            raise KeyboardInterrupt
        logits = np.full((1, TOK.vocab_size), -10.0, np.float32)
        logits[0, self.ids[self.step] if self.step < len(self.ids) else TOK.im_end_id] = 10.0
        self.step += 1
        return logits


class FakeModel:
    def __init__(self, *parts, interrupt_at=None):
        ids = []
        for p in parts:
            ids += TOK.encode(p)
        self.tokenizer, self.config, self.generation_defaults = TOK, {}, {}
        self.engine = FakeEngine(ids, interrupt_at)
        self.closed = False

    def reset(self):
        pass

    def close(self):
        self.closed = True


@pytest.fixture
def fake_load(monkeypatch, tmp_path):
    """Replace qora.load; returns the list of (path, kwargs) it was called with."""
    calls = []
    state = {"model": FakeModel("Hello!")}

    def load(path, **kwargs):
        calls.append((Path(path), kwargs))
        return state["model"]

    monkeypatch.setattr(qora, "load", load)
    model_file = tmp_path / "m.qora"
    model_file.write_bytes(b"QORA")
    return types.SimpleNamespace(calls=calls, state=state, path=model_file)


def test_streams_answer_and_thinking(fake_load, capsys):
    fake_load.state["model"] = FakeModel("<think>pondering</think>\n\nThe answer.")
    rc = cli.main(["--load", str(fake_load.path), "-p", "q", "--greedy", "--show-think", "--threads", "3", "--cpu"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert out == "The answer.\n"  # leading blank lines after </think> dropped, line ended
    assert "pondering" in err
    assert fake_load.calls == [(fake_load.path, {"threads": 3, "device": "cpu"})]
    assert fake_load.state["model"].closed


@pytest.mark.parametrize("precision", ["q8", "f32"])
def test_precision_flag_reaches_qora_load(fake_load, capsys, precision):
    rc = cli.main(["--load", str(fake_load.path), "-p", "q", "--greedy", "--precision", precision])
    assert rc == 0
    assert fake_load.calls[0][1]["precision"] == precision


def test_bad_precision_is_a_usage_error(fake_load, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--load", str(fake_load.path), "-p", "q", "--precision", "f16"])
    assert "invalid choice" in capsys.readouterr().err


def test_thinking_hidden_by_default_and_verbose_stats(fake_load, capsys, monkeypatch):
    monkeypatch.setattr(qora, "cpu_info", lambda: {"isa": "avx2", "threads": 4})
    monkeypatch.setenv("QORA_VK_ALLOW_CPU", "1")  # --gpu stays --gpu where the only device is lavapipe
    fake_load.state["model"] = FakeModel("<think>secret</think>Shown")
    rc = cli.main(["--load", str(fake_load.path), "-p", "q", "--greedy", "--verbose", "--gpu"])
    out, err = capsys.readouterr()
    assert rc == 0 and out == "Shown\n"
    assert "secret" not in err and "secret" not in out
    assert "isa=avx2" in err
    assert "prompt:" in err and "tok/s" in err and "generated:" in err and "finish: stop" in err
    assert fake_load.calls[0][1]["device"] == "gpu"


def test_stop_and_stdin_prompt(fake_load, capsys, monkeypatch):
    import io

    fake_load.state["model"] = FakeModel("one END two")
    monkeypatch.setattr(sys, "stdin", io.StringIO("prompt from a pipe"))
    rc = cli.main(["--load", str(fake_load.path), "--stop", "END", "--stop", "XX", "--greedy"])
    assert rc == 0
    assert capsys.readouterr().out == "one \n"


def test_ignore_eos_runs_to_max_tokens(fake_load, capsys):
    fake_load.state["model"] = FakeModel("Hi.")  # then the end of turn, which --ignore-eos masks
    rc = cli.main(["--load", str(fake_load.path), "--prompt", "x", "--greedy", "--ignore-eos", "--max-tokens", "7"])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.startswith("Hi.") and len(TOK.encode(out.rstrip("\n"))) == 7


def test_empty_stdin_prompt_is_an_error(fake_load, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("  \n"))
    assert cli.main(["--load", str(fake_load.path)]) == 1
    assert capsys.readouterr().err == "qora: error: the prompt read from stdin is empty\n"


def test_bad_option_value_is_a_usage_error(fake_load, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--load", str(fake_load.path), "-p", "q", "--top-p", "2"])
    assert e.value.code == 2
    assert "top_p must be <= 1.0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["-p", "q", "--max-tokens", "0"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["-p", "q", "--cpu", "--gpu"])
    assert e.value.code == 2


def test_ctrl_c_keeps_output_and_exits_130(fake_load, capsys):
    fake_load.state["model"] = FakeModel("partial answer", interrupt_at=5)
    rc = cli.main(["--load", str(fake_load.path), "-p", "q", "--greedy", "--verbose"])
    out, err = capsys.readouterr()
    assert rc == 130
    # Prefill + 4 decode calls sampled "parti"; Ctrl-C hit while feeding "i". Output kept, line ended.
    assert out == "parti\n"
    assert "finish: interrupted" in err


def test_model_resolution(fake_load, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    demo_path = tmp_path / "cache" / demo.DEMO_FILE
    monkeypatch.setattr(demo, "ensure_demo_model", lambda: demo_path)
    assert cli.main(["-p", "q", "--greedy"]) == 0
    assert fake_load.calls[-1][0] == demo_path  # no --load, no ./model.qora: the demo model
    (tmp_path / "model.qora").write_bytes(b"QORA")
    assert cli.main(["-p", "q", "--greedy"]) == 0
    assert fake_load.calls[-1][0] == Path("model.qora")
    (tmp_path / "folder").mkdir()
    assert cli.main(["--load", "folder", "-p", "q"]) == 1
    assert "convert it first" in capsys.readouterr().err


def test_convert_subcommand(monkeypatch, tmp_path, capsys):
    seen = {}

    def convert(src, out, quant="q4", embed_quant=None, progress=False):
        seen.update(src=src, out=out, quant=quant, embed_quant=embed_quant, progress=progress)
        Path(out).write_bytes(b"x" * 10)

    monkeypatch.setitem(sys.modules, "qora.convert", types.SimpleNamespace(convert=convert))
    src = tmp_path / "SmolLM3-3B"
    src.mkdir()
    out = tmp_path / "o.qora"
    assert cli.main(["convert", str(src), "-o", str(out), "--quant", "q8", "--embed-quant", "f16"]) == 0
    assert seen == {"src": str(src), "out": str(out), "quant": "q8", "embed_quant": "f16", "progress": True}
    assert "wrote" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert cli.main(["convert", str(src)]) == 0
    assert seen["out"] == "SmolLM3-3B-q4.qora" and seen["quant"] == "q4" and seen["embed_quant"] is None
    capsys.readouterr()
    assert cli.main(["convert", str(tmp_path / "missing")]) == 1
    assert capsys.readouterr().err.startswith("qora: error: ")
    with pytest.raises(SystemExit) as e:
        cli.main(["convert", str(src), "--quant", "q3"])
    assert e.value.code == 2


# ───── system limits ─────


def test_system_limits():
    from qora import system

    gib = 1024**3
    assert system.default_limits(2 * gib) == (512, 256)
    assert system.default_limits(0) == (512, 256)
    assert system.default_limits(4 * gib) == (1024, 1024)
    assert system.default_limits(int(7.9 * gib)) == (1024, 1024)
    assert system.default_limits(8 * gib) == (2048, 2048)
    assert system.default_limits(12 * gib) == (8192, 8192)
    assert system.default_limits(512 * gib) == (8192, 8192)
    assert system.physical_cores() >= 1
    assert system.available_ram() > 0 and system.total_ram() >= system.available_ram()
    assert system.default_limits() in [row[1:] for row in system.LIMITS_TABLE]


def test_a_stopped_loop_is_said_once_without_verbose(fake_load, capsys):
    fake_load.state["model"] = FakeModel("Paris is the capital of France. " * 12)
    rc = cli.main(["--load", str(fake_load.path), "-p", "q", "--greedy", "--no-think"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.count("Paris is the capital of France.") == 3
    assert err.count("repeating itself") == 1 and "finish:" not in err


def test_bare_qora_at_a_terminal_starts_the_chat(monkeypatch):
    import io

    from qora import chat

    seen = []
    monkeypatch.setattr(chat, "main", lambda argv: seen.append(argv) or 0)
    tty = io.StringIO()
    tty.isatty = lambda: True
    monkeypatch.setattr(sys, "stdin", tty)
    assert cli.main(["--greedy"]) == 0 and seen == [["--greedy"]]
    with pytest.raises(SystemExit):  # --raw has no conversation: still a prompt is needed
        cli.main(["--raw"])
    assert len(seen) == 1


def test_think_flags_on_a_model_without_thinking_are_said_once(fake_load, capsys):
    tok = _tokenizer()
    tok.think_id = tok.end_think_id = None
    fake_load.state["model"] = FakeModel("Hi.")
    fake_load.state["model"].tokenizer = tok
    rc = cli.main(["--load", str(fake_load.path), "-p", "q", "--no-think", "--think-budget", "5"])
    err = capsys.readouterr().err
    assert rc == 0 and err.count("no thinking mode") == 1 and "--no-think and --think-budget" in err


def test_gpu_flag_on_a_software_vulkan_device_runs_on_the_cpu(monkeypatch, capfd):
    from qora.engine import select, vulkan

    lavapipe = {"name": "llvmpipe (LLVM 15)", "type": "cpu", "usable": True, "index": 0}
    monkeypatch.setattr(vulkan, "devices", lambda: [lavapipe])
    for var in ("QORA_VK_ALLOW_CPU", "QORA_VK_DEVICE"):
        monkeypatch.delenv(var, raising=False)
    assert select.user_device("gpu") == "cpu"
    err = capfd.readouterr().err
    assert err.count("CPU emulation") == 1 and "llvmpipe" in err
    assert select.user_device("auto") == "auto" and select.user_device("cpu") == "cpu"
    monkeypatch.setenv("QORA_VK_ALLOW_CPU", "1")  # the user insists
    assert select.user_device("gpu") == "gpu"
    monkeypatch.delenv("QORA_VK_ALLOW_CPU")
    monkeypatch.setenv("QORA_VK_DEVICE", "0")
    assert select.user_device("gpu") == "gpu"
    monkeypatch.delenv("QORA_VK_DEVICE")
    monkeypatch.setattr(vulkan, "devices", lambda: [lavapipe, {**lavapipe, "type": "discrete", "index": 1}])
    assert select.user_device("gpu") == "gpu"  # a real GPU is there
