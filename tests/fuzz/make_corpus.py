"""Write the crafted corpus: tests/fuzz/corpus/<target>/<case> plus corpus/MANIFEST.json, which says
for every file the clean error it must give (a regex over the QoraError message) or null when the
file is valid. test_hardening.py checks every entry; the fuzzers start from these files.

    python tests/fuzz/make_corpus.py      (deterministic: re-running gives the same bytes)
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus_tools as ct  # noqa: E402


def qora_cases():
    good = ct.qora_bytes()
    header, blobs, end = ct.split_qora(good)

    def with_header(mutate, version=None):
        h = json.loads(json.dumps(header))
        mutate(h)
        return ct.qora_from_header(h, blobs, end, version)

    def tensor(name, **kw):
        return lambda h: h["tensors"][name].update(kw)

    def config(**kw):
        return lambda h: h["config"].update(kw)

    yield "valid.qora", good, None
    yield "truncated_data.qora", good[: len(good) // 2], r"truncated or corrupt: tensor .* runs past the end"
    yield "truncated_preamble.qora", good[:10], r"not a \.qora file \(only 10 bytes\)"
    yield "huge_header_length.qora", good[:8] + struct.pack("<Q", 1 << 62) + good[16:], r"header length \d+ exceeds"
    yield "header_past_eof.qora", good[:8] + struct.pack("<Q", len(good)) + good[16:], r"truncated: header needs"
    deep = b'{"config":' + b"[" * 100000 + b"]" * 100000 + b"}"
    yield "deep_json.qora", ct.qora_from_header(deep, [], 0), r"header is nested too deeply"
    yield "bad_utf8.qora", ct.qora_from_header(b'{"config": "\xff\xfe"}', [], 0), r"header is not valid JSON"
    yield "newer_version.qora", with_header(lambda h: None, version=9), r"format version 9 is newer"
    yield "gguf_magic.qora", b"GGUF" + good[4:], r"GGUF version 1 is not supported"  # read as the GGUF it claims
    yield "misaligned_offset.qora", with_header(tensor("layers.0.wq", offset=65)), r"offset 65 is not a multiple of 64"
    yield "huge_offset.qora", with_header(tensor("norm", offset=1 << 62)), r"tensor norm .* runs past the end"
    yield "negative_offset.qora", with_header(tensor("norm", offset=-64)), r"offset -64 is not a multiple"
    yield "nbytes_lie.qora", with_header(tensor("norm", nbytes=4)), r"tensor norm nbytes is 4"
    yield "unknown_dtype.qora", with_header(tensor("layers.0.wq", dtype="q7")), r"unknown dtype 'q7'"
    yield "norm_quantized.qora", with_header(tensor("norm", dtype="q8")), r"tensor norm must be stored as f32"
    yield "shape_lie.qora", with_header(tensor("layers.0.wk", shape=[32, 32])), r"layers\.0\.wk has shape \[32, 32\]"
    yield "overlap.qora", with_header(
        lambda h: h["tensors"]["layers.0.wv"].update(offset=h["tensors"]["layers.0.wk"]["offset"])
    ), r"overlap"
    yield "huge_layers.qora", with_header(config(n_layers=10**9)), r"config n_layers must be an integer in 1\.\.4096"
    yield "dim_overflow.qora", with_header(config(dim=2**31)), r"config dim must be an integer in 1\.\."
    yield "bool_dim.qora", with_header(config(dim=True)), r"config dim must be an integer"
    yield "gqa_mismatch.qora", with_header(config(n_kv_heads=3)), r"not a multiple of n_kv_heads"
    yield "odd_head_dim.qora", with_header(config(head_dim=15)), r"head_dim must be even"
    yield "rope_layers_short.qora", with_header(config(rope_layers=[])), r"rope_layers must be a list of n_layers"
    yield "nan_eps.qora", ct.qora_from_header(
        json.dumps(header).replace('"norm_eps": 1e-05', '"norm_eps": NaN').encode(), blobs, end
    ), r"norm_eps must be a positive number"
    yield "theta_one.qora", with_header(config(rope_theta=1.0)), r"rope_theta must be greater than 1"

    def poke(name, first: bytes):  # the tensor's first bytes replaced (a NaN or Inf value or scale)
        off = header["tensors"][name]["offset"]
        return ct.qora_from_header(header, [(o, first + b[len(first):] if o == off else b) for o, b in blobs], end)

    yield "nan_norm.qora", poke("norm", struct.pack("<f", float("nan"))), r"tensor norm holds a NaN"
    yield "inf_attn_norm.qora", poke("layers.0.attn_norm", struct.pack("<f", float("-inf"))), (
        r"tensor layers\.0\.attn_norm holds a NaN or infinite value"
    )
    yield "nan_q8_scale.qora", poke("layers.0.wq", b"\x00\x7e"), r"tensor layers\.0\.wq holds a NaN .*block scale 0"
    yield "inf_embedding_scale.qora", poke("tok_embeddings", b"\x00\x7c"), r"tensor tok_embeddings holds a NaN"
    yield "nan_generation.qora", ct.qora_from_header(
        json.dumps({**header, "generation": {"temperature": float("nan")}}).encode(), blobs, end
    ), r"header generation\.temperature is not a finite number"
    yield "inf_rope_extra.qora", with_header(config(rope_scaling={"rope_type": "linear", "factor": 2.0, "x": 1e999})), (
        r"header config\.rope_scaling\.x is not a finite number"
    )
    yield "rope_factor_zero.qora", with_header(config(rope_scaling={"rope_type": "linear", "factor": 0})), (
        r"rope_scaling factor must be a positive number"
    )
    yield "rope_yarn_orig_zero.qora", with_header(
        config(rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 0})
    ), r"original_max_position_embeddings must be a positive integer"
    yield "rope_llama3_equal.qora", with_header(
        config(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 2.0})
    ), r"low_freq_factor and high_freq_factor must differ"
    yield "rope_unknown.qora", with_header(config(rope_scaling={"rope_type": "longrope", "factor": 2})), (
        r"rope_scaling type 'longrope' is not supported"
    )
    yield "special_out_of_vocab.qora", with_header(lambda h: h["special_tokens"].update(eos=[10**6])), (
        r"special_tokens eos must be"
    )
    yield "tokenizer_not_json.qora", with_header(lambda h: h.update(tokenizer="{not json")), (
        r"tokenizer\.json cannot be loaded"
    )
    yield "tokenizer_bigger_vocab.qora", with_header(
        lambda h: h.update(tokenizer=ct.tokenizer_json().replace('"C": 15', '"C": 15, "Z": 99'))
    ), r"tokenizer has token ids up to 99 but the model's vocab_size is 16"
    yield "template_type.qora", with_header(lambda h: h.update(chat_template=["x"])), r"chat_template must be a string"
    for name, src, pattern in TEMPLATE_PAYLOADS[:4]:
        yield f"template_{name}.qora", with_header(lambda h, s=src: h.update(chat_template=s)), pattern
    yield "template_too_long.qora", with_header(lambda h: h.update(chat_template=TEMPLATE_TOO_LONG)), (
        r"chat template of \d+ characters is over the \d+-character limit"
    )


# (case, template source, expected error)
TEMPLATE_PAYLOADS = [
    ("cve_2024_34359", "{{ cycler.__init__.__globals__.os.popen('id').read() }}", r"chat template refused"),
    ("raise_exception", "{{ raise_exception('Only user and assistant roles are supported!') }}",
     r"chat template error: Only user and assistant roles are supported!"),
    ("string_bomb", "{{ 'x' * 10**10 }}", r"would exceed the \d+-character limit"),
    ("loop_bomb", "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
     r"more than \d+ loop iterations"),
    ("subclasses", "{{ ''.__class__.__mro__[1].__subclasses__() }}", r"chat template refused"),
    ("lipsum_globals", "{{ lipsum.__globals__['os'].system('id') }}", r"chat template refused"),
    ("joiner_os", "{{ joiner.__init__.__globals__['os'].popen('id').read() }}", r"chat template refused"),
    ("namespace_private", "{% set ns = namespace(_x=1) %}", r"chat template refused"),
    ("mutate_messages", "{{ messages.append({'role': 'user'}) }}", r"chat template refused"),
    ("attr_filter", "{{ messages|attr('__class__') }}", r"chat template refused"),
    ("format_escape", "{{ '{0.__class__}'.format(messages) }}", r"chat template refused"),
    ("concat_bomb", "{% set ns = namespace(s='xxxxxxxxxxxxxxxx') %}{% for i in range(64) %}"
     "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}", r"would exceed"),
    ("power_bomb", "{{ 7 ** 100000000 }}", r"exponent \d+ is too large"),
    ("center_bomb", "{{ 'x'|center(10**9) }}", r"center argument \d+ is larger"),
    ("format_width", "{{ '%999999999d'|format(1) }}", r"format width 999999999 is too large"),
    ("replace_bomb", "{% set s = 'x' * 4000 %}{{ s|replace('', s) }}", r"would exceed"),
    ("join_bomb", "{% set s = 'x' * 1000000 %}{{ [s, s, s, s, s]|join(s) }}", r"would exceed"),
    ("recursion", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", r"nested more than \d+ deep"),
    # issue 16: sizes checked before the operation runs, and what a render may create in all
    ("nested_format_width", "{{ '{0:{1}{2}}'.format('a', 9999, 99999) }}", r"format argument \d+ is larger"),
    ("nested_format_spec", "{{ '{:{}}'.format('a', 999999) }}", r"format argument \d+ is larger"),
    ("printf_many_widths", "{{ ('%*s' * 1000) % ((60000, 'a') * 1000) }}", r"would exceed"),
    ("expandtabs_bomb", "{{ ('\t' * 4000000).expandtabs(65536) }}", r"would exceed"),
    ("wordwrap_bomb", "{{ ('a ' * 2000000) | wordwrap(1) }}", r"wordwrap filter on more than"),
    ("urlize_bomb", "{{ ('www.a.com ' * 400000) | urlize }}", r"urlize filter on more than"),
    ("tojson_indent_bomb", "{{ (range(100000) | list) | tojson(indent=60000) }}", r"would exceed"),
    ("output_nested_list", "{% set s = 'x' * 4000000 %}{{ [s] * 1000 }}", r"would exceed"),
    ("string_nested_list", "{% set s = 'x' * 4000000 %}{{ ([s] * 1000) | string }}", r"would exceed"),
    ("concat_nested_list", "{% set s = 'x' * 4000000 %}{{ 'a' ~ [s] * 1000 }}", r"would exceed"),
    ("printf_nested_list", "{% set s = 'x' * 4000000 %}{{ '%s' % ([s] * 1000,) }}", r"would exceed"),
    ("compare_bomb", "{% set a = 'x' * 4000000 %}{% set b = 'x' * 3999999 ~ 'x' %}{{ b in [a] * 100000 }}",
     r"would exceed"),
    ("sort_bomb", "{% set a = 'x' * 4000000 %}{{ ([a] * 100000) | sort | length }}", r"would exceed"),
    ("list_growth", "{% set ns = namespace(l=[]) %}{% for i in range(100000) %}{% set ns.l = ns.l + [i] %}"
     "{% endfor %}{{ ns.l | length }}", r"created more than \d+ characters"),
    ("quadratic_concat", "{% set ns = namespace(s='') %}{% for i in range(100000) %}{% set ns.s = ns.s ~ 'x' * 100 %}"
     "{% endfor %}", r"created more than \d+ characters"),
    ("set_block_doubling", "{% set ns = namespace(x='ab') %}{% for i in range(40) %}{% set y %}{{ ns.x }}{{ ns.x }}"
     "{% endset %}{% set ns.x = y %}{% endfor %}{{ ns.x | length }}", r"would exceed|created more than"),
    ("macro_doubling", "{% macro d(s) %}{{ s }}{{ s }}{% endmacro %}{% set ns = namespace(x='ab') %}"
     "{% for i in range(40) %}{% set ns.x = d(ns.x) %}{% endfor %}", r"would exceed|created more than"),
    ("power_chain", "{{ (2 ** 4096) ** 4096 }}", r"exponent \d+ is too large"),
    ("strftime_bomb", "{{ strftime_now('%c' * 1000000) }}", r"strftime_now takes a format string"),
    ("huge_exception", "{{ raise_exception('x' * 4000000) }}", r"chat template error: x{500}\.\.\.$"),
    ("syntax", "{% for %}", r"syntax error on line 1"),
    ("reserved_name", "{{ __qora_loop }}", r"reserved"),
    ("undefined_call", "{{ nothing() }}", r"chat template error"),
    ("zero_division", "{{ 1 // 0 }}", r"ZeroDivisionError"),
    # shared sub-lists: [x, x] doubled is 2^depth characters of text from 2 x depth objects
    ("dag_tojson", "{% set ns = namespace(x=[]) %}{% for i in range(27) %}{% set ns.x = [ns.x, ns.x] %}{% endfor %}"
     "{{ ns.x|tojson|length }}", r"would exceed"),
    ("dag_string", "{% set ns = namespace(x=[]) %}{% for i in range(27) %}{% set ns.x = [ns.x, ns.x] %}{% endfor %}"
     "{{ ns.x|string|length }}", r"would exceed"),
    ("dag_print", "{% set ns = namespace(x=[]) %}{% for i in range(27) %}{% set ns.x = [ns.x, ns.x] %}{% endfor %}"
     "{{ ns.x }}", r"would exceed"),
    ("dag_compare", "{% set ns = namespace(x=[], y=[]) %}{% for i in range(27) %}{% set ns.x = [ns.x, ns.x] %}"
     "{% set ns.y = [ns.y, ns.y] %}{% endfor %}{{ ns.x == ns.y }}", r"would exceed"),
    ("dag_dict_join", "{% set ns = namespace(x=[]) %}{% for i in range(27) %}{% set ns.x = {'a': ns.x, 'b': ns.x} %}"
     "{% endfor %}{{ [ns.x]|join(',') }}", r"would exceed"),
]  # fmt: skip

# a source over TEMPLATE_MAX_SOURCE characters (compiling costs ~8 µs a character: 2 MB took 40 s)
TEMPLATE_TOO_LONG = "{% if x %}a{% endif %}" * 48000


def template_cases():
    root = Path(__file__).resolve().parents[1] / "fixtures" / "smollm3" / "chat_template.jinja"
    yield "chatml.jinja", ct.CHATML.encode(), None
    if root.is_file():
        yield "smollm3.jinja", root.read_bytes(), None
    for name, src, pattern in TEMPLATE_PAYLOADS:
        yield f"{name}.jinja", src.encode(), pattern
    yield "too_long.jinja", TEMPLATE_TOO_LONG.encode(), r"chat template of \d+ characters is over the"


def gguf_cases():
    good = ct.gguf_bytes()
    md = ct.gguf_metadata
    t = ct.gguf_tensors()

    def retype(i, ttype=None, dims=None):
        out = list(t)
        name, d, tt, raw = out[i]
        out[i] = (name, d if dims is None else dims, tt if ttype is None else ttype, raw)
        return out

    q = next(i for i, x in enumerate(t) if x[0] == "blk.0.attn_q.weight")
    yield "valid.gguf", good, None
    yield "truncated.gguf", good[: len(good) // 2], r"truncated GGUF|runs past the end of the file"
    yield "truncated_header.gguf", good[:20], r"truncated GGUF header"
    yield "bad_version.gguf", ct.gguf_bytes(version=99), r"GGUF version 99 is not supported"
    yield "huge_kv_count.gguf", ct.gguf_bytes(n_kv=1 << 62), r"metadata count \d+ exceeds the limit"
    yield "huge_tensor_count.gguf", ct.gguf_bytes(n_tensors=1 << 40), r"tensor count \d+ exceeds the limit"
    yield "kv_count_past_eof.gguf", ct.gguf_bytes(n_kv=1000), r"truncated GGUF|exceeds the limit"
    kv = md() + [("x.huge", ct.ARR, (ct.U8, []))]
    raw = ct.gguf_bytes(kv)
    marker = ct.gguf_str("x.huge") + struct.pack("<IIQ", ct.ARR, ct.U8, 0)
    yield "huge_array_count.gguf", raw.replace(marker, marker[:-8] + struct.pack("<Q", 1 << 60)), (
        r"array of \d+ elements exceeds"
    )
    yield "array_past_eof.gguf", raw.replace(marker, marker[:-8] + struct.pack("<Q", 1 << 20)), r"truncated GGUF"
    kv = md(**{"x__s": (ct.STR, "abc")})
    raw = ct.gguf_bytes(kv)
    marker = ct.gguf_str("x.s") + struct.pack("<I", ct.STR) + struct.pack("<Q", 3)
    yield "huge_string.gguf", raw.replace(marker, marker[:-8] + struct.pack("<Q", 1 << 62)), r"string of \d+ bytes"
    yield "nested_array.gguf", ct.gguf_bytes(md(**{"x__n": (ct.ARR, (ct.ARR, [(ct.U8, [1])]))})), r"nested arrays"
    yield "unknown_value_type.gguf", ct.gguf_bytes(
        md() + [("x", ct.gguf_str("x.bad") + struct.pack("<I", 77), None)]
    ), r"unknown value type 77"
    yield "duplicate_key.gguf", ct.gguf_bytes(md() + [("llama.block_count", ct.U32, 1)]), r"appears twice"
    yield "bad_alignment_value.gguf", ct.gguf_bytes(md(**{"general__alignment": (ct.U32, 3)})), (
        r"general\.alignment must be a uint32 power of two"
    )
    yield "misaligned_offset.gguf", ct.gguf_bytes(offsets=[None, 33] + [None] * (len(t) - 2)), (
        r"offset 33 is not a multiple of 32"
    )
    yield "offset_past_eof.gguf", ct.gguf_bytes(offsets=[1 << 40] + [None] * (len(t) - 1)), r"runs past the end"
    yield "overlapping_tensors.gguf", ct.gguf_bytes(offsets=[0, 0] + [None] * (len(t) - 2)), r"overlap"
    yield "dims_overflow.gguf", ct.gguf_bytes(tensors=retype(q, dims=[1 << 32, 1 << 32])), r"runs past the end"
    yield "dims_too_big.gguf", ct.gguf_bytes(tensors=retype(q, dims=[32, 1 << 40])), r"bad dimensions"
    yield "dims_zero.gguf", ct.gguf_bytes(tensors=retype(q, dims=[0, 32])), r"bad dimensions"
    yield "too_many_dims.gguf", ct.gguf_bytes(tensors=retype(q, dims=[1] * 9)), r"has 9 dimensions"
    yield "unknown_tensor_type.gguf", ct.gguf_bytes(tensors=retype(q, ttype=999)), r"unknown type 999"
    yield "row_not_block_multiple.gguf", ct.gguf_bytes(tensors=retype(q, dims=[20, 32])), (
        r"row length 20 is not a multiple of Q8_0's block 32"
    )
    yield "wrong_type_lie.gguf", ct.gguf_bytes(tensors=retype(q, ttype=ct.GGML_F32)), r"runs past the end|overlap"
    yield "tokens_wrong_element_type.gguf", ct.gguf_bytes(
        md(**{"tokenizer__ggml__tokens": (ct.ARR, (ct.U32, list(range(16))))})
    ), r"tokenizer\.ggml\.tokens must be a list of str"
    yield "token_type_count_lie.gguf", ct.gguf_bytes(md(**{"tokenizer__ggml__token_type": (ct.ARR, (ct.I32, [1]))})), (
        r"token_type has 1 entries for 16 tokens"
    )
    yield "block_count_lie.gguf", ct.gguf_bytes(md(**{"llama__block_count": (ct.U32, 2)})), r"blk\.1\.\S+ not found"
    yield "block_count_huge.gguf", ct.gguf_bytes(md(**{"llama__block_count": (ct.U32, 1 << 30)})), (
        r"config n_layers must be an integer in 1\.\.4096"
    )
    yield "head_count_zero.gguf", ct.gguf_bytes(md(**{"llama__attention__head_count": (ct.U32, 0)})), (
        r"head_count must be positive"
    )
    yield "head_count_not_divisor.gguf", ct.gguf_bytes(md(**{"llama__attention__head_count": (ct.U32, 3)})), (
        r"embedding_length 32 is not a multiple of head_count 3"
    )
    yield "embedding_length_lie.gguf", ct.gguf_bytes(md(**{"llama__embedding_length": (ct.U32, 64)})), (
        r"has shape .* the metadata implies"
    )
    yield "eps_string.gguf", ct.gguf_bytes(md(**{"llama__attention__layer_norm_rms_epsilon": (ct.STR, "x")})), (
        r"layer_norm_rms_epsilon must be a number"
    )
    yield "vocab_lie.gguf", ct.gguf_bytes(md(**{"tokenizer__ggml__tokens": (ct.ARR, (ct.STR, ct.TOKENS * 2))})), (
        r"token_type has 16 entries for 32 tokens"
    )
    yield "template_cve.gguf", ct.gguf_bytes(md(**{"tokenizer__chat_template": (ct.STR, TEMPLATE_PAYLOADS[0][1])})), (
        None  # converting stores the template as text; running it is refused (test_hardening checks that)
    )
    yield "template_too_long.gguf", ct.gguf_bytes(md(**{"tokenizer__chat_template": (ct.STR, TEMPLATE_TOO_LONG)})), (
        r"chat template of \d+ characters is over the \d+-character limit"
    )
    yield "template_wrong_type.gguf", ct.gguf_bytes(md(**{"tokenizer__chat_template": (ct.U32, 7)})), (
        r"tokenizer\.chat_template must be str"
    )
    yield "eps_nan.gguf", ct.gguf_bytes(md(**{"llama__attention__layer_norm_rms_epsilon": (ct.F32, float("nan"))})), (
        r"layer_norm_rms_epsilon is nan, not a finite number"
    )
    yield "freq_base_inf.gguf", ct.gguf_bytes(md(**{"llama__rope__freq_base": (ct.F32, float("inf"))})), (
        r"rope\.freq_base is inf, not a finite number"
    )
    yield "freq_base_zero.gguf", ct.gguf_bytes(md(**{"llama__rope__freq_base": (ct.F32, 0.0)})), (
        r"rope_theta must be a positive number"
    )
    nan_norm = [
        (n, d, ty, struct.pack("<f", float("nan")) + r[4:] if n == "blk.0.attn_norm.weight" else r) for n, d, ty, r in t
    ]
    yield "nan_norm.gguf", ct.gguf_bytes(tensors=nan_norm), r"blk\.0\.attn_norm\.weight holds a NaN"
    nan_scale = [(n, d, ty, b"\x00\x7e" + r[2:] if n == "blk.0.attn_q.weight" else r) for n, d, ty, r in t]
    yield "nan_q8_scale.gguf", ct.gguf_bytes(tensors=nan_scale), r"blk\.0\.attn_q\.weight holds a NaN"
    bad_key = ct.gguf_str(b"\xff\xfe") + struct.pack("<IB", ct.U8, 1)
    yield "not_utf8_key.gguf", ct.gguf_bytes(md() + [("x", bad_key, None)]), (
        r"metadata key name .* is not valid UTF-8"
    )


def hf_cases():
    cfg = ct.hf_config
    header, data = ct.safetensors_header()
    st = ct.safetensors_bytes

    def hdr(name, **kw):
        h = json.loads(json.dumps(header))
        h[name].update(kw)
        return st(h)

    wq = "model.layers.0.self_attn.q_proj.weight"
    yield "valid.hf", ct.hf_entry(), None
    yield "st_truncated.hf", ct.hf_entry(st=st()[: len(st()) // 2]), r"lie outside the data"
    yield "st_huge_header_length.hf", ct.hf_entry(st=st(hlen=1 << 62)), r"bad header length"
    yield "st_header_not_json.hf", ct.hf_entry(st=st(b"{nope" + b" " * 3)), r"safetensors header is not valid JSON"
    yield "st_header_deep.hf", ct.hf_entry(st=st(b"[" * 50000 + b"]" * 50000)), r"nested too deeply"
    yield "st_header_list.hf", ct.hf_entry(st=st(b"[]")), r"not a JSON object"
    yield "st_offsets_past_eof.hf", ct.hf_entry(st=hdr(wq, data_offsets=[0, 1 << 40])), r"lie outside the data"
    yield "st_offsets_reversed.hf", ct.hf_entry(st=hdr(wq, data_offsets=[100, 0])), r"end before they start"
    wk, wv = "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"
    yield "st_offsets_overlap.hf", ct.hf_entry(st=hdr(wv, data_offsets=header[wk]["data_offsets"])), r"overlap"
    nan_data = bytearray(data)
    s0 = header["model.norm.weight"]["data_offsets"][0]
    nan_data[s0 : s0 + 4] = struct.pack("<f", float("nan")) if header["model.norm.weight"]["dtype"] == "F32" else (
        b"\x00\x7e" if header["model.norm.weight"]["dtype"] == "F16" else b"\xc0\x7f"
    )
    yield "st_nan_norm.hf", ct.hf_entry(st=st(header, bytes(nan_data))), r"model\.norm\.weight holds a NaN"
    inf_data = bytearray(data)
    s0, t0 = header[wq]["data_offsets"][0], header[wq]["dtype"]
    inf = {"F32": struct.pack("<f", float("inf")), "F16": b"\x00\x7c\x00\x7c"}
    inf_data[s0 : s0 + 4] = inf.get(t0, b"\x80\x7f\x80\x7f")
    yield "st_inf_weight.hf", ct.hf_entry(st=st(header, bytes(inf_data))), r"q_proj\.weight holds a NaN or infinite"
    yield "cfg_rope_theta_zero.hf", ct.hf_entry(cfg(rope_theta=0)), r"rope_theta must be a positive number, got 0"
    yield "cfg_rope_theta_negative.hf", ct.hf_entry(cfg(rope_theta=-5.0)), r"rope_theta must be a positive number"
    yield "cfg_eps_nan.hf", ct.hf_entry(cfg(rms_norm_eps=float("nan"))), r"rms_norm_eps is not a finite number"
    huge_eps = json.dumps(cfg()).replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 1e999').encode()
    yield "cfg_eps_huge.hf", ct.hf_entry(huge_eps), (
        r"rms_norm_eps is not a finite number"
    )
    yield "cfg_rope_extra_inf.hf", ct.hf_entry(
        cfg(rope_scaling={"rope_type": "linear", "factor": 2.0, "extra": float("inf")})
    ), r"rope_scaling\.extra is not a finite number"
    yield "st_offsets_float.hf", ct.hf_entry(st=hdr(wq, data_offsets=[0.5, 4096])), r"bad data_offsets"
    yield "st_offsets_size_lie.hf", ct.hf_entry(st=hdr(wq, data_offsets=[0, 8])), r"data_offsets span 8"
    yield "st_negative_dim.hf", ct.hf_entry(st=hdr(wq, shape=[-32, -32])), r"bad shape"
    yield "st_dims_overflow.hf", ct.hf_entry(st=hdr(wq, shape=[1 << 32, 1 << 32])), r"data_offsets span"
    yield "st_wrong_dtype.hf", ct.hf_entry(st=hdr(wq, dtype="I64")), r"is I64; qora reads F32, F16 and BF16"
    yield "st_dtype_not_str.hf", ct.hf_entry(st=hdr(wq, dtype=5)), r"bad safetensors entry"
    yield "st_shape_lie.hf", ct.hf_entry(st=hdr(wq, shape=[16, 64])), r"config\.json implies \[32, 32\]"
    yield "st_missing_weight.hf", ct.hf_entry(st=st({k: v for k, v in header.items() if k != wq})), r"not found"
    yield "cfg_not_json.hf", ct.hf_entry(config=b"{,}"), r"config\.json: file is not valid JSON"
    yield "cfg_list.hf", ct.hf_entry(config=b"[1, 2]"), r"expected a JSON object"
    yield "cfg_heads_zero.hf", ct.hf_entry(cfg(num_attention_heads=0)), r"num_attention_heads must be an integer >= 1"
    yield "cfg_heads_string.hf", ct.hf_entry(cfg(num_attention_heads="2")), r"num_attention_heads must be an integer"
    yield "cfg_heads_not_divisor.hf", ct.hf_entry(cfg(num_attention_heads=3)), r"not a multiple of num_attention_heads"
    yield "cfg_kv_not_divisor.hf", ct.hf_entry(cfg(num_key_value_heads=3, head_dim=16)), r"multiple of n_kv_heads"
    yield "cfg_layers_huge.hf", ct.hf_entry(cfg(num_hidden_layers=10**8)), r"n_layers must be an integer in 1\.\.4096"
    yield "cfg_vocab_lie.hf", ct.hf_entry(cfg(vocab_size=64)), r"config\.json implies \[64, 32\]"
    yield "cfg_hidden_lie.hf", ct.hf_entry(cfg(hidden_size=64, head_dim=16)), r"config\.json implies"
    yield "cfg_eps_string.hf", ct.hf_entry(cfg(rms_norm_eps="tiny")), r"rms_norm_eps must be a finite number"
    yield "cfg_rope_factor_string.hf", ct.hf_entry(cfg(rope_scaling={"rope_type": "linear", "factor": "2"})), (
        r"rope_scaling factor must be a positive number"
    )
    yield "cfg_rope_scaling_list.hf", ct.hf_entry(cfg(rope_scaling=[1, 2])), r"rope_scaling must be null or an object"
    yield "cfg_no_rope_layers_bad.hf", ct.hf_entry(
        cfg(architectures=["SmolLM3ForCausalLM"], model_type="smollm3", no_rope_layers="all")
    ), r"no_rope_layers must be a list"
    yield "cfg_nope_interval_zero.hf", ct.hf_entry(
        cfg(architectures=["SmolLM3ForCausalLM"], model_type="smollm3", no_rope_layer_interval=0)
    ), r"no_rope_layer_interval must be an integer >= 1"
    yield "cfg_eos_string.hf", ct.hf_entry(cfg(eos_token_id="eos")), r"eos_token_id must be a token id"
    yield "cfg_architectures_int.hf", ct.hf_entry(cfg(architectures=7)), r"architectures must be a list"
    yield "cfg_tie_string.hf", ct.hf_entry(cfg(tie_word_embeddings="yes")), r"tie_word_embeddings must be true or false"
    yield "cfg_unsupported_arch.hf", ct.hf_entry(cfg(architectures=["GPT2LMHeadModel"], model_type="gpt2")), (
        r"unsupported architecture GPT2LMHeadModel"
    )


CASES = {"qora": qora_cases, "gguf": gguf_cases, "hf": hf_cases, "template": template_cases}


def main() -> None:
    manifest = {}
    for target, make in CASES.items():
        d = ct.CORPUS / target
        d.mkdir(parents=True, exist_ok=True)
        for old in d.iterdir():
            old.unlink()
        for name, data, pattern in make():
            (d / name).write_bytes(data)
            manifest[f"{target}/{name}"] = pattern
    (ct.CORPUS / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(manifest)} corpus files under {ct.CORPUS}")


if __name__ == "__main__":
    main()
