"""`qora serve --parallel N` (qora/api/batch.py) with a real server and the official openai client:
concurrent answers equal serial greedy ones, a full queue is a 429 with Retry-After, prefix-cache
hits show in usage, and clients that leave free their slot at once."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from _helpers_server import running_server
from openai import OpenAI

import qora
from qora.api.batch import plan_slots
from qora.errors import QoraError

QUESTIONS = [
    "What is the capital of France?",
    "Name three colors.",
    "Count to five.",
    "Tell me a joke.",
    "What is 2 + 2?",
    "Describe the sea in one sentence.",
]


@pytest.fixture(scope="module")
def local(demo_model):
    with qora.load(demo_model, threads=1) as m:
        yield m


@pytest.fixture(scope="module")
def srv(demo_model):
    with running_server(demo_model, "--parallel", "4", "--threads", "1", "--context", "1024") as s:
        yield s


def _client(s) -> OpenAI:
    return OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=120)


def _model_id(s) -> str:
    return httpx.get(s.url + "/v1/models").json()["data"][0]["id"]


def _health(s) -> dict:
    return httpx.get(s.url + "/health").json()


def _ask(s, question: str, **kw):
    kw.setdefault("max_tokens", 12)
    return _client(s).chat.completions.create(
        model=_model_id(s), messages=[{"role": "user", "content": question}], temperature=0, **kw
    )


def _wait(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_the_server_says_how_many_run_together(srv):
    assert "4 in parallel" in "".join(srv.log)
    h = _health(srv)
    assert h["slots"] == 4 and h["active"] == 0


def test_concurrent_answers_equal_serial_greedy_answers(srv, local):
    want = [local.generate(q, greedy=True, max_tokens=12, sentence_stop=False) for q in QUESTIONS]
    # six clients on four slots: two wait for a slot, and every step mixes prefill and decode rows
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        got = list(pool.map(lambda q: _ask(srv, q), QUESTIONS))
    for r, w in zip(got, want, strict=True):
        assert r.choices[0].message.content == w.lstrip("\r\n")
        # the same count the Python API gives (the closing stop token included), not a re-tokenization
        assert r.usage.completion_tokens == w.usage.completion_tokens

    # streamed, concurrently, the same text again
    def stream(q):
        chunks = _client(srv).chat.completions.create(
            model=_model_id(srv), messages=[{"role": "user", "content": q}], temperature=0, max_tokens=12, stream=True
        )
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        streamed = list(pool.map(stream, QUESTIONS))
    assert streamed == [r.choices[0].message.content for r in got]


def test_prefix_cache_hits_show_in_usage(srv, local):
    long_system = "You are a careful assistant. " * 20
    messages = [{"role": "system", "content": long_system}, {"role": "user", "content": "Hi there."}]
    c = _client(srv)
    first = c.chat.completions.create(model=_model_id(srv), messages=messages, max_tokens=4, temperature=0)
    again = c.chat.completions.create(model=_model_id(srv), messages=messages, max_tokens=4, temperature=0)
    n = first.usage.prompt_tokens
    assert again.usage.prompt_tokens_details.cached_tokens == n - 1  # all but the last prompt token
    assert again.choices[0].message.content == first.choices[0].message.content
    other = [messages[0], {"role": "user", "content": "Something else entirely."}]
    r = c.chat.completions.create(model=_model_id(srv), messages=other, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens_details.cached_tokens > 100  # the shared system prompt
    want = local.generate(other, greedy=True, max_tokens=4, sentence_stop=False)
    assert r.choices[0].message.content == want.lstrip("\r\n")


def _open_stream(s, max_tokens: int = 2000):
    """A streaming request that would run long; returns (response, its lines iterator) once it streams."""
    client = httpx.Client(timeout=120)
    body = {
        "model": _model_id(s),
        "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
    }
    cm = client.stream("POST", s.url + "/v1/chat/completions", json=body)
    r = cm.__enter__()
    assert r.status_code == 200, r.read()
    lines = r.iter_lines()
    next(line for line in lines if line.startswith("data: "))
    return client, cm, lines


def test_disconnected_clients_free_their_slots(srv):
    opened = [_open_stream(srv) for _ in range(4)]
    _wait(lambda: _health(srv)["active"] == 4)
    for client, cm, _ in opened:
        cm.__exit__(None, None, None)
        client.close()
    _wait(lambda: _health(srv)["active"] == 0, timeout=20)
    assert _health(srv)["requests"]["cancelled"] >= 4
    r = _ask(srv, QUESTIONS[0], max_tokens=3)  # the slots serve again
    assert r.usage.completion_tokens == 3


def test_a_full_queue_is_429_with_retry_after(demo_model):
    with running_server(demo_model, "--parallel", "1", "--max-queued", "1", "--threads", "1", "--context", "512") as s:
        client, cm, _ = _open_stream(s)  # holds the one slot
        waiting = threading.Thread(target=lambda: _ask(s, QUESTIONS[1], max_tokens=2), daemon=True)
        waiting.start()
        _wait(lambda: _health(s)["queued"] == 1)
        r = httpx.post(
            s.url + "/v1/chat/completions",
            json={"model": _model_id(s), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            timeout=30,
        )
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert "busy" in r.json()["error"]["message"]
        cm.__exit__(None, None, None)
        client.close()
        waiting.join(60)
        assert not waiting.is_alive()


def test_plan_slots_fits_the_memory(local):
    cfg = local.config
    per_token = 2 * cfg["n_layers"] * cfg["n_kv_heads"] * cfg["head_dim"] * 2
    ctx = local.engine.max_seq_len
    n, c = plan_slots(local, None, None, available=int(2 * 3.5 * ctx * per_token))
    assert (n, c) == (3, ctx)
    assert plan_slots(local, None, None, available=1)[0] == 1
    n, c = plan_slots(local, 8, None, available=int(2 * 8 * 300 * per_token))
    assert n == 8 and 256 <= c <= 300
    with pytest.raises(QoraError, match="lower --parallel or --context"):
        plan_slots(local, 8, ctx, available=int(2 * 8 * 300 * per_token))
    with pytest.raises(QoraError, match="--parallel must be"):
        plan_slots(local, 0)


def test_gpu_server_batches_and_answers_as_one_at_a_time(tiny_model, monkeypatch):
    """`qora serve --gpu --parallel 3` (lavapipe in CI; a tiny model, as lavapipe is slow): concurrent
    answers from the batched Vulkan step equal the same server's answers asked one at a time (each row's
    arithmetic is independent of the other rows of its step), and the slots' caches are on the device."""
    try:
        from _helpers_vulkan import DEVICE
    except ImportError:  # a build without the Vulkan extension
        DEVICE = None
    if DEVICE is None:
        pytest.skip("no usable Vulkan device (CI installs lavapipe)")
    monkeypatch.setenv("QORA_VK_ALLOW_CPU", "1")
    monkeypatch.setenv("QORA_VK_COOPMAT", "0")  # the same product kernels whatever the rows of a step
    monkeypatch.setenv("QORA_VK_SLOT_DECODE", "0")  # steps of one row too (else the mat-vecs: other roundings)
    questions = QUESTIONS[:5]
    path = tiny_model("tiny-smollm3", "q8")
    with running_server(path, "--gpu", "--parallel", "3", "--context", "128", "--verbose") as s:
        log = "".join(s.log)
        assert "3 in parallel" in log and "vulkan:" in log

        def ask(q):  # a plain completion: the tiny model's 256 positions hold no chat template
            return _client(s).completions.create(model=_model_id(s), prompt=q, max_tokens=8, temperature=0)

        alone = [ask(q).choices[0].text for q in questions]
        with ThreadPoolExecutor(len(questions)) as pool:  # five clients on three slots
            together = list(pool.map(ask, questions))
        assert [r.choices[0].text for r in together] == alone
        assert all(r.usage.completion_tokens == 8 for r in together)
        assert _health(s)["slots"] == 3
