"""Files as a hostile user (or a hostile model folder) would hand them to qora (issue 16: files and
numbers): planted symlinks and temp names, non-regular outputs and inputs, the input as output,
symlinks out of a model folder, GGUF metadata built to blow up memory, NaN/Inf weights and configs.
Every test runs the real converter / loader / CLI on real files and checks what is left on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fuzz"))

import corpus_tools as ct  # noqa: E402

import qora  # noqa: E402
from qora import limits  # noqa: E402
from qora.chat import Conversation  # noqa: E402
from qora.convert import convert  # noqa: E402
from qora.errors import FormatError, QoraError  # noqa: E402
from qora.format import read_qora  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = json.loads((ct.CORPUS / "MANIFEST.json").read_text())


def _cli(*args, cwd, timeout=60):
    env = dict(os.environ, PYTHONPATH=str(ROOT), QORA_CACHE=str(Path(cwd) / "cache"))
    return subprocess.run(
        [sys.executable, "-m", "qora", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _one_error(r, pattern):
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("qora: error: "), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert re.search(pattern, lines[-1]), lines[-1]


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def gguf(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(ct.gguf_bytes())
    return p


@pytest.fixture
def hf(tmp_path):
    return ct.unpack_hf(ct.hf_entry(), tmp_path / "hf")


@pytest.fixture
def victim(tmp_path):
    v = tmp_path / "victim.txt"
    v.write_text("precious\n")
    return v


# ───── 1. predictable temporary names ─────


def test_symlink_tmp_not_followed(tmp_path, gguf, victim):
    out = tmp_path / "out.qora"
    # every name an older qora (or a guess at this one) would use for its temporary file
    for name in ("out.qora.tmp", "out.qora.partial", "out.qora.data.tmp", ".out.qora.tmp", "out.qora~"):
        (tmp_path / name).symlink_to(victim)
    convert(gguf, out, quant="q8", progress=False)
    assert victim.read_text() == "precious\n"
    read_qora(out).close()
    assert out.is_file() and not out.is_symlink()
    leftovers = {p.name for p in tmp_path.iterdir()} - {"model.gguf", "out.qora", "victim.txt"}
    assert all((tmp_path / n).is_symlink() for n in leftovers)  # only the planted links, nothing new


def test_symlink_output_replaced_not_written_through(tmp_path, gguf, victim):
    out = tmp_path / "out.qora"
    out.symlink_to(victim)
    convert(gguf, out, quant="q8", progress=False)
    assert victim.read_text() == "precious\n"  # the link itself was replaced by the new file
    assert not out.is_symlink()
    read_qora(out).close()


def test_symlink_tmp_not_followed_by_chat_save(tiny_conversation, tmp_path, victim):
    path = tmp_path / "chat.json"
    for name in ("chat.json.tmp", ".chat.json.tmp", "chat.json.partial"):
        (tmp_path / name).symlink_to(victim)
    tiny_conversation.save(str(path))
    assert victim.read_text() == "precious\n"
    assert json.loads(path.read_text())["format"] == "qora-chat"
    path.unlink()
    path.symlink_to(victim)  # saving over a link replaces the link
    tiny_conversation.save(str(path))
    assert victim.read_text() == "precious\n" and not path.is_symlink()


@pytest.fixture
def tiny_conversation():
    from qora.generate import GenerationOptions

    class _Model:
        path = Path("tiny.qora")

    conv = Conversation.__new__(Conversation)
    conv.model, conv.today, conv.enable_thinking = _Model(), "2026-01-01", False
    conv.messages = [{"role": "user", "content": "hi"}]
    conv.options = GenerationOptions()
    return conv


def test_pull_manifest_written_safely(tmp_path, monkeypatch, victim):
    from qora import safeio

    target = tmp_path / "q4.json"
    (tmp_path / "q4.json.tmp").symlink_to(victim)
    safeio.write_bytes(target, b"{}\n")
    assert victim.read_text() == "precious\n" and target.read_text() == "{}\n"


# ───── 2. outputs that are not regular files ─────


def _special_outputs(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    link_fifo = tmp_path / "link-to-fifo"
    link_fifo.symlink_to(fifo)
    link_null = tmp_path / "link-to-null"
    link_null.symlink_to("/dev/null")
    return sock, [(fifo, "FIFO"), (sock_path, "socket"), (link_fifo, "FIFO"), (link_null, "character device")]


def test_output_not_regular_file_refused(tmp_path, gguf):
    sock, cases = _special_outputs(tmp_path)
    try:
        if os.geteuid() == 0:
            cases.append((Path("/dev/null"), "character device"))
        for out, kind in cases:
            before = os.lstat(out)
            with pytest.raises(QoraError, match=kind):
                convert(gguf, out, quant="q8", progress=False)
            after = os.lstat(out)
            assert stat.S_IFMT(after.st_mode) == stat.S_IFMT(before.st_mode) and after.st_ino == before.st_ino
        assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    finally:
        sock.close()


def test_output_not_regular_file_refused_cli(tmp_path, gguf):
    sock, cases = _special_outputs(tmp_path)
    try:
        for out, kind in cases[:2]:
            r = _cli("convert", str(gguf), "-o", str(out), cwd=tmp_path)
            _one_error(r, kind)
    finally:
        sock.close()


def test_output_not_regular_file_refused_by_chat_save(tiny_conversation, tmp_path):
    sock, cases = _special_outputs(tmp_path)
    try:
        for out, kind in cases:
            with pytest.raises(QoraError, match=kind):
                tiny_conversation.save(str(out))
    finally:
        sock.close()


# ───── 3. the input as the output ─────


def test_output_same_as_input_refused(tmp_path, gguf, hf):
    hard = tmp_path / "hard.gguf"
    os.link(gguf, hard)
    soft = tmp_path / "soft.qora"
    soft.symlink_to(gguf)
    before = _digest(gguf)
    for out in (gguf, hard, soft, tmp_path / "." / "model.gguf"):
        with pytest.raises(QoraError, match="is the input file itself"):
            convert(gguf, out, quant="q8", progress=False)
    assert _digest(gguf) == before
    files = {p.name: _digest(p) for p in hf.iterdir()}
    for name in files:
        with pytest.raises(QoraError, match="is the input file itself"):
            convert(hf, hf / name, quant="q8", progress=False)
    assert {p.name: _digest(p) for p in hf.iterdir()} == files
    r = _cli("convert", str(gguf), "-o", str(hard), cwd=tmp_path)
    _one_error(r, "is the input file itself")
    assert _digest(gguf) == before


def _hf_sharded(tmp_path) -> Path:
    dst = tmp_path / "m"
    dst.mkdir()
    for f in (ROOT / "tests/fixtures/tiny-smollm3").iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_output_same_as_input_refused_whatever_names_the_source(tmp_path, gguf):
    """The files checked against the output are every file the source reads, whether the source is
    named by its folder, its config.json, a path with a trailing slash or '.', or a link to any of them."""
    m = _hf_sharded(tmp_path)
    (tmp_path / "link").symlink_to(m)
    forms = [m, m / "config.json", str(m) + "/", m / "." / "config.json", tmp_path / "link" / "config.json"]
    files = {p.name: _digest(p) for p in m.iterdir()}
    for src in forms:
        for name in files:
            with pytest.raises(QoraError, match="is the input file itself"):
                convert(src, m / name, quant="q8", progress=False)
    assert {p.name: _digest(p) for p in m.iterdir()} == files
    # a GGUF called config.json is a GGUF: its own file is the input
    g = tmp_path / "g"
    g.mkdir()
    (g / "config.json").write_bytes(gguf.read_bytes())
    with pytest.raises(QoraError, match="is the input file itself"):
        convert(g / "config.json", g / "config.json", quant="q8", progress=False)


def test_source_files_cover_every_file_the_source_opens(tmp_path, gguf):
    """source_files(src) is a superset of what open_source(src) actually opens (an audit hook sees
    every open), for every way of naming a source."""
    from qora.convert import open_source, source_files

    m = _hf_sharded(tmp_path)
    seen = []
    active = []

    def hook(event, args):
        if active and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            seen.append(os.fsdecode(args[0]))

    sys.addaudithook(hook)
    for src in (m, m / "config.json", gguf):
        seen.clear()
        active.append(1)
        try:
            open_source(src).close()
        finally:
            active.clear()
        inputs = {os.path.realpath(p) for p in source_files(src)}
        opened = {os.path.realpath(p) for p in seen if os.path.isfile(p) and not p.startswith(("/proc", sys.prefix))}
        opened = {p for p in opened if p.startswith(str(tmp_path.resolve()))}
        assert opened and opened <= inputs, (src, opened - inputs)


# ───── 4. a folder as the output ─────


def test_output_folder_clear_error(tmp_path, gguf):
    for out, pattern in ((".", "is a folder"), (str(tmp_path), "is a folder"), ("sub/", "is a folder"),
                         ("new/", "is a folder"), ("new/.", "is a folder"), ("sub/..", "is a folder"),
                         ("~/", "is a folder"),
                         ("missing/out.qora", "folder .*missing does not exist")):  # fmt: skip
        (tmp_path / "sub").mkdir(exist_ok=True)
        r = _cli("convert", str(gguf), "-o", out, cwd=tmp_path)
        _one_error(r, pattern)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "sub"]
    for out in (str(tmp_path / "new") + "/", str(tmp_path / "new") + "/."):
        with pytest.raises(QoraError, match="is a folder"):
            convert(gguf, out, quant="q8", progress=False)
    assert not (tmp_path / "new").exists()


# ───── 5. symlinks out of a model folder ─────


@pytest.mark.parametrize(
    "name",
    [
        "chat_template.jinja",
        "tokenizer.json",
        "tokenizer_config.json",
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ],  # fmt: skip
)
def test_symlink_outside_model_folder_refused(tmp_path, hf, name):
    outside = tmp_path / "secret"
    outside.mkdir()
    target = outside / name
    if (hf / name).exists():
        (hf / name).rename(target)
    else:
        target.write_text("{}" if name.endswith(".json") else "SECRET {{ messages }}")
    (hf / name).symlink_to(target)
    with pytest.raises(FormatError, match="outside the model folder"):
        convert(hf, tmp_path / "out.qora", quant="q8", progress=False)
    assert not (tmp_path / "out.qora").exists()


def test_symlink_inside_model_folder_and_hub_cache_allowed(tmp_path, hf):
    # a Hugging Face cache snapshot links every file to ../../blobs/: that is inside the model's folder
    repo = tmp_path / "models--org--tiny"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for p in hf.iterdir():
        blob = repo / "blobs" / hashlib.sha1(p.name.encode()).hexdigest()
        blob.write_bytes(p.read_bytes())
        (snap / p.name).symlink_to(os.path.relpath(blob, snap))
    convert(snap, tmp_path / "out.qora", quant="q8", progress=False)
    read_qora(tmp_path / "out.qora").close()


# ───── 12. inputs that are not regular files ─────


def test_fifo_or_device_input_refused(tmp_path, hf, tiny_conversation):
    fifo = tmp_path / "model.qora"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    for src in (fifo, Path("/dev/zero")):
        with pytest.raises(FormatError, match="not a regular file"):
            qora.load(src)
        with pytest.raises(FormatError, match="not a regular file"):
            read_qora(src)
        with pytest.raises(QoraError, match="not a regular file"):
            convert(src, tmp_path / "out.qora", progress=False)
        with pytest.raises(QoraError, match="not a regular file"):
            tiny_conversation.load(str(src))
    for name in ("config.json", "tokenizer.json", "chat_template.jinja", "model.safetensors"):
        folder = ct.unpack_hf(ct.hf_entry(), tmp_path / f"hf-{name}")
        (folder / name).unlink(missing_ok=True)
        os.mkfifo(folder / name)
        with pytest.raises(FormatError, match="not a regular file"):
            convert(folder, tmp_path / "out.qora", progress=False)
    link = tmp_path / "zero.gguf"
    link.symlink_to("/dev/zero")
    with pytest.raises(QoraError, match="not a regular file"):
        convert(link, tmp_path / "out.qora", progress=False)
    assert time.monotonic() - t0 < 30  # nothing blocked on a FIFO nor read /dev/zero for ever


def test_fifo_or_device_input_refused_cli(tmp_path):
    fifo = tmp_path / "m.qora"
    os.mkfifo(fifo)
    for src in (fifo, "/dev/zero"):
        r = _cli("--load", str(src), "--prompt", "hi", "--max-tokens", "1", cwd=tmp_path, timeout=60)
        _one_error(r, "not a regular file")
        r = _cli("convert", str(src), "-o", str(tmp_path / "o.qora"), cwd=tmp_path, timeout=60)
        _one_error(r, "not a regular file")


# ───── 6. GGUF metadata: many arrays, each within its own limit ─────


def _many_arrays_gguf(path: Path, total_bytes: int, per_array: int = 1 << 16) -> None:
    """A valid tiny model plus total_bytes of small uint8 arrays (raw entries: fast to build)."""
    one = struct.pack("<IIQ", ct.ARR, ct.U8, per_array) + bytes(per_array)
    extra = [(None, ct.gguf_str(f"x.pad{i}") + one, None) for i in range(total_bytes // per_array)]
    path.write_bytes(ct.gguf_bytes(ct.gguf_metadata() + extra))


def test_gguf_metadata_total_bounded(tmp_path):
    src = tmp_path / "many.gguf"
    _many_arrays_gguf(src, 16 << 20)  # 16 MiB: 256 arrays of 64 Ki uint8, each far below GGUF_MAX_ARRAY
    assert src.stat().st_size > 16 << 20
    code = (
        "import sys, resource, time\n"
        "from qora.convert import convert\n"
        "from qora.errors import QoraError\n"
        "t = time.monotonic()\n"
        "try:\n"
        f"    convert({str(src)!r}, {str(tmp_path / 'o.qora')!r}, progress=False)\n"
        "except QoraError as e:\n"
        "    print('ERR', e)\n"
        "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, 'T', time.monotonic() - t)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r"RSS (\d+) T ([\d.]+)", r.stdout)
    rss_mib, seconds = int(m.group(1)) / 1024, float(m.group(2))
    assert "ERR" in r.stdout and re.search(r"more than \d+ elements in all", r.stdout), r.stdout
    assert rss_mib < 600 and seconds < 60, (rss_mib, seconds)  # was 11 GB and minutes (GGUFReader)


def test_gguf_metadata_total_bytes_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "GGUF_MAX_METADATA_BYTES", 4096)  # the real one is 256 MiB
    src = tmp_path / "big.gguf"
    src.write_bytes(ct.gguf_bytes(ct.gguf_metadata() + [("x.blob", ct.STR, "y" * 8192)]))
    with pytest.raises(FormatError, match="metadata is larger than the 4096 byte limit"):
        convert(src, tmp_path / "o.qora", progress=False)


# ───── numbers: NaN/Inf weights and configs, rope_theta, safetensors offsets ─────


@pytest.mark.parametrize(
    "key",
    [k for k in MANIFEST if re.search(r"nan|inf_|rope_theta|freq_base|eps_huge|offsets_(overlap|reversed)", k)],
)
def test_nonfinite_numbers_and_offsets_refused(tmp_path, key):
    data = (ct.CORPUS / key).read_bytes()
    target = key.split("/", 1)[0]
    if target == "hf":
        src = ct.unpack_hf(data, tmp_path / "model")
        r = _cli("convert", str(src), "-o", str(tmp_path / "o.qora"), cwd=tmp_path)
    elif target == "gguf":
        src = tmp_path / "m.gguf"
        src.write_bytes(data)
        r = _cli("convert", str(src), "-o", str(tmp_path / "o.qora"), cwd=tmp_path)
    else:
        src = tmp_path / "m.qora"
        src.write_bytes(data)
        r = _cli("--load", str(src), "--prompt", "hi", "--max-tokens", "1", cwd=tmp_path)
    _one_error(r, MANIFEST[key])
    assert not (tmp_path / "o.qora").exists()


def test_nonfinite_weight_written_by_writer_refused(tmp_path):
    from qora.format import QoraWriter

    header, blobs, end = ct.split_qora(ct.qora_bytes())
    cfg = header["config"]
    f = read_qora(_write(tmp_path / "good.qora", ct.qora_bytes()))
    import numpy as np

    w = QoraWriter(tmp_path / "w.qora", cfg, header["tokenizer"])
    with pytest.raises(FormatError, match="tensor norm holds a NaN"), w:
        for name, t in f.tensor_info.items():
            data = np.array(f.tensor(name))
            if name == "norm":
                data = data.copy()
                data[3] = np.inf
            w.add_tensor(name, t["dtype"], t["shape"], data)
    f.close()
    assert not (tmp_path / "w.qora").exists() and [p.name for p in tmp_path.iterdir()] == ["good.qora"]


def _write(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p
