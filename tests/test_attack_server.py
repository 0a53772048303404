"""`qora serve` attacked as a hostile client or web page would (issue 16): oversize bodies, bad JSON of
every shape, unbounded fields, forged Host / Origin, engine failures. Each test runs the attack against a
real server (a `python -m qora serve` subprocess on loopback) and then checks that a normal request still
succeeds and that the server log has no traceback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from _helpers_server import running_server

from qora.convert import convert

FIX = Path(__file__).parent / "fixtures"
MODEL = "tiny-smollm3-q8"
GOOD_COMPLETION = {"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0}


def serve(model_path, *args):
    """`python -m qora serve` with one engine thread on a free port; yields a Server: (process, base URL,
    port, log lines)."""
    return running_server(model_path, "--threads", "1", *args)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("attack") / f"{MODEL}.qora"
    return convert(FIX / "tiny-smollm3", out, quant="q8", progress=False)


@pytest.fixture(scope="module")
def server(tiny_path):
    """A keyless server with the defaults (the case a web page could drive)."""
    with serve(tiny_path) as s:
        yield s


@pytest.fixture(scope="module")
def small_server(tiny_path):
    """Every address, a small body limit, one extra host name and one CORS origin."""
    with serve(
        tiny_path,
        "--host",
        "0.0.0.0",
        "--max-body-bytes",
        "200000",
        "--allowed-host",
        "qora.lan",
        "--cors",
        "http://localhost:3000",
    ) as s:
        yield s


def still_serves(srv) -> None:
    """A normal request succeeds, and nothing so far put a traceback in the log."""
    _, url, _, log = srv
    r = httpx.post(url + "/v1/completions", json=GOOD_COMPLETION, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    time.sleep(0.1)  # let the log reader catch up
    assert not any("Traceback" in line for line in log), "".join(log)


def assert_error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    assert "Traceback" not in r.text and len(r.text) < 600
    err = r.json()["error"]
    assert err["message"] and "\n" not in err["message"]
    return err


def post_raw(url: str, body, headers=None, path="/v1/chat/completions", timeout=60):
    return httpx.post(
        url + path, content=body, headers={"Content-Type": "application/json", **(headers or {})}, timeout=timeout
    )


# ───── #7: body size, field counts, prompt length ─────


def test_oversize_body_is_413_and_memory_stays_bounded(server):
    proc, url, _, _ = server
    rss = psutil.Process(proc.pid)
    still_serves(server)
    before = rss.memory_info().rss
    big = (
        b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "' + b"a" * (20 << 20) + b'"}]}'
    )
    err = assert_error(post_raw(url, big), 413)  # Content-Length declared
    assert err["code"] == "request_too_large" and "1048576" in err["message"]

    def chunks():  # chunked: no Content-Length; counted as it streams in
        for i in range(0, len(big), 1 << 16):
            yield big[i : i + (1 << 16)]

    assert_error(post_raw(url, chunks()), 413)
    assert_error(post_raw(url, chunks(), path="/v1/completions"), 413)
    grew = rss.memory_info().rss - before
    assert grew < 64 << 20, f"RSS grew by {grew >> 20} MiB for two 20 MB bodies"
    still_serves(server)


def test_body_limit_flag(small_server):
    _, url, _, _ = small_server
    fits = json.dumps({"model": MODEL, "prompt": "word " * 30000, "max_tokens": 1}).encode()  # 150 kB
    assert len(fits) < 200000
    err = assert_error(post_raw(url, fits, path="/v1/completions"), 400)  # read, then too long for the context
    assert err["code"] == "context_length_exceeded"
    too_big = json.dumps({"model": MODEL, "prompt": "word " * 50000, "max_tokens": 1}).encode()
    err = assert_error(post_raw(url, too_big, path="/v1/completions"), 413)
    assert "200000" in err["message"]
    still_serves(small_server)


def test_prompt_longer_than_the_context_is_refused_before_tokenizing(server):
    """A prompt that cannot fit is refused from its length / a partial count, quickly, whatever its text."""
    _, url, _, _ = server
    for text in ("x" * 1_000_000, "ab cd " * 160_000, "".join(chr(0x4E00 + i % 20000) for i in range(300_000))):
        for path, body in (
            ("/v1/completions", {"model": MODEL, "prompt": text, "max_tokens": 1}),
            ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": text}]}),
        ):
            t0 = time.monotonic()
            err = assert_error(httpx.post(url + path, json=body, timeout=60), 400)
            assert err["code"] == "context_length_exceeded", err
            assert time.monotonic() - t0 < 5
    still_serves(server)


@pytest.mark.parametrize(
    "change, param",
    [
        ({"messages": [{"role": "user", "content": "x"}] * 5000}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}] * 2000}]}, "messages"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": "s" * 5000}, "stop"),
        ({"n": 2}, "n"),
        ({"top_logprobs": 1000, "logprobs": True}, "top_logprobs"),
        ({"max_tokens": 10**30}, None),
        ({"seed": 10**60}, None),
    ],
)
def test_request_fields_are_bounded(server, change, param):
    _, url, _, _ = server
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **change}
    err = assert_error(httpx.post(url + "/v1/chat/completions", json=body, timeout=60), 400)
    if param:
        assert err["param"] == param


def test_queue_and_fields_leave_the_server_serving(server):
    still_serves(server)


# ───── #10: bad JSON of any shape ─────

BAD_JSON = {
    "nested lists": b"[" * 100_000 + b"]" * 100_000,
    "nested objects": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "nested in a field": b'{"model": "m", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "unclosed nesting": b"[" * 1_000_000,
    "invalid utf-8": b'{"model": "\xff\xfe", "messages": []}',
    "overlong utf-8": b'{"model": "\xc0\xaf"}',
    "huge exponent": b'{"model": "m", "temperature": 1e999999}',
    "negative huge exponent": b'{"model": "m", "temperature": -1e999999}',
    "100000-digit int": b'{"model": "m", "seed": ' + b"9" * 100_000 + b"}",
    "4000-digit int": b'{"model": "m", "seed": ' + b"9" * 4000 + b"}",
    "NaN": b'{"model": "m", "temperature": NaN}',
    "Infinity": b'{"model": "m", "temperature": Infinity}',
    "-Infinity": b'{"model": "m", "temperature": -Infinity}',
    "duplicate keys": b'{"model": "m", "model": "n"}',
    "duplicate nested keys": b'{"model": "m", "messages": [{"role": "user", "role": "system", "content": "x"}]}',
    "list": b"[1, 2]",
    "string": b'"hello"',
    "number": b"42",
    "null": b"null",
    "true": b"true",
    "empty": b"",
    "whitespace": b"   ",
    "lone surrogate": b'{"model": "m", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
    "lone low surrogate in a key": b'{"model": "m", "\\udc00": 1}',
    "trailing garbage": b'{"model": "m"} xyz',
    "truncated": b'{"model": "m", "messages": [',
    "nul bytes": b"\x00" * 100,
    "utf-16": '{"model": "m"}'.encode("utf-16"),
    "unterminated escaped quotes": b'"' + b'\\"' * 400_000,
    "300K empty objects": b'{"messages": [' + b"{}," * 300_000 + b"{}]}",
    "brackets in strings are not nesting": b'{"model": "'
    + MODEL.encode()
    + b'", "messages": "'
    + b"[{" * 400_000
    + b'"}',
}


@pytest.mark.parametrize("name", list(BAD_JSON))
def test_bad_json_of_any_shape_is_400(server, name):
    _, url, _, _ = server
    for path in ("/v1/chat/completions", "/v1/completions"):
        t0 = time.monotonic()
        assert_error(post_raw(url, BAD_JSON[name], path=path), 400)
        assert time.monotonic() - t0 < 3  # no input makes parsing slow (the event loop serves everyone)


def test_bad_json_leaves_no_traceback_and_the_server_serving(server):
    _, url, _, _ = server
    for body in BAD_JSON.values():
        post_raw(url, body)
    still_serves(server)


# ───── #15: Host, Origin, cross-site requests ─────


def get(url, path="/health", **headers):
    return httpx.get(url + path, headers=headers, timeout=30)


def test_dns_rebinding_host_is_refused(server):
    _, url, port, _ = server
    for host in (
        "evil.example",
        f"evil.example:{port}",
        f"localhost.evil.example:{port}",
        f"127.0.0.1.nip.io:{port}",
        f"localhost:{port + 1}",
        f"localhost@evil.example:{port}",
        f"evil.example#localhost:{port}",
        f"[::1]evil:{port}",
        f"192.168.1.10:{port}",
        "",
    ):
        assert_error(get(url, Host=host), 400)
        r = post_raw(url, json.dumps(GOOD_COMPLETION), path="/v1/completions", headers={"Host": host})
        assert_error(r, 400)
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", f"LOCALHOST:{port}", "localhost"):
        assert get(url, Host=host).status_code == 200, host
    # no Host header at all (HTTP/1.0)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 400"), head
    still_serves(server)


def test_cross_origin_requests_are_refused(server):
    proc, url, port, _ = server
    before = httpx.get(url + "/health").json()["requests"]
    body = json.dumps(GOOD_COMPLETION)
    for headers in (
        {"Origin": "http://evil.example", "Content-Type": "application/json"},
        {"Origin": "http://evil.example", "Content-Type": "text/plain"},  # a "simple" request: no preflight
        {"Origin": "null", "Content-Type": "text/plain"},
        {"Origin": f"http://localhost:{port + 1}", "Content-Type": "text/plain"},  # same site, other origin
        {"Sec-Fetch-Site": "cross-site", "Content-Type": "text/plain"},
        {
            "Sec-Fetch-Site": "cross-site",
            "Sec-Fetch-Mode": "no-cors",
            "Content-Type": "application/x-www-form-urlencoded",
        },
    ):
        r = httpx.post(url + "/v1/completions", content=body, headers=headers, timeout=30)
        assert_error(r, 403)
        assert "access-control-allow-origin" not in r.headers
    r = httpx.request(
        "OPTIONS",
        url + "/v1/completions",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
        timeout=30,
    )
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    assert httpx.get(url + "/health").json()["requests"] == before  # nothing reached the engine
    assert get(url, **{"Sec-Fetch-Site": "same-origin"}).status_code == 200
    still_serves(server)


def test_cors_allows_only_the_listed_origins_and_hosts(small_server):
    _, url, port, log = small_server
    ok = "http://localhost:3000"
    pre = httpx.request(
        "OPTIONS",
        url + "/v1/chat/completions",
        headers={
            "Origin": ok,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
        timeout=30,
    )
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ok
    r = httpx.post(
        url + "/v1/completions",
        json=GOOD_COMPLETION,
        headers={"Origin": ok, "Sec-Fetch-Site": "cross-site"},
        timeout=60,
    )
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ok
    for bad in ("http://localhost:3001", "https://localhost:3000", "http://evil.example"):
        assert_error(
            httpx.post(url + "/v1/completions", json=GOOD_COMPLETION, headers={"Origin": bad}, timeout=30), 403
        )
    # --allowed-host adds a name; listening on every address, IP literals name this machine
    assert get(url, Host=f"qora.lan:{port}").status_code == 200
    assert get(url, Host=f"192.168.1.10:{port}").status_code == 200
    assert_error(get(url, Host=f"evil.example:{port}"), 400)
    # listening on 0.0.0.0 without --api-key: one warning line
    assert sum("warning" in line and "--api-key" in line for line in log) == 1
    still_serves(small_server)


def test_allowed_host_star_and_bad_values(tiny_path):
    with serve(tiny_path, "--allowed-host", "*") as srv:
        assert get(srv[1], Host="anything.example").status_code == 200
    for flag, value in (("--allowed-host", "a/b"), ("--cors", "evil.example"), ("--max-body-bytes", "0")):
        p = subprocess.run(
            [sys.executable, "-m", "qora", "serve", "--load", str(tiny_path), flag, value],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert p.returncode == 1 and "Traceback" not in p.stderr
        assert p.stderr.strip().startswith("qora: error:") and len(p.stderr.strip().splitlines()) == 1
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "qora",
            "serve",
            "--load",
            str(tiny_path),
            "--api-key",
            b"\xff".decode("utf-8", "surrogateescape"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2 and "not valid UTF-8" in p.stderr and "Traceback" not in p.stderr


# ───── #16: an engine failure is answered and the next request served ─────


def test_engine_failure_keeps_the_server_serving():
    from starlette.testclient import TestClient
    from test_generate import FakeModel, script

    from qora.errors import QoraError
    from qora.server import create_app

    model = FakeModel(script("ok"))
    forward = model.engine.forward
    failures = [RuntimeError("secret /path/detail"), QoraError("engine error: bad tensor")]

    def flaky(*args, **kwargs):
        if failures:
            raise failures.pop(0)
        return forward(*args, **kwargs)

    model.engine.forward = flaky
    body = {"model": "fake", "prompt": "q", "max_tokens": 3}
    with TestClient(create_app(model, "fake"), raise_server_exceptions=False) as tc:
        r = tc.post("/v1/completions", json=body)
        err = assert_error(r, 500)
        assert "secret" not in err["message"] and err["type"] == "server_error"
        assert_error(tc.post("/v1/completions", json=body), 400)
        r = tc.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        assert tc.get("/health").json()["requests"]["failed"] == 2


# ───── what comes back and what is logged: caller values, names, clients that leave ─────


def test_error_messages_shorten_every_caller_value(server):
    """Every error that quotes a caller's value (model, role, a wrongly typed field, a bound, a model path,
    a route, Host, Origin) quotes at most ~80 characters of it."""
    _, url, port, _ = server
    huge = "v" * 300_000
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    for path, body in (
        ("/v1/chat/completions", {**chat, "model": huge}),
        ("/v1/completions", {**GOOD_COMPLETION, "model": huge}),
        ("/v1/chat/completions", {**chat, "messages": [{"role": huge, "content": "x"}]}),
        ("/v1/chat/completions", {**chat, "messages": [{"role": ["r" * 1000] * 100, "content": "x"}]}),
        ("/v1/completions", {**GOOD_COMPLETION, "temperature": huge}),
        ("/v1/completions", {**GOOD_COMPLETION, "max_tokens": -int("9" * 60)}),
        ("/v1/completions", {**GOOD_COMPLETION, "stop": {"k": huge}}),
        ("/v1/completions", {**GOOD_COMPLETION, huge[:1000]: 1, "n": huge}),
    ):
        r = httpx.post(url + path, json=body, timeout=30)
        assert r.status_code in (400, 404) and len(r.text) < 600, (path, r.status_code, len(r.text))
    for r in (
        httpx.get(url + "/v1/models/" + "m" * 20_000, timeout=30),
        httpx.get(url + "/nope" + "p" * 20_000, timeout=30),
        httpx.get(url + "/health", headers={"Host": "h" * 20_000}, timeout=30),
        httpx.get(url + "/health", headers={"Origin": "http://" + "o" * 20_000}, timeout=30),
    ):
        assert r.status_code in (400, 403, 404) and len(r.text) < 600, (r.status_code, len(r.text))
    still_serves(server)


def test_quote_cuts_before_quoting():
    from qora.api.errors import quote

    assert quote("abc") == "'abc'" and quote("abc", json.dumps) == '"abc"' and quote(None) == "None"
    assert quote("m" * 10**6) == "'" + "m" * 80 + "'…"
    assert len(quote("\x00" * 10**6)) <= 81 and quote("\x00" * 10**6).endswith("…")
    assert len(quote([["x" * 1000] * 1000])) <= 81


def test_names_that_are_not_valid_text_never_make_a_500():
    """A model id with a lone surrogate (an undecodable byte of a file name), or one inside an error message,
    comes back as U+FFFD in valid JSON: never a 500 and never a traceback."""
    from starlette.testclient import TestClient
    from test_generate import FakeModel, script

    from qora.errors import QoraError
    from qora.server import create_app

    model = FakeModel(script("ok"))
    forward = model.engine.forward
    failures = [QoraError("cannot read /models/t\udcff.qora")]

    def flaky(*args, **kwargs):
        if failures:
            raise failures.pop(0)
        return forward(*args, **kwargs)

    model.engine.forward = flaky
    body = {"model": "t\ufffd", "prompt": "q", "max_tokens": 3}
    with TestClient(create_app(model, "t\udcff"), raise_server_exceptions=False) as tc:
        assert tc.get("/health").json()["model"] == "t\ufffd"
        assert tc.get("/v1/models").json()["data"][0]["id"] == "t\ufffd"
        err = assert_error(tc.post("/v1/completions", json=body), 400)
        assert "t\ufffd.qora" in err["message"]
        r = tc.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["model"] == "t\ufffd", r.text
        r = tc.post("/v1/completions", json={**body, "stream": True})
        assert r.status_code == 200 and "t\ufffd" in r.text and "\\udcff" not in r.text
        assert_error(tc.post("/v1/completions", json={**body, "model": "x"}), 404)


def test_clients_that_leave_early_leave_no_traceback(server):
    """A client may go away at any point (in its headers, in its body, after a streamed answer began): the
    server drops the request quietly and goes on serving."""
    _, url, port, _ = server
    head = b"POST /v1/completions HTTP/1.1\r\nHost: localhost:%d\r\nContent-Type: application/json\r\n" % port
    whole = json.dumps({**GOOD_COMPLETION, "max_tokens": 64, "stream": True}).encode()
    for data in (
        head + b"Content-Length: 1000\r\n\r\n{",
        head + b'Transfer-Encoding: chunked\r\n\r\n10\r\n{"model": "tiny',
        head + b"Content-Le",
        head + b"Content-Length: %d\r\n\r\n" % len(whole) + whole,
    ):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(data)
            time.sleep(0.2)
            if data.endswith(whole):
                assert s.recv(20).startswith(b"HTTP/1.1 200")
    time.sleep(0.5)
    still_serves(server)
