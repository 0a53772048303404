"""Structured output (qora/structured.py, the Sampler's constraint and logit_bias): every answer of the
demo model, greedy, under each schema of tests/structured_schemas.py parses and validates; grammars;
the errors a bad schema or grammar gets."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
from structured_schemas import SCHEMAS

import qora
from qora import structured
from qora.errors import QoraError
from qora.generate import GenerationOptions, stream_generate
from qora.sampling import Sampler, check_logit_bias


@pytest.fixture(scope="module")
def demo(demo_model):
    m = qora.load(demo_model, threads=2)
    yield m
    m.close()


def _answer(model, prompt, **options):
    rs = list(stream_generate(model, prompt, GenerationOptions(greedy=True, **options)))
    return "".join(r.text for r in rs if r.channel == "answer"), rs[-1]


def test_suite_is_big_enough_and_its_examples_valid():
    assert len(SCHEMAS) >= 20
    assert len({c.name for c in SCHEMAS}) == len(SCHEMAS)
    for case in SCHEMAS:
        jsonschema.validate(case.example, case.schema)


@pytest.mark.parametrize("case", SCHEMAS, ids=[c.name for c in SCHEMAS])
def test_every_answer_parses_and_validates(demo, case):
    text, last = _answer(demo, case.prompt, json_schema=case.schema, max_tokens=case.max_tokens)
    assert last.finish_reason == "stop", (text, last.finish_reason)
    jsonschema.validate(json.loads(text), case.schema)


def test_json_object_and_response_format(demo):
    # any JSON object: the demo model (greedy) nests objects until the length limit, so only the start
    # is checked; the schemas above are what bounds an answer
    text, last = _answer(
        demo, "Give me a JSON object about a cat.", response_format={"type": "json_object"}, max_tokens=12
    )
    assert text.startswith('{"') and last.finish_reason == "length"
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["n"],
        "additionalProperties": False,
    }
    rf = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": True}}
    text, _ = _answer(demo, "A number.", response_format=rf, max_tokens=24)
    jsonschema.validate(json.loads(text), schema)
    assert demo.generate("Say yes or no.", grammar='start: "yes" | "no"', greedy=True) in ("yes", "no")


def test_gbnf_and_lark_grammars(demo):
    gbnf = 'root ::= "The answer is " [0-9] [0-9]? "."'
    text, last = _answer(demo, "What is 6 times 7?", grammar=gbnf, max_tokens=16)
    assert last.finish_reason == "stop"
    assert text.startswith("The answer is ") and text.endswith(".") and text[14:-1].isdigit()
    lark = 'start: color " and " color\ncolor: "red" | "green" | "blue"'
    text, _ = _answer(demo, "Name two colors.", grammar=lark, max_tokens=16)
    a, b = text.split(" and ")
    assert {a, b} <= {"red", "green", "blue"}


def test_the_thinking_is_free_and_the_answer_constrained(tiny_model):
    # the tiny SmolLM3 thinks: the grammar starts after </think> (forced at once by a zero budget)
    m = qora.load(str(tiny_model("tiny-smollm3", "q8")), threads=1)
    try:
        opts = GenerationOptions(
            greedy=True,
            enable_thinking=True,
            think_budget=3,
            grammar='start: "ok" | "no"',
            max_tokens=8,
            system="Be brief. /system_override",
        )  # a short prompt
        rs = list(stream_generate(m, "hi", opts))
    finally:
        m.close()
    assert "".join(r.text for r in rs if r.channel == "answer").strip() in ("ok", "no")
    assert rs[-1].finish_reason == "stop"


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"json_schema": "{not json"}, "not valid JSON"),
        ({"json_schema": [1, 2]}, "must be an object"),
        ({"json_schema": {"type": "object", "properties": {"a": {"type": "frobnicate"}}}}, "JSON schema"),
        ({"grammar": "start: (("}, "grammar"),
        ({"grammar": ""}, "non-empty"),
        ({"response_format": {"type": "xml"}}, "not supported"),
        ({"response_format": {"type": "json_schema"}}, "json_schema"),
        ({"json_schema": {"type": "object"}, "grammar": 'start: "a"'}, "not both"),
        ({"json_schema": {"type": "object"}, "ignore_eos": True}, "ignore_eos"),
        ({"json_schema": "x" * (300 << 10)}, "longer than"),
        ({"logit_bias": {"5": 101}}, "<= 100"),
        ({"logit_bias": {"-1": 1}}, "token id"),
        ({"logit_bias": [1]}, "map"),
    ],
)
def test_bad_schemas_and_grammars_are_one_line_errors(kwargs, words):
    with pytest.raises(QoraError) as e:
        GenerationOptions(**kwargs)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_response_format_text_means_no_grammar():
    assert GenerationOptions(response_format={"type": "text"}).grammar is None
    assert GenerationOptions().grammar is None


def test_mask_applies_before_sampling(demo):
    tok = demo.tokenizer
    c = structured.Grammar.lark('start: "yes" | "no"').start(tok)
    allowed = c.allowed()
    ids = set(np.flatnonzero(allowed).tolist())
    assert ids and all(tok.decode([i]) in ("y", "ye", "yes", "n", "no") for i in ids)
    # whatever the logits favour, and at any temperature, only allowed tokens come out
    rng = np.random.default_rng(0)
    for seed in range(5):
        logits = rng.standard_normal(demo.engine.vocab_size).astype(np.float32) * 5
        s = Sampler(
            temperature=1.5,
            top_k=0,
            top_p=1.0,
            seed=seed,
            constraint=structured.Grammar.lark('start: "yes" | "no"').start(tok),
        )
        assert s(logits) in ids


def test_constraint_done_allows_only_the_end_of_the_turn(demo):
    tok = demo.tokenizer
    c = structured.Grammar.lark('start: "yes"').start(tok)
    c.advance(tok.encode("yes")[0])
    assert set(np.flatnonzero(c.allowed()).tolist()) <= set(tok.stop_ids)
    with pytest.raises(structured.GrammarError):
        structured.Grammar.lark('start: "yes"').start(tok).advance(tok.encode("no")[0])


def test_logit_bias():
    assert check_logit_bias({"3": 2, 5: -100.0}) == {3: 2.0, 5: -100.0}
    logits = np.zeros(10, dtype=np.float32)
    assert Sampler(greedy=True, logit_bias={"7": 5})(logits) == 7
    logits[2] = 50
    assert Sampler(greedy=True, logit_bias={2: -100})(logits) != 2
    with pytest.raises(QoraError):
        check_logit_bias({"12": 1}, vocab=10)


def test_cli_json_schema_and_grammar_files(demo_model, tmp_path):
    import subprocess
    import sys

    case = next(c for c in SCHEMAS if c.name == "flat")
    (tmp_path / "s.json").write_text(json.dumps(case.schema))
    (tmp_path / "g.gbnf").write_text('root ::= "yes" | "no"')
    base = [sys.executable, "-m", "qora", "--load", str(demo_model), "--greedy", "--threads", "2", "-p", case.prompt]
    out = subprocess.run(
        [*base, "--json-schema", str(tmp_path / "s.json"), "--max-tokens", "64"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    jsonschema.validate(json.loads(out.stdout), case.schema)
    out = subprocess.run([*base, "--grammar", str(tmp_path / "g.gbnf")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() in ("yes", "no"), out.stderr
    (tmp_path / "bad.json").write_text("{")
    out = subprocess.run(
        [*base, "--json-schema", str(tmp_path / "bad.json")], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2 and "not valid JSON" in out.stderr and "Traceback" not in out.stderr
