"""A model file changed on disk under a running engine (issue 16): truncated or rewritten while it is
memory-mapped. Before, a read of a page past the new end raised SIGBUS and killed the process (CLI,
chat, a server with all its clients). Now the request fails with ModelFileChangedError, every later
one too, the process lives on, and a fresh load of a good file works.

Each attack runs in a child process, so a SIGBUS that gets through fails the test instead of killing
pytest."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from qora.convert import convert

FIX = Path(__file__).parent / "fixtures"
CHANGED = "changed on disk while in use (truncated or rewritten); reload it"

# The child's common part: load PATH, run one good forward, keep its logits.
PRELUDE = """
import json, os, shutil, sys
import numpy as np
import qora
from qora.errors import ModelFileChangedError, QoraError

path, backup = sys.argv[1], sys.argv[2]
size = os.path.getsize(path)
def load(**kw):
    kw.setdefault("threads", 2)
    kw.setdefault("device", "cpu")
    return qora.load(path, **kw)
def report(**kw):
    print(json.dumps(kw), flush=True)
SHORT = [{"role": "system", "content": "Be brief. /no_think"}, {"role": "user", "content": "Hi"}]
def refused(call):
    try:
        call()
    except ModelFileChangedError as e:
        return str(e)
    except Exception as e:
        return f"WRONG {type(e).__name__}: {e}"
    return None
def hide_from_stat(guard):
    # the change as a coarse-timestamp file system shows it (or one made within the same tick):
    # the stat check cannot see it, only the fault can
    st = os.stat(path)
    guard._inode, guard._stamp = (st.st_dev, st.st_ino), (st.st_size, st.st_mtime_ns)
"""


def run_child(body: str, path: Path, backup: Path, env: dict | None = None, timeout: float = 120):
    code = PRELUDE + textwrap.dedent(body)
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path), str(backup)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    return proc, {k: v for d in lines for k, v in d.items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("mapped")
    out = {
        q: convert(FIX / "tiny-smollm3", d / f"tiny-smollm3-{q}.qora", quant=q, progress=False) for q in ("q4", "q8")
    }
    out["gguf"] = FIX / "tiny-smollm3.q4_0.gguf"  # run as it is (qora/gguf_model.py), under the name model.qora
    return out


@pytest.fixture
def model_file(models, tmp_path, request):
    """A private copy of a converted model (the test truncates it) and a pristine backup."""
    src = models[getattr(request, "param", "q8")]
    path, backup = tmp_path / "model.qora", tmp_path / "backup.qora"
    shutil.copyfile(src, path)
    shutil.copyfile(src, backup)
    return path, backup


def assert_survived(proc, res):
    assert proc.returncode == 0, (
        f"child died with {proc.returncode} ({'SIGBUS' if proc.returncode == -signal.SIGBUS else '?'}): "
        f"{proc.stderr[-2000:]}"
    )
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return res


# ───── the engine, through the public API ─────


@pytest.mark.parametrize("model_file", ["q8", "q4", "gguf"], indirect=True)
@pytest.mark.parametrize("new_size", ["half", "zero", "one_page"])
@pytest.mark.parametrize("repack", ["1", "0"])
def test_model_file_truncated_while_loaded_fails_cleanly(model_file, new_size, repack):
    path, backup = model_file
    body = f"""
    m = load()
    before = m.forward([1, 2, 3, 4])
    os.truncate(path, {{"half": size // 2, "zero": 0, "one_page": 4096}}["{new_size}"])
    first = refused(lambda: m.forward([5, 6, 7]))
    again = refused(lambda: m.forward([1]))
    gen = refused(lambda: m.generate(SHORT, max_tokens=4))
    m.close()
    shutil.copyfile(backup, path)  # the file restored: a fresh load in the same process works
    m2 = load()
    same = bool(np.allclose(m2.forward([1, 2, 3, 4]), before, atol=1e-4))
    report(first=first, again=again, gen=gen, same=same)
    """
    proc, res = run_child(body, path, backup, env={"QORA_REPACK": repack})
    assert_survived(proc, res)
    for key in ("first", "again", "gen"):
        assert res[key] is not None and CHANGED in res[key] and str(path) in res[key], res
    assert res["same"], res


@pytest.mark.parametrize("model_file", ["q8", "q4"], indirect=True)
@pytest.mark.parametrize("new_size", ["half", "zero"])
def test_model_file_truncated_fault_in_worker_threads_is_caught(model_file, new_size):
    """The fault itself (not the stat check): the forward reads past the end from OpenMP worker
    threads (2 threads, Q4 kept in file order so every matrix is read from the map)."""
    path, backup = model_file
    body = f"""
    m = load(threads=2)
    before = m.forward([1, 2, 3, 4])
    os.truncate(path, {{"half": size // 2, "zero": 0}}["{new_size}"])
    hide_from_stat(m.engine._guard)
    first = refused(lambda: m.forward(list(range(1, 40))))
    again = refused(lambda: m.forward([1]))
    poisoned = m.engine._guard.poisoned
    m.close()
    shutil.copyfile(backup, path)
    m2 = load()
    same = bool(np.allclose(m2.forward([1, 2, 3, 4]), before, atol=1e-4))
    report(first=first, again=again, poisoned=poisoned, same=same)
    """
    proc, res = run_child(body, path, backup, env={"QORA_REPACK": "0"})
    assert_survived(proc, res)
    assert res["poisoned"] is True
    assert CHANGED in res["first"] and CHANGED in res["again"], res
    assert res["same"], res


def test_model_file_rewritten_in_place_is_detected(model_file):
    """Same size, new bytes (no fault possible): the stat check sees the file moved under the map."""
    path, backup = model_file
    body = """
    import time
    m = load()
    m.forward([1, 2, 3])
    time.sleep(0.05)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(os.urandom(4096))
    first = refused(lambda: m.forward([4]))
    # and the cp-over-it kind: truncated to 0 and written again, same size in the end
    shutil.copyfile(backup, path)
    m2 = load()
    m2.forward([1, 2, 3])
    time.sleep(0.05)  # past the file system's timestamp tick: a change within one is invisible to stat
    shutil.copyfile(backup, path)
    second = refused(lambda: m2.forward([4]))
    report(first=first, second=second, size_same=os.path.getsize(path) == size)
    """
    proc, res = run_child(body, path, backup)
    assert_survived(proc, res)
    assert res["size_same"]
    assert CHANGED in res["first"] and CHANGED in res["second"], res


def test_model_file_replaced_by_rename_keeps_serving(model_file):
    """An atomic replacement (write elsewhere, rename over) leaves the mapped inode intact: no
    reason to refuse, the loaded weights are still whole. Deleting the file is the same."""
    path, backup = model_file
    body = """
    m = load()
    before = m.forward([1, 2, 3])
    shutil.copyfile(backup, path + ".new")
    os.truncate(path + ".new", 100)
    os.replace(path + ".new", path)
    after = m.forward([1, 2, 3])
    os.unlink(path)
    gone = m.forward([1, 2, 3])
    report(ok=bool(np.allclose(before, after) and np.allclose(before, gone)))
    """
    proc, res = run_child(body, path, backup)
    assert_survived(proc, res)
    assert res["ok"]


# ───── while loading ─────


@pytest.mark.parametrize("model_file", ["q4"], indirect=True)
def test_model_file_truncated_during_load_fails_cleanly(model_file):
    """Truncated after the header was checked but while the engine reads the weights (repacking):
    load fails with the same error, and nothing is left half-built."""
    path, backup = model_file
    body = """
    from qora.engine import CpuEngine
    from qora.format import read_qora
    qf, qf2 = read_qora(path), read_qora(path)
    os.truncate(path, size // 3)
    seen_by_stat = refused(lambda: CpuEngine(qf, n_threads=2))
    hide_from_stat(qf2.guard)
    seen_by_fault = refused(lambda: CpuEngine(qf2, n_threads=2))
    qf.close()
    qf2.close()
    plain_load = refused(lambda: load())  # a load of the truncated file: the header check refuses it
    report(stat=seen_by_stat, fault=seen_by_fault, load=plain_load)
    """
    proc, res = run_child(body, path, backup)
    assert_survived(proc, res)
    assert CHANGED in res["stat"] and CHANGED in res["fault"], res
    assert res["load"].startswith("WRONG FormatError") and "truncated" in res["load"], res


def test_model_file_truncated_before_gpu_upload_fails_cleanly(model_file):
    """The Vulkan engine reads the mapping once, to upload it: a fault there refuses the load; a file
    changed after the upload leaves the device copy whole, and the CPU fallback (which would read
    the map again) refuses."""
    from qora.engine.vulkan import devices

    if not any(d["usable"] for d in devices()):
        pytest.skip("no usable Vulkan device")
    path, backup = model_file
    body = """
    from qora.format import read_qora
    from qora.engine.vulkan import VulkanEngine
    qf = read_qora(path)
    os.truncate(path, size // 3)
    hide_from_stat(qf.guard)
    upload = refused(lambda: VulkanEngine(qf, n_threads=2, max_seq_len=64, required=True))
    qf.close()
    shutil.copyfile(backup, path)
    m = load(device="gpu", max_seq_len=256)
    before = m.forward([1, 2, 3])
    os.truncate(path, 0)
    on_device = bool(np.allclose(m.forward([1, 2, 3]), before))
    m.close()
    shutil.copyfile(backup, path)
    os.environ["QORA_VK_FAIL"] = "run:1"  # the device is "lost" on the second call: CPU fallback
    m = load(device="gpu", max_seq_len=256)
    m.forward([1, 2, 3])
    os.truncate(path, 0)
    fallback = refused(lambda: m.forward([4]))
    report(upload=upload, on_device=on_device, fallback=fallback)
    """
    proc, res = run_child(body, path, backup, env={"QORA_VK_ALLOW_CPU": "1"})
    assert_survived(proc, res)
    assert CHANGED in res["upload"] and CHANGED in res["fallback"], res
    assert res["on_device"], res


# ───── the handler does not swallow real crashes ─────


def test_sigbus_outside_model_mapping_still_fatal(model_file, tmp_path):
    """A SIGBUS anywhere but a registered model mapping keeps its default action (the process dies
    with SIGBUS), also with Python's faulthandler enabled before or after the model was loaded."""
    path, backup = model_file
    other = tmp_path / "other.bin"
    for when in ("none", "before", "after"):
        body = f"""
        import faulthandler, mmap
        if "{when}" == "before":
            faulthandler.enable()
        m = load()
        m.forward([1, 2])
        if "{when}" == "after":
            faulthandler.enable()
        with open("{other}", "wb") as f:
            f.write(b"x" * 65536)
        f = open("{other}", "rb")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        os.truncate("{other}", 0)
        report(before=True)
        mm[40000]
        report(after=True)
        """
        proc, res = run_child(body, path, backup, timeout=60)
        assert res.get("before") and not res.get("after"), (when, proc.stderr[-2000:])
        assert proc.returncode == -signal.SIGBUS, (when, proc.returncode, proc.stderr[-2000:])
        if when != "none":
            assert "Bus error" in proc.stderr, proc.stderr[-2000:]


def test_faulthandler_enabled_after_load_does_not_hide_the_guard(model_file):
    """faulthandler installed over the guard would turn a repairable fault into a fatal error; the
    engine puts its handler back on top before each forward."""
    path, backup = model_file
    body = """
    import faulthandler
    m = load()
    m.forward([1, 2])
    faulthandler.enable()
    os.truncate(path, 0)
    hide_from_stat(m.engine._guard)
    report(first=refused(lambda: m.forward([3, 4, 5])), enabled=faulthandler.is_enabled())
    """
    proc, res = run_child(body, path, backup, env={"QORA_REPACK": "0"})
    assert_survived(proc, res)
    assert CHANGED in res["first"], res


# ───── the server ─────


def test_server_model_file_truncated_answers_503_and_stays_up(model_file):
    path, backup = model_file
    from _helpers_server import running_server

    with running_server(path, "--threads", "1", "--cpu") as (proc, url, _, _):
        body = {
            "model": "model",
            "messages": [{"role": "system", "content": "Be brief. /no_think"}, {"role": "user", "content": "Hi"}],
            "max_tokens": 4,
            "temperature": 0,
        }
        ok = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert ok.status_code == 200, ok.text
        os.truncate(path, os.path.getsize(path) // 2)
        for _ in range(2):  # the first request after the change, and every later one
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 503, r.text
            err = r.json()["error"]
            assert CHANGED in err["message"] and err["code"] == "model_file_changed", err
            assert proc.poll() is None, "the server died"
        for stream in (False, True):
            legacy = {"model": "model", "prompt": "x", "max_tokens": 4, "stream": stream}
            r = httpx.post(url + "/v1/completions", json=legacy, timeout=60)
            assert r.status_code == 503 and CHANGED in r.json()["error"]["message"], r.text
        h = httpx.get(url + "/health", timeout=10)
        assert h.status_code == 200 and h.json()["status"] == "ok"
        assert proc.poll() is None
    assert proc.returncode != -signal.SIGBUS


# ───── qora convert: the source mapped the same way ─────


@pytest.mark.parametrize(
    "source", ["tiny-smollm3", "tiny-llama", "tiny-smollm3.q4_0.gguf", "tiny-smollm3.f32.gguf", "tiny-llama.f16.gguf"]
)
@pytest.mark.parametrize("new_size", ["half", "zero"])
def test_convert_source_truncated_during_conversion_fails_cleanly(source, new_size, tmp_path):
    """A safetensors shard or GGUF truncated while `qora convert` reads it: a clear error naming the
    source, no SIGBUS, no output file left behind."""
    src = tmp_path / source
    (shutil.copytree if (FIX / source).is_dir() else shutil.copyfile)(FIX / source, src)
    victims = sorted(src.glob("*.safetensors")) if src.is_dir() else [src]
    code = f"""
import os, sys
import qora.format as F
from qora.convert import convert
from qora.errors import QoraError
victims = {[str(v) for v in victims]!r}
orig, done = F.QoraWriter.add_tensor, []
def add(self, *a):
    orig(self, *a)
    done.append(1)
    if len(done) == 2:
        for v in victims:
            os.truncate(v, {{"half": os.path.getsize(v) // 2, "zero": 0}}["{new_size}"])
F.QoraWriter.add_tensor = add
try:
    convert({str(src)!r}, {str(tmp_path / "out.qora")!r}, quant="q8", progress=False)
    print("CONVERTED")
except QoraError as e:
    print("ERROR", type(e).__name__, e)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.startswith("ERROR"), proc.stdout + proc.stderr[-2000:]
    assert "changed on disk while in use" in proc.stdout or "truncated" in proc.stdout, proc.stdout
    assert not (tmp_path / "out.qora").exists()


def test_mapped_files_table_full_is_a_clear_error(model_file):
    """The guard's table is fixed (limits.MAX_MAPPED_FILES): one file more is refused with a clear
    error, and closing one frees its slot."""
    path, backup = model_file
    body = """
    from qora import limits
    from qora.format import read_qora
    files, err = [], None
    try:
        for _ in range(limits.MAX_MAPPED_FILES + 1):
            files.append(read_qora(path, check_values=False))
    except QoraError as e:
        err = str(e)
    n = len(files)
    files.pop().close()
    files.append(read_qora(path, check_values=False))
    for f in files:
        f.close()
    report(err=err, n=n, limit=limits.MAX_MAPPED_FILES)
    """
    proc, res = run_child(body, path, backup)
    assert_survived(proc, res)
    assert res["n"] == res["limit"] and res["err"] and f"more than {res['limit']}" in res["err"], res
