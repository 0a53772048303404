"""The CLI and the chat REPL attacked through their inputs (issue 16): huge prompts from a file, stdin or
an argument, bytes that are not UTF-8 wherever text is read. Real processes, the tiny SmolLM3 fixture;
every refusal is one `qora: error:` line (or a usage error), never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qora import limits
from qora.convert import convert

FIX = Path(__file__).parent / "fixtures"
BAD = b"\xff\xfe\xc0\xaf not utf-8 \xed\xa0\x80"  # invalid start bytes, an overlong form, an encoded surrogate


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("attack-cli") / "tiny-smollm3-q8.qora"
    return convert(FIX / "tiny-smollm3", out, quant="q8", progress=False)


def qora(*args, stdin: bytes | None = None, timeout: float = 120):
    """Run `python -m qora ARGS`; (exit status, stdout, stderr, peak RSS of the child in MiB)."""
    probe = (
        "import resource, subprocess, sys; "
        "p = subprocess.run(sys.argv[1:], input=sys.stdin.buffer.read(), capture_output=True); "
        "sys.stdout.buffer.write(p.stdout); sys.stderr.buffer.write(p.stderr); "
        "sys.stderr.write('\\nRSS %d\\n' % (resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)); "
        "sys.exit(p.returncode)"
    )
    p = subprocess.run(
        [sys.executable, "-c", probe, sys.executable, "-m", "qora", *args],
        input=stdin or b"",
        capture_output=True,
        timeout=timeout,
    )
    err, _, rss = p.stderr.decode("utf-8", "replace").rpartition("\nRSS ")
    return p.returncode, p.stdout.decode("utf-8", "replace"), err.strip("\n"), int(rss)


def one_error_line(err: str, *words: str) -> None:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qora: error: "), err
    for w in words:
        assert w in lines[0], err


# ───── #7: prompt size ─────


def test_prompt_over_the_byte_limit_is_refused_unread(tiny, tmp_path):
    """60 MB through --prompt-file or stdin: refused after reading the limit, before any tokenizing."""
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.write(b"word " * (12 << 20))  # 60 MiB
    code, out, err, rss = qora("--load", str(tiny), "--raw", "--prompt-file", str(big))
    assert code == 1 and out == ""
    one_error_line(err, str(big), f"larger than {limits.CLI_MAX_PROMPT_BYTES} bytes")
    assert rss < 400, f"{rss} MiB"
    code, out, err, rss = qora("--load", str(tiny), "--raw", stdin=big.read_bytes())
    assert code == 1 and out == ""
    one_error_line(err, "stdin", "larger than")
    assert rss < 400, f"{rss} MiB"
    code, _, err, _ = qora("--load", str(tiny), "--prompt-file", "/dev/zero")  # never ends on its own
    assert code == 1
    one_error_line(err, "larger than")


@pytest.mark.parametrize("raw", [True, False])
@pytest.mark.parametrize("source", ["file", "stdin"])
def test_prompt_longer_than_the_context_is_refused_before_tokenizing(tiny, tmp_path, raw, source):
    """Under the byte limit but far beyond the context: refused from its length or a partial count,
    quickly and without the gigabytes that tokenizing all of it takes (60 MB took 8.9 GB)."""
    text = ("Lorem ipsum dolor sit amet, \u4e2d\u6587 \U0001f600 <|im_start|> " * 400_000).encode()  # ~16 MB
    text = text[: limits.CLI_MAX_PROMPT_BYTES - 16].decode("utf-8", "ignore").encode()
    args = ["--load", str(tiny), "--max-tokens", "1"] + (["--raw"] if raw else [])
    if source == "file":
        (tmp_path / "p.txt").write_bytes(text)
        code, out, err, rss = qora(*args, "--prompt-file", str(tmp_path / "p.txt"), timeout=60)
    else:
        code, out, err, rss = qora(*args, stdin=text, timeout=60)
    assert code == 1 and out == ""
    one_error_line(err, "the prompt is", "context")
    assert rss < 600, f"{rss} MiB"


def test_prompt_file_errors_are_one_line(tiny, tmp_path):
    code, _, err, _ = qora("--load", str(tiny), "--prompt-file", str(tmp_path / "missing.txt"))
    assert code == 1
    one_error_line(err, "cannot read", "missing.txt")
    code, _, err, _ = qora("--load", str(tiny), "--prompt-file", str(tmp_path))
    assert code == 1
    one_error_line(err, "cannot read")
    (tmp_path / "empty.txt").write_bytes(b" \n")
    code, _, err, _ = qora("--load", str(tiny), "--prompt-file", str(tmp_path / "empty.txt"))
    assert code == 1
    one_error_line(err, "empty")


# ───── #13: bytes that are not UTF-8 ─────


def test_invalid_utf8_prompt_is_a_clear_error(tiny, tmp_path):
    code, out, err, _ = qora("--load", str(tiny), "--max-tokens", "2", stdin=b"hello " + BAD)
    assert code == 1 and out == ""
    one_error_line(err, "stdin", "not UTF-8", "byte 6")
    (tmp_path / "bad.txt").write_bytes(b"hello " + BAD)
    code, out, err, _ = qora("--load", str(tiny), "--raw", "--prompt-file", str(tmp_path / "bad.txt"))
    assert code == 1 and out == ""
    one_error_line(err, "bad.txt", "not UTF-8")


@pytest.mark.parametrize("flag", ["--prompt", "--system", "--stop", "--length"])
def test_invalid_utf8_arguments_are_usage_errors(tiny, flag):
    bad = os.fsdecode(b"hi " + BAD)  # what Python makes of undecodable argv bytes: lone surrogates
    args = ["--load", str(tiny), "--max-tokens", "2"] + ([] if flag == "--prompt" else ["--prompt", "hi"])
    p = subprocess.run(
        [os.fsencode(sys.executable), b"-m", b"qora", *map(os.fsencode, args), flag.encode(), os.fsencode(bad)],
        capture_output=True,
        timeout=60,
    )
    err = p.stderr.decode("utf-8", "replace")
    assert p.returncode == 2 and "Traceback" not in err
    assert f"argument {flag}" in err and "not valid UTF-8" in err


def test_repl_invalid_utf8_input_is_replaced_and_said_once(tiny):
    stdin = b"/no_think\n" + BAD + b"\nsecond " + BAD + b'\n"""\nfenced ' + BAD + b'\n"""\n/exit\n'
    code, out, err, _ = qora("chat", "--load", str(tiny), "--max-tokens", "2", "--greedy", stdin=stdin)
    assert code == 0, err
    assert "Traceback" not in err and "Traceback" not in out
    assert err.count("not valid UTF-8") == 1 and "\ufffd" in err
    assert out.count(">>> ") >= 4  # every message was answered and the REPL went on


def test_repl_overlong_message_is_refused_and_the_repl_goes_on(tiny):
    line = b"x" * (limits.CLI_MAX_PROMPT_BYTES + 10)
    stdin = line + b"\n" + b'"""\n' + (b"y" * (1 << 20) + b"\n") * 17 + b'"""\n' + b"/help\n/exit\n"
    code, out, err, rss = qora("chat", "--load", str(tiny), "--max-tokens", "2", stdin=stdin)
    assert code == 0, err
    assert out.count(f"longer than {limits.CLI_MAX_PROMPT_BYTES} characters") == 2
    assert "/save FILE" in out and "Traceback" not in out + err
    assert rss < 600, f"{rss} MiB"


def test_raw_help_says_special_tokens_are_control_tokens():
    p = subprocess.run([sys.executable, "-m", "qora", "--help"], capture_output=True, text=True, timeout=60)
    text = " ".join(p.stdout.split())
    assert "--raw" in text and "control tokens on purpose" in text and "--prompt-file" in text


def test_repl_message_beyond_the_context_is_refused_before_tokenizing(tiny):
    """Under the size limit but far beyond the context: refused from a partial count, the REPL goes on."""
    stdin = ("\u4e2d\u6587 text " * 1_000_000).encode() + b"\n/help\n/exit\n"  # ~10 MB, one line
    code, out, err, rss = qora("chat", "--load", str(tiny), "--max-tokens", "2", stdin=stdin, timeout=60)
    assert code == 0, err
    assert "qora: error: the prompt is" in out and "/save FILE" in out and "Traceback" not in out + err
    assert rss < 600, f"{rss} MiB"
