"""JSON schemas for the structured-output suite (tests/test_structured.py) and the mask benchmark
(bench/structured_masks.py): nested objects, arrays, enums, bounded numbers, required and optional
properties. Each has a prompt that asks for it, a valid example instance (the benchmark feeds it
token by token; the suite checks that jsonschema accepts it), and `max_tokens`, enough for the
longest answer the schema allows with the demo model's tokenizer (strings are bounded with maxLength
and arrays with maxItems, so that the answer always closes before the limit)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    name: str
    prompt: str
    schema: dict
    example: object
    max_tokens: int = 96


def _s(n: int = 12) -> dict:
    return {"type": "string", "maxLength": n}


def _obj(props: dict, required=None, **extra) -> dict:
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
        "additionalProperties": False,
        **extra,
    }


SCHEMAS: list[Case] = [
    Case(
        "flat",
        "Describe a person.",
        _obj({"name": _s(), "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
        {"name": "Ann", "age": 31},
    ),
    Case("boolean", "Is the sky blue?", _obj({"answer": {"type": "boolean"}}), {"answer": True}, 24),
    Case("enum", "Pick a color.", _obj({"color": {"enum": ["red", "green", "blue"]}}), {"color": "red"}, 24),
    Case(
        "string_enum",
        "How do you feel?",
        _obj({"mood": {"type": "string", "enum": ["happy", "sad", "calm"]}}),
        {"mood": "calm"},
        24,
    ),
    Case(
        "bounded_int",
        "Give a score.",
        _obj({"score": {"type": "integer", "minimum": 1, "maximum": 10}}),
        {"score": 7},
        24,
    ),
    Case(
        "bounded_number",
        "Give a temperature.",
        _obj({"celsius": {"type": "number", "minimum": -50, "maximum": 60}}),
        {"celsius": 21.5},
        48,
    ),
    Case(
        "nested",
        "Describe a city.",
        _obj(
            {
                "city": _s(),
                "location": _obj(
                    {
                        "lat": {"type": "number", "minimum": -90, "maximum": 90},
                        "lon": {"type": "number", "minimum": -180, "maximum": 180},
                    }
                ),
            }
        ),
        {"city": "Paris", "location": {"lat": 48.8, "lon": 2.3}},
        128,
    ),
    Case(
        "array_of_strings",
        "List some fruits.",
        _obj({"fruits": {"type": "array", "items": _s(10), "minItems": 1, "maxItems": 3}}),
        {"fruits": ["apple", "pear"]},
        96,
    ),
    Case(
        "array_of_ints",
        "Give some primes.",
        _obj({"primes": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100}, "maxItems": 5}}),
        {"primes": [2, 3, 5]},
        64,
    ),
    Case(
        "array_of_objects",
        "List two books.",
        _obj(
            {
                "books": {
                    "type": "array",
                    "maxItems": 2,
                    "items": _obj({"title": _s(), "year": {"type": "integer", "minimum": 1500, "maximum": 2030}}),
                }
            }
        ),
        {"books": [{"title": "Dune", "year": 1965}]},
        128,
    ),
    Case(
        "optional",
        "Describe a pet.",
        _obj(
            {
                "name": _s(),
                "species": {"enum": ["cat", "dog"]},
                "age": {"type": "integer", "minimum": 0, "maximum": 30},
            },
            required=["name"],
        ),
        {"name": "Rex", "species": "dog"},
        96,
    ),
    Case(
        "all_optional",
        "Tell me about the weather.",
        _obj({"sunny": {"type": "boolean"}, "wind": {"type": "integer", "minimum": 0, "maximum": 200}}, required=[]),
        {"sunny": False},
        48,
    ),
    Case("null_union", "Who won?", _obj({"winner": {"anyOf": [_s(), {"type": "null"}]}}), {"winner": None}, 48),
    Case(
        "const",
        "Say the version.",
        _obj({"version": {"const": "1.0"}, "ok": {"type": "boolean"}}),
        {"version": "1.0", "ok": True},
        48,
    ),
    Case(
        "deep",
        "Describe a company.",
        _obj(
            {
                "company": _obj(
                    {
                        "name": _s(),
                        "ceo": _obj({"name": _s(), "age": {"type": "integer", "minimum": 18, "maximum": 99}}),
                    }
                )
            }
        ),
        {"company": {"name": "Acme", "ceo": {"name": "Bo", "age": 50}}},
        128,
    ),
    Case(
        "top_array",
        "List three numbers.",
        {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 3, "maxItems": 3},
        [1, 2, 3],
        32,
    ),
    Case(
        "pattern",
        "Give a date.",
        _obj({"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}}),
        {"date": "2024-01-31"},
        48,
    ),
    Case(
        "mixed_types",
        "Describe a product.",
        _obj(
            {
                "id": {"type": "integer", "minimum": 1, "maximum": 9999},
                "name": _s(),
                "price": {"type": "number", "minimum": 0, "maximum": 1000},
                "in_stock": {"type": "boolean"},
                "tags": {"type": "array", "items": {"enum": ["new", "sale", "eco"]}, "maxItems": 3},
            }
        ),
        {"id": 12, "name": "Lamp", "price": 19.99, "in_stock": True, "tags": ["sale"]},
        160,
    ),
    Case("enum_ints", "Pick a level.", _obj({"level": {"enum": [1, 2, 3]}}), {"level": 2}, 24),
    Case(
        "matrix",
        "A 2x2 matrix.",
        _obj(
            {
                "rows": {
                    "type": "array",
                    "minItems": 2,
                    "maxItems": 2,
                    "items": {
                        "type": "array",
                        "minItems": 2,
                        "maxItems": 2,
                        "items": {"type": "integer", "minimum": -9, "maximum": 9},
                    },
                }
            }
        ),
        {"rows": [[1, 0], [0, 1]]},
        64,
    ),
    Case(
        "one_of",
        "A shape.",
        {
            "oneOf": [
                _obj({"kind": {"const": "circle"}, "r": {"type": "integer", "minimum": 1, "maximum": 99}}),
                _obj({"kind": {"const": "square"}, "side": {"type": "integer", "minimum": 1, "maximum": 99}}),
            ]
        },
        {"kind": "circle", "r": 3},
        64,
    ),
    Case("short_strings", "Name two animals.", _obj({"a": _s(8), "b": _s(8)}), {"a": "cat", "b": "dog"}, 64),
    Case(
        "address",
        "Give an address.",
        _obj(
            {
                "street": _s(16),
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "country": {"enum": ["FR", "DE", "US"]},
            },
            required=["street", "country"],
        ),
        {"street": "Main St 1", "country": "US"},
        96,
    ),
]
