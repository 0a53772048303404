"""`qora serve`: the official openai client against a live server on loopback (the tiny SmolLM3 fixture,
and the demo model where generation must be long or real), plus the thinking channel in process."""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from _helpers_server import running_server
from openai import OpenAI

import qora
from qora import demo
from qora.convert import convert
from qora.generate import GenerationOptions, prompt_ids

FIX = Path(__file__).parent / "fixtures"
KEY = "sk-qora-test"
SYSTEM = {"role": "system", "content": "Be brief. /no_think"}  # a short prompt: the tiny context is 256


@contextlib.contextmanager
def serve(model_path, *args):
    """Run `python -m qora serve` on a free loopback port; yield (process, base URL)."""
    with running_server(model_path, *args) as srv:
        yield srv.proc, srv.url


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "tiny-smollm3-q8.qora"
    return convert(FIX / "tiny-smollm3", out, quant="q8", progress=False)


@pytest.fixture(scope="module")
def server(tiny_path):
    # one engine thread: these small models gain little from more, and a busy machine makes OpenMP threads
    # wait on each other
    with serve(tiny_path, "--api-key", KEY, "--threads", "1") as (proc, url):
        yield proc, url


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server[1] + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local(tiny_path):
    """The same model in process: what the server's answers must equal."""
    with qora.load(tiny_path, threads=1) as m:
        yield m


MODEL = "tiny-smollm3-q8"


def chat(client, content, **kw):
    kw.setdefault("max_tokens", 8)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=[SYSTEM, {"role": "user", "content": content}], **kw)


def streamed(stream):
    chunks = list(stream)
    return chunks, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# ───── basics ─────


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    h = httpx.get(server[1] + "/health").json()
    assert h["status"] == "ok" and h["model"] == MODEL


def test_chat_answer_and_usage_match_the_library(client, local):
    messages = [SYSTEM, {"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    want = local.generate(messages, greedy=True, max_tokens=8, sentence_stop=False)
    assert r.choices[0].message.content == want.lstrip("\r\n")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    n_prompt = len(prompt_ids(local.tokenizer, messages, GenerationOptions()))
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens == 8 and r.usage.total_tokens == n_prompt + 8
    assert 0 <= r.usage.prompt_tokens_details.cached_tokens < n_prompt
    r2 = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert r2.choices[0].message.content == r.choices[0].message.content
    assert r2.usage.prompt_tokens_details.cached_tokens == n_prompt - 1  # the same prompt: all but one reused


def test_streamed_chat_equals_the_whole_answer(client):
    whole = chat(client, "Say something.").choices[0].message.content
    chunks, text = streamed(chat(client, "Say something.", stream=True, stream_options={"include_usage": True}))
    assert text == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])
    chunks, _ = streamed(chat(client, "Say something.", stream=True))  # no usage unless asked
    assert all(c.usage is None for c in chunks) and chunks[-1].choices


def test_raw_stream_ends_with_done(server):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 3, "stream": True}
    with httpx.stream(
        "POST", server[1] + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]" and events.count("data: [DONE]") == 1


def test_completions_streamed_and_not(client, local):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0)
    want = local.generate("Once upon a time", raw=True, greedy=True, max_tokens=10, sentence_stop=False)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 10 and r.usage.prompt_tokens == len(
        local.tokenizer.encode("Once upon a time", True)
    )
    s = client.completions.create(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(s)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens
    echoed = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0, echo=True)
    assert echoed.choices[0].text == "Once upon a time" + want
    default = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0)
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens for completions


def _stop_inside(text: str) -> str:
    """A short string whose first occurrence is in the middle of `text`."""
    for i in range(len(text) // 3, len(text) - 2):
        s = text[i : i + 2]
        if text.find(s) == i and "\ufffd" not in s and s.strip():
            return s
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_are_honoured(client, stream):
    full = chat(client, "Tell me a story.", max_tokens=24).choices[0].message.content
    stop = _stop_inside(full)
    want = full[: full.find(stop)]
    if stream:
        chunks, text = streamed(chat(client, "Tell me a story.", max_tokens=24, stop=[stop], stream=True))
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finish == ["stop"]
    else:
        r = chat(client, "Tell me a story.", max_tokens=24, stop=stop)
        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert finish == "stop"
    assert text == want

    raw_full = client.completions.create(model=MODEL, prompt="The", max_tokens=24, temperature=0).choices[0].text
    raw_stop = _stop_inside(raw_full)
    r = client.completions.create(model=MODEL, prompt="The", max_tokens=24, temperature=0, stop=[raw_stop, "\x00never"])
    assert r.choices[0].text == raw_full[: raw_full.find(raw_stop)] and r.choices[0].finish_reason == "stop"


def test_logprobs(client):
    r = chat(client, "Pick a number.", logprobs=True, top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens == 8
    for e in entries:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and all(lp <= 0 for lp in tops)
        assert e.logprob == pytest.approx(tops[0])  # greedy takes the most likely token
    assert "".join(e.token for e in entries) == r.choices[0].message.content
    c = client.completions.create(model=MODEL, prompt="One two", max_tokens=5, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == c.choices[0].text
    assert chat(client, "Pick a number.").choices[0].logprobs is None


def test_sampling_parameters(client):
    kw = dict(temperature=1.0, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5, max_tokens=12)
    a = chat(client, "Invent a word.", seed=7, **kw).choices[0].message.content
    b = chat(client, "Invent a word.", seed=7, **kw).choices[0].message.content
    assert a == b  # a seed makes sampling reproducible


def test_thinking_switch_reaches_the_template(client, local):
    """enable_thinking and /think or /no_think in the system message pick the template's mode."""
    tok = local.tokenizer
    user = {"role": "user", "content": "hi"}
    for system, kwargs, thinking in [
        ("Be brief. /no_think", {}, False),
        ("Be brief. /think", {}, True),
        ("Be brief.", {"enable_thinking": False}, False),
    ]:
        messages = [{"role": "system", "content": system}, user]
        r = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=2, temperature=0, extra_body={"chat_template_kwargs": kwargs}
        )
        want = prompt_ids(tok, messages, GenerationOptions(enable_thinking=kwargs.get("enable_thinking")))
        assert r.usage.prompt_tokens == len(want)
        closed = tok.encode("</think>\n")  # no-think mode opens the answer with an empty thought
        assert (want[-len(closed) :] == closed) is not thinking
    # thinking on by default: SmolLM3's long default system prompt no longer fits the tiny context
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[user], max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded"


# ───── bad requests ─────


def post(server, path, body, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(server[1] + path, content=raw, headers={**headers, "Content-Type": "application/json"})
    return httpx.post(server[1] + path, json=body, headers=headers)


GOOD = {"model": MODEL, "messages": [SYSTEM, {"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize(
    "change,param",
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"stop": 5}, "stop"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": "hi"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages"),
        ({"stream": "yes"}, "stream"),
        ({"n": 2}, "n"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
        ({"seed": "x"}, "seed"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"presence_penalty": 5}, "presence_penalty"),
        ({"model": 3}, "model"),
        ({"model": None}, "model"),
    ],
)
def test_bad_chat_requests_are_400(server, change, param):
    r = post(server, "/v1/chat/completions", {**GOOD, **change})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_error_answers(server, client):
    r = post(server, "/v1/chat/completions", None, raw=b'{"model": "x", "messages": [')
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = post(server, "/v1/chat/completions", None, raw=b"[1, 2]")
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="word " * 300, max_tokens=2)
    assert e.value.status_code == 400 and e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=["a", "b"], max_tokens=2)
    wrong = OpenAI(base_url=server[1] + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert post(server, "/v1/completions", {"model": MODEL, "prompt": "a"}, key=None).status_code == 401
    assert httpx.get(server[1] + "/v1/nothing").status_code == 404
    assert httpx.get(server[1] + "/v1/chat/completions").status_code == 405
    assert httpx.get(server[1] + "/health").status_code == 200  # no key needed to see it is up
    assert chat(client, "still fine?").choices[0].finish_reason in ("stop", "length")


# ───── load ─────


def test_concurrent_clients_get_the_answers_they_would_get_alone(client, server):
    prompts = [f"Topic number {i}: tell me one fact." for i in range(16)]
    alone = [chat(client, p, max_tokens=6).choices[0].message.content for p in prompts]

    def one(p):
        c = OpenAI(base_url=server[1] + "/v1", api_key=KEY, max_retries=0, timeout=120)
        if prompts.index(p) % 2:
            return streamed(chat(c, p, max_tokens=6, stream=True))[1]
        return chat(c, p, max_tokens=6).choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(one, prompts))
    assert together == alone
    assert len(set(alone)) > 1  # the prompts really lead to different answers
    h = httpx.get(server[1] + "/health").json()
    assert h["status"] == "ok" and h["queued"] == 0


def test_memory_does_not_grow_over_200_requests(client, server):
    proc = psutil.Process(server[0].pid)

    def burst(n):
        for i in range(n):
            if i % 2:
                client.completions.create(model=MODEL, prompt=f"Number {i}", max_tokens=3, temperature=0)
            else:
                chat(client, f"Number {i}", max_tokens=3, stream=bool(i % 4))

    burst(40)  # warm up: allocator pools, caches, lazily imported code
    before = proc.memory_info().rss
    burst(200)
    after = proc.memory_info().rss
    assert after - before < 4 * 2**20, f"RSS grew by {(after - before) / 2**20:.1f} MiB over 200 requests"
    assert httpx.get(server[1] + "/health").json()["status"] == "ok"


# ───── the demo model: long generations and real answers ─────


@pytest.fixture(scope="module")
def demo_server():
    path = demo.ensure_demo_model(demo.default_cache_dir())
    with serve(path, "--context", "2048", "--threads", "1") as (proc, url):
        yield url, path.stem


def test_real_answer(demo_server):
    url, name = demo_server
    c = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    r = c.chat.completions.create(
        model=name,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=20,
        temperature=0,
    )
    assert "Paris" in r.choices[0].message.content


def test_client_disconnect_cancels_generation(demo_server):
    url, name = demo_server
    counts = lambda: httpx.get(url + "/health").json()["requests"]  # noqa: E731
    before = counts()["cancelled"]
    # ignore_eos: the answer cannot end early by itself, so only the client leaving can stop it
    body = {
        "model": name,
        "messages": [{"role": "user", "content": "Write a very long story."}],
        "max_tokens": 1500,
        "ignore_eos": True,
    }
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # a few tokens in, the client goes away
    assert any('"content"' in line for line in got)
    with pytest.raises(httpx.ReadTimeout):  # a non-streamed request whose client gives up
        httpx.post(url + "/v1/chat/completions", json=body, timeout=1.0)
    # if either generation went on, this request would wait for up to 1500 tokens twice over
    t0 = time.monotonic()
    c = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    r = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert r.usage.completion_tokens <= 3
    assert time.monotonic() - t0 < 5
    deadline = time.monotonic() + 5
    while counts()["cancelled"] < before + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counts()["cancelled"] == before + 2


# ───── in process: the thinking channel ─────


def test_thinking_comes_back_as_reasoning_content():
    from starlette.testclient import TestClient
    from test_generate import END_THINK, IM_END, SMOLLM3_TEMPLATE, THINK, FakeModel, make_tokenizer, script

    from qora.server import create_app

    template = SMOLLM3_TEMPLATE if SMOLLM3_TEMPLATE.is_file() else FIX / "smollm3" / "chat_template.jinja"
    tok = make_tokenizer(template.read_text())

    def model():
        return FakeModel(script(THINK, "\nsteps\n", END_THINK, "\nThe answer.", IM_END), tokenizer=tok)

    body = {"model": "fake", "messages": [{"role": "user", "content": "q"}], "max_tokens": 50, "think_budget": 50}
    with TestClient(create_app(model(), "fake")) as tc:
        r = tc.post("/v1/chat/completions", json=body).json()
    msg = r["choices"][0]["message"]
    assert msg["reasoning_content"] == "\nsteps\n" and msg["content"] == "The answer."
    assert r["usage"]["completion_tokens_details"]["reasoning_tokens"] == len(tok.encode("\nsteps\n"))
    assert r["choices"][0]["finish_reason"] == "stop"
    with TestClient(create_app(model(), "fake")) as tc:
        with tc.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
            import json

            deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in s.iter_lines() if line[6:7] == "{"]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "\nsteps\n"
    assert "".join(d.get("content") or "" for d in deltas) == "The answer."


def test_the_scheduler_is_replaceable_and_a_full_queue_is_429():
    """create_app runs its jobs on any Scheduler (the seam a batching one plugs into); no room is a 429
    with Retry-After."""
    from starlette.testclient import TestClient
    from test_generate import FakeModel, script

    from qora.api.jobs import Worker
    from qora.server import create_app

    model = FakeModel(script("ok"))
    body = {"model": "fake", "prompt": "q", "max_tokens": 2}
    with TestClient(create_app(model, "fake", scheduler=Worker(model, max_queued=0))) as tc:
        r = tc.post("/v1/completions", json=body)
        assert r.status_code == 429 and "busy" in r.json()["error"]["message"], r.text
        assert r.headers["retry-after"] == "1"
        assert tc.get("/health").json()["requests"] == {"served": 0, "cancelled": 0, "failed": 0}
    with TestClient(create_app(model, "fake", scheduler=Worker(model, max_queued=1))) as tc:
        assert tc.post("/v1/completions", json=body).json()["choices"][0]["text"] == "ok"
