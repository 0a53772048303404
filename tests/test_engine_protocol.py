"""The engine seam: both engines implement qora.engine.Engine, engine choice lives in one place, the
ISA table agrees with the C enum, front ends load through qora.loader, and the library reports
through logging (the "qora" logger's handler prints `qora: ...`), not print()."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

import qora
from qora import engine as eng
from qora import log as qlog
from qora._core import _cpu
from qora.errors import QoraError

QORA = Path(__file__).resolve().parents[1] / "qora"


def _check_engine(e, device: str) -> None:
    assert isinstance(e, eng.Engine)
    for name in (*eng.ENGINE_ATTRIBUTES, *eng.ENGINE_METHODS):
        assert hasattr(e, name), name
    assert e.device == device and isinstance(e.device_name, str) and e.device_name
    assert isinstance(e.isa, str) and e.kv_dtype in ("f16", "f32") and isinstance(e.notes, list)
    assert e.n_threads >= 1 and e.max_seq_len >= 1 and e.vocab_size >= 1
    logits = e.forward(np.array([1, 2, 3], np.int32), 0, all_logits=True)
    assert logits.shape == (3, e.vocab_size) and logits.dtype == np.float32
    assert e.forward(np.array([4], np.int32), 3).shape == (1, e.vocab_size)
    e.reset()


def test_protocol_lists_what_front_ends_use():
    hints = set(eng.Engine.__annotations__)
    assert hints == set(eng.ENGINE_ATTRIBUTES)
    for name in eng.ENGINE_METHODS:
        assert callable(getattr(eng.Engine, name))


def test_cpu_engine_is_an_engine(tiny_model):
    from qora.format import read_qora

    with read_qora(tiny_model("tiny-llama", "q8")) as qf:
        e = eng.make_engine(qf, "cpu", threads=1, max_seq_len=32)
        try:
            assert type(e) is eng.CpuEngine
            _check_engine(e, "cpu")
            assert e.isa in eng.ISA_NAMES and e.device_name == "cpu" and e.notes == []
        finally:
            e.close()
        with pytest.raises(QoraError, match="closed"):
            e.forward([1], 0)


def _gpu_device():
    try:
        from qora._core import _vulkan

        return eng.vulkan.choose_device(_vulkan.list_devices(), required=True)
    except Exception:
        return None


@pytest.mark.skipif(_gpu_device() is None, reason="no usable Vulkan device (CI installs lavapipe)")
def test_vulkan_engine_is_an_engine(tiny_model):
    from qora.format import read_qora

    with read_qora(tiny_model("tiny-llama", "q8")) as qf:
        e = eng.make_engine(qf, "gpu", threads=1, max_seq_len=32)
        try:
            assert type(e) is eng.VulkanEngine
            _check_engine(e, "vulkan")
            assert e.isa == "vulkan" and e.notes and "device memory" in e.notes[0]
        finally:
            e.close()


def test_fallback_is_a_cpu_engine_with_its_reason(tiny_model, monkeypatch, capfd):
    monkeypatch.setenv("QORA_VK_LOADER", "/nonexistent/libvulkan.so.1")
    from qora.format import read_qora

    with read_qora(tiny_model("tiny-llama", "q8")) as qf:
        e = eng.make_engine(qf, "auto", threads=1, max_seq_len=32)
        try:
            _check_engine(e, "cpu")
            assert len(e.notes) == 1 and e.notes[0].startswith("GPU not used (")
        finally:
            e.close()
        with pytest.raises(QoraError, match="device must be"):
            eng.make_engine(qf, "tpu")
    assert capfd.readouterr().err == ""  # no Vulkan at all: said only under --verbose


def test_isa_table_agrees_with_the_c_enum():
    c = _cpu.c_isa_table()
    assert c["count"] == len(eng.ISA_NAMES)
    for const, value in c["enum"].items():
        assert eng.ISA_NAMES[value] == const.removeprefix("QORA_ISA_").lower()
    assert set(c["enum"].values()) == set(range(c["count"]))
    for value, name in c["kernels"].items():  # the name each compiled kernel table gives itself
        assert eng.ISA_NAMES[value] == name
    assert _cpu.ISA_NAMES is eng.ISA_NAMES  # the compiled core reads the same table
    walks = c["walks"]  # the decode walks of repack.h, likewise
    assert walks.pop("count") == len(eng.DECODE_WALKS)
    for const, value in walks.items():
        assert eng.DECODE_WALKS[value] == const.removeprefix("QORA_WALK_").lower()


def test_decode_walk_table_by_cpu():
    """The decode walk by vendor and family (engine/cpu.py): Intel and AMD Zen 3 one prefetched stream,
    Zen 4 and later one stream without software prefetch, others the prefetched one."""
    from qora.engine.cpu import kernel_for_cpu

    assert kernel_for_cpu("intel", 6, 0x8F) == "seq"  # Sapphire Rapids
    assert kernel_for_cpu("amd", 0x19, 0x01) == "seq"  # Zen 3 (Milan)
    assert kernel_for_cpu("amd", 0x19, 0x21) == "seq"  # Zen 3 (Vermeer)
    assert kernel_for_cpu("amd", 0x19, 0x50) == "seq"  # Zen 3 (Cezanne)
    assert kernel_for_cpu("amd", 0x19, 0x61) == "stream"  # Zen 4 (Raphael)
    assert kernel_for_cpu("amd", 0x19, 0x11) == "stream"  # Zen 4 (Genoa)
    assert kernel_for_cpu("amd", 0x1A, 0x02) == "stream"  # Zen 5
    assert kernel_for_cpu("amd", 0x17, 0x31) == "seq"  # Zen 2
    assert kernel_for_cpu("other", 0, 0) == "seq"
    assert all(kernel_for_cpu(v, f, m) in eng.DECODE_WALKS for v, f, m in [("intel", 6, 0), ("amd", 0x19, 0x61)])


def test_isa_names_are_spelled_once():
    """Outside the table, no module of qora spells the set of ISA paths out again."""
    for path in QORA.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if path.name == "cpu.py" and path.parent.name == "engine":
            assert text.count('"avx2vnni"') == 1
        else:
            assert '"avx2vnni"' not in text, path


def test_no_private_imports_across_modules():
    for path in QORA.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qora"):
                if node.module.startswith("qora._core"):
                    continue  # the compiled modules, whose own names start with _
                for alias in node.names:
                    private = alias.name.startswith("_") and not alias.name.startswith("__")
                    assert not private, f"{path}: from {node.module} import {alias.name}"


def test_library_reports_through_logging(capfd):
    """A library warning reaches stderr as `qora: ...` through the qora logger; debug lines only
    inside a verbose block or a -v command line; the CLI's settings end with its run."""
    import logging

    log = logging.getLogger("qora.engine.select")
    log.warning("w1")
    log.info("i1")
    log.debug("d1")
    with qlog.verbose():
        log.debug("d2")
    with qlog.cli_session():
        log.info("i2")
        log.debug("d3")
        qlog.configure(verbose=True)
        log.debug("d4")
    log.info("i3")
    assert capfd.readouterr().err == "qora: w1\nqora: d2\nqora: i2\nqora: d4\n"


def test_front_ends_load_through_the_loader():
    for name in ("cli.py", "chat.py", "bench.py", "server.py"):
        text = (QORA / name).read_text(encoding="utf-8")
        assert "qora.load(" not in text and "make_engine" not in text, name
    assert "print(" not in (QORA / "engine" / "vulkan.py").read_text(encoding="utf-8")


def test_load_model_resolves_and_loads(tiny_model, tmp_path, monkeypatch):
    from qora.loader import load_model

    with load_model(tiny_model("tiny-llama", "q8"), "cpu", 1, 32) as m:
        assert m.engine.max_seq_len == 32 and m.engine.n_threads == 1 and isinstance(m.engine, eng.Engine)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.qora").write_bytes(Path(tiny_model("tiny-llama", "q8")).read_bytes())
    with load_model(device="cpu", context=16) as m:  # no path: ./model.qora
        assert m.path == Path("model.qora") and m.engine.max_seq_len == 16
    with pytest.raises(QoraError, match="no such file"):
        load_model(tmp_path / "missing.qora")
    assert qora.load is not None
