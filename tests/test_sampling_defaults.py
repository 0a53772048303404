"""The sampling defaults live in one table (qora.sampling.DEFAULTS): the Sampler, the generation
options once resolved, and the CLI (its --help and the options it builds) all agree with it."""

import dataclasses

import pytest

from qora import cli
from qora.generate import GenerationOptions
from qora.sampling import DEFAULTS, Sampler

FIELDS = [f.name for f in dataclasses.fields(DEFAULTS) if f.name != "temperature_think"]


def test_sampler_defaults_are_the_table():
    s = Sampler()
    assert {name: getattr(s, name) for name in FIELDS} == {name: getattr(DEFAULTS, name) for name in FIELDS}


@pytest.mark.parametrize("thinking", [True, False])
def test_resolved_options_are_the_table(thinking):
    o = GenerationOptions().resolved(thinking=thinking)
    want = dataclasses.replace(DEFAULTS, temperature=DEFAULTS.temperature_think if thinking else DEFAULTS.temperature)
    assert {name: getattr(o, name) for name in FIELDS} == {name: getattr(want, name) for name in FIELDS}


def test_cli_options_and_help_state_the_table():
    parser = cli.build_parser()
    args = parser.parse_args(["--prompt", "hi"])
    o = cli.generation_options(args, parser).resolved(thinking=False)
    assert {name: getattr(o, name) for name in FIELDS} == {name: getattr(DEFAULTS, name) for name in FIELDS}
    helps = {a.dest: a.help for a in parser._actions}
    assert f"default {DEFAULTS.temperature_think:g} think, {DEFAULTS.temperature:g} not" in helps["temperature"]
    for name in FIELDS[1:]:
        assert f"(default {getattr(DEFAULTS, name):g})" in helps[name], name
