"""The server's API surface beyond plain generation, with the official openai client against a live
`qora serve`: structured output (response_format, grammar), tools (tool_calls whole and streamed, tool
results fed back), and a 400 naming every parameter qora does not support. Tools in process too:
the real SmolLM3 template's rendering, and parsing of malformed model output."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from _helpers_server import running_server
from openai import OpenAI
from structured_schemas import SCHEMAS

from qora import tools
from qora.api.answers import ChatAnswer
from qora.convert import convert
from qora.generate import Response
from qora.tokenizer import Tokenizer

FIX = Path(__file__).parent / "fixtures"
MODEL = "m"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
NOW = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def tiny_long(tmp_path_factory):
    """The tiny SmolLM3 (SmolLM3's chat template, tools included) with a context long enough for the
    template's system prompt and tool list (a random model: only forced output is meaningful)."""
    folder = tmp_path_factory.mktemp("tiny-long")
    src = folder / "tiny"
    shutil.copytree(FIX / "tiny-smollm3", src)
    config = json.loads((src / "config.json").read_text())
    config["max_position_embeddings"] = 4096
    (src / "config.json").write_text(json.dumps(config))
    return convert(src, folder / "tiny.qora", quant="q8", progress=False)


def _client(url: str) -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tiny_server(tiny_long):
    with running_server(tiny_long, "--threads", "1", "--model-name", MODEL) as srv:
        yield srv


@pytest.fixture(scope="module")
def demo_server(demo_model):
    with running_server(demo_model, "--threads", "2", "--model-name", MODEL) as srv:
        yield srv


# ───── structured output ─────


@pytest.mark.parametrize(
    "case", [c for c in SCHEMAS if c.name in ("flat", "array_of_objects", "one_of")], ids=lambda c: c.name
)
def test_json_schema_answers_validate(demo_server, case):
    rf = {"type": "json_schema", "json_schema": {"name": case.name, "schema": case.schema, "strict": True}}
    r = _client(demo_server.url).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": case.prompt}],
        temperature=0,
        max_tokens=case.max_tokens,
        response_format=rf,
    )
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), case.schema)


def test_streamed_json_and_grammar(demo_server):
    c = _client(demo_server.url)
    case = SCHEMAS[0]
    stream = c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": case.prompt}],
        temperature=0,
        max_tokens=case.max_tokens,
        stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": case.schema}},
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    jsonschema.validate(json.loads(text), case.schema)
    r = c.completions.create(
        model=MODEL,
        prompt="The capital of France is",
        max_tokens=8,
        temperature=0,
        extra_body={"grammar": 'root ::= " Paris." | " Lyon."'},
    )
    assert r.choices[0].text in (" Paris.", " Lyon.")


def test_logit_bias_changes_the_answer(demo_server):
    c = _client(demo_server.url)
    plain = c.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=1, temperature=0)
    first = plain.choices[0].text
    ids = httpx.post(
        demo_server.url + "/v1/completions",
        json={"model": MODEL, "prompt": "1, 2, 3,", "max_tokens": 1, "temperature": 0, "logprobs": 1},
    ).json()
    assert ids["choices"][0]["text"] == first
    banned = c.completions.create(
        model=MODEL,
        prompt="1, 2, 3,",
        max_tokens=1,
        temperature=0,
        logit_bias={str(t): -100 for t in _token_ids(demo_server, first)},
    )
    assert banned.choices[0].text != first


def _token_ids(srv, text):
    from qora.loader import open_model_file

    # the demo server runs its GGUF as it is, or a .qora conversion where the GGUF's types lack kernels
    path = next(a for a in srv.proc.args if str(a).endswith((".qora", ".gguf")))
    q = open_model_file(path)
    return Tokenizer.from_qora(q).encode(text, parse_special=False)


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "frob"}}}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"grammar": "root ::= ((("}, "grammar"),
        ({"logit_bias": {"999999999": 5}}, "logit_bias"),
        ({"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}}, "grammar"),
    ],
)
def test_bad_structured_requests_are_400(demo_server, extra, param):
    r = httpx.post(
        demo_server.url + "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra},
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


# ───── unsupported parameters ─────


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"store": True}, "store"),
        ({"service_tier": "flex"}, "service_tier"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"stream": True, "stream_options": {"include_usage": True, "x": 1}}, "stream_options.x"),
        ({"chat_template_kwargs": {"enable_thinking": False, "other": 1}}, "chat_template_kwargs.other"),
        ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ],
)
def test_unsupported_parameters_are_400_naming_them(demo_server, extra, param):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, **extra}
    r = httpx.post(demo_server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param
    assert param.split(".")[-1] in err["message"] or param in ("messages", "tool_choice")


def test_unsupported_completion_parameters_and_openai_client(demo_server):
    r = httpx.post(demo_server.url + "/v1/completions", json={"model": MODEL, "prompt": "a", "best_of": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"
    c = _client(demo_server.url)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1, extra_body={"mirostat": 2}
        )
    assert "mirostat" in str(e.value)


def test_default_valued_openai_fields_are_accepted(demo_server):
    c = _client(demo_server.url)
    r = c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        temperature=0,
        n=1,
        store=False,
        service_tier="auto",
        user="someone",
        modalities=["text"],
        metadata={},
        logprobs=False,
        presence_penalty=0,
        frequency_penalty=0,
        top_p=1,
        response_format={"type": "text"},
    )
    assert r.choices[0].message.content is not None
    r = c.completions.create(model=MODEL, prompt="a", max_tokens=1, best_of=1, user="x")
    assert r.choices[0].finish_reason in ("length", "stop")


def test_tools_on_a_model_without_tool_support_are_400(demo_server):
    with pytest.raises(openai.BadRequestError) as e:
        _client(demo_server.url).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER]
        )
    assert "no tool support" in str(e.value)


# ───── tools ─────


def test_forced_tool_call_round_trip(tiny_server):
    c = _client(tiny_server.url)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = c.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=[WEATHER, NOW],
        tool_choice="required",
        temperature=0,
        max_tokens=200,
        parallel_tool_calls=False,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert calls and all(call.function.name in ("get_weather", "now") for call in calls)
    for call in calls:
        if call.function.name == "get_weather":
            jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    # named: exactly one call to that function
    r = c.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=[WEATHER, NOW],
        temperature=0,
        max_tokens=200,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    # the call and its result fed back: the template renders them and the model answers
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
    ]
    r = c.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=4
    )
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 100


def test_bad_tools_are_400(tiny_server):
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "frob"}}}
    for extra in (
        {"tools": [bad], "tool_choice": "required"},
        {"tools": [{"type": "function", "function": {"name": "a b"}}]},
        {"tools": [NOW, NOW]},
        {"tools": [{"type": "retrieval"}]},
        {"tool_choice": "required"},
        {"tools": [NOW], "tool_choice": "sometimes"},
    ):
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, **extra}
        r = httpx.post(tiny_server.url + "/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] in ("tools", "tool_choice"), (extra, r.text)


def test_streamed_tool_calls(tiny_server):
    c = _client(tiny_server.url)
    stream = c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "weather?"}],
        tools=[WEATHER],
        temperature=0,
        max_tokens=200,
        stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    chunks = [ch for ch in stream if ch.choices]
    deltas = [call for ch in chunks for call in (ch.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].function.name == "get_weather" and deltas[0].index == 0
    jsonschema.validate(json.loads(deltas[0].function.arguments), WEATHER["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(ch.choices[0].delta.content or "" for ch in chunks)  # no tag leaks out as text


def test_tool_results_render_in_the_real_smollm3_template():
    template = (FIX / "smollm3" / "chat_template.jinja").read_text()
    tok = Tokenizer((FIX / "tiny-smollm3" / "tokenizer.json").read_text(), template)
    assert tools.supports_tools(template)
    spec = tools.spec([WEATHER], "auto")
    messages = tools.render_messages(
        [
            {"role": "user", "content": "weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
        ]
    )
    text = tok.apply_chat_template(
        messages,
        add_generation_prompt=True,
        enable_thinking=False,
        tools=tools.template_tools(spec.functions, template),
    )
    assert "<tools>\n{'name': 'get_weather'" in text  # SmolLM3 prints each function object
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<|im_start|>user\n21 C<|im_end|>" in text
    assert not tools.supports_tools("{% for m in messages %}{{ m.content }}{% endfor %}")


def _feed(answer: ChatAnswer, pieces: list[str], finish: str = "stop") -> list[dict]:
    out = answer.opening()
    for i, p in enumerate(pieces):
        out += answer.feed(Response(text=p, token=1, finish_reason=finish if i == len(pieces) - 1 else None))
    return out


@pytest.mark.parametrize(
    "pieces, calls, content",
    [
        (["Sure. <tool", '_call>\n{"name": "now", "arguments": {}}\n</tool_call>'], 1, "Sure. "),
        (['<tool_call>{"name": "now", "arguments": {}}</tool_call>\n<tool_call>{"name": "now"}</tool_call>'], 2, ""),
        (['<tool_call>{"name": "now", "arguments": {}'], 0, '<tool_call>{"name": "now", "arguments": {}'),  # unclosed
        (['<tool_call>{"name": "nope", "arguments": {}}</tool_call>'], 0, None),  # unknown function
        (["<tool_call>not json</tool_call>"], 0, None),
        (['<tool_call>{"name": "now", "arguments": [1]}</tool_call>'], 0, None),
        (["a < b and <tool_"], 0, "a < b and <tool_"),  # a held possible start, released at the end
    ],
)
def test_tool_call_parsing_streamed_and_whole(pieces, calls, content):
    spec = tools.spec([NOW], "auto")
    stream = ChatAnswer(None, None)
    stream.tools = spec
    chunks = _feed(stream, pieces)
    text = "".join(c["delta"].get("content") or "" for c in chunks)
    streamed_calls = [c for ch in chunks for c in ch["delta"].get("tool_calls", [])]
    whole = ChatAnswer(None, None)
    whole.tools = spec
    _feed(whole, pieces)
    message = whole.whole()
    assert len(streamed_calls) == calls == len(message["message"].get("tool_calls") or [])
    expected = "".join(pieces) if content is None else content
    if calls:
        assert chunks[-1]["finish_reason"] == message["finish_reason"] == "tool_calls"
        assert text == content and (message["message"]["content"] or "") == content.strip()
    else:
        assert text == expected == message["message"]["content"]
        assert chunks[-1]["finish_reason"] == message["finish_reason"] == "stop"


# ───── operations ─────


def test_metrics_are_prometheus_text(tiny_server):
    from prometheus_client.parser import text_string_to_metric_families

    c = _client(tiny_server.url)
    c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0)
    list(
        c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0, stream=True
        )
    )
    httpx.post(tiny_server.url + "/v1/chat/completions", json={"model": MODEL, "messages": [], "bogus": 1})
    r = httpx.get(tiny_server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples["qora_requests_total", (("endpoint", "chat"), ("status", "200"))] >= 2
    assert samples["qora_requests_total", (("endpoint", "chat"), ("status", "400"))] >= 1
    assert samples["qora_completion_tokens_total", ()] >= 6
    assert samples["qora_prompt_tokens_total", ()] > 0
    assert samples["qora_queue_depth", ()] == 0 and samples["qora_slots", ()] >= 1
    assert samples["qora_time_to_first_token_seconds_count", ()] >= 2
    assert samples["qora_decode_tokens_per_second", ()] > 0  # tokens of the last 10 s
    assert families["qora_time_to_first_token_seconds"].type == "histogram"
    health = httpx.get(tiny_server.url + "/health").json()
    assert health["status"] == "ok" and health["queued"] == 0 and health["slots"] >= 1


def test_graceful_shutdown_finishes_the_answer_in_progress_and_logs_requests(tiny_long):
    import signal

    with running_server(tiny_long, "--threads", "1", "--model-name", MODEL, "--shutdown-timeout", "60", "-v") as srv:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 1500,
            "ignore_eos": True,
            "temperature": 0,
            "stream": True,
        }
        lines = []
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=120) as r:
            it = r.iter_lines()
            lines.append(next(it))
            srv.proc.send_signal(signal.SIGTERM)  # mid-answer
            lines.extend(it)
        lines = [x for x in lines if x]  # events are separated by blank lines
        assert lines[-1] == "data: [DONE]"
        finish = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in lines if x.startswith("data: {")]
        assert finish[-1] == "length"  # the whole answer, not cut
        assert srv.proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has stopped
        with pytest.raises(httpx.TransportError):
            httpx.get(srv.url + "/health", timeout=5)
    logged = [json.loads(x[x.index("{") :]) for x in srv.log if '"event": "request"' in x]
    assert logged and logged[-1]["status"] == 200 and logged[-1]["completion_tokens"] >= 1500  # thinking counts too
    assert logged[-1]["stream"] is True and "ttft_ms" in logged[-1]


if sys.platform == "win32":  # pragma: no cover
    pytestmark = pytest.mark.skip("the server tests run on POSIX")
