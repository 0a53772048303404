""".qora v1: writer -> reader round trip, zero-copy views, and one test per reader error."""

import json
import struct

import numpy as np
import pytest
from _helpers_convert import qora_config

from qora import quant
from qora.errors import FormatError
from qora.format import ALIGN, MAGIC, QoraWriter, align_up, expected_tensors, read_qora

TOKENIZER = json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}})
SPECIAL = {"bos": 1, "eos": [2, 3], "pad": None, "im_start": 4, "im_end": 2, "think": None, "end_think": None}


def tensors_for(cfg, seed=0, matrix_dtype="q4", embed_dtype="q8"):
    """(name, dtype, shape, float32 data) for every tensor of cfg."""
    rng = np.random.default_rng(seed)
    out = []
    for name, (shape, _) in expected_tensors(cfg).items():
        dtype = "f32" if len(shape) == 1 else embed_dtype if name in ("tok_embeddings", "output") else matrix_dtype
        out.append((name, dtype, shape, rng.standard_normal(shape).astype(np.float32)))
    return out


def write_model(path, cfg=None, declare=True, **kw):
    cfg = cfg or qora_config()
    ts = tensors_for(cfg, **kw)
    plan = [(n, d, s) for n, d, s, _ in ts] if declare else None
    with QoraWriter(
        path, cfg, TOKENIZER, "{{ x }}", {"temperature": 0.6}, SPECIAL, {"from": "test"}, tensors=plan
    ) as w:
        for n, d, s, a in ts:
            w.add_tensor(n, d, s, quant.quantize(a, d))
    return cfg, ts


# --------------------------------------------------------------------------------------------
# round trip
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("declare", [True, False])
@pytest.mark.parametrize("tie", [True, False])
def test_round_trip(tmp_path, declare, tie):
    p = tmp_path / "m.qora"
    cfg, ts = write_model(p, qora_config(tie=tie), declare=declare)
    assert not (tmp_path / "m.qora.tmp").exists() and not (tmp_path / "m.qora.data.tmp").exists()
    with read_qora(p) as f:
        assert f.version == 1
        assert f.config == cfg
        assert f.tokenizer_json == TOKENIZER
        assert f.chat_template == "{{ x }}"
        assert f.generation == {"temperature": 0.6}
        assert f.special_tokens == SPECIAL
        assert f.source == {"from": "test"}
        assert set(f.tensor_info) == {n for n, *_ in ts}
        assert ("output" in f.tensor_info) == (not tie)
        end = 0
        for n, d, s, a in ts:
            info = f.tensor_info[n]
            assert info["dtype"] == d and info["shape"] == list(s)
            assert info["offset"] % ALIGN == 0 and (f.data_start + info["offset"]) % ALIGN == 0
            v = f.tensor(n)
            assert not v.flags.writeable and not v.flags.owndata  # a view into the map
            np.testing.assert_array_equal(v, quant.quantize(a, d))
            if d == "f32":
                assert v.dtype == np.float32 and v.shape == tuple(s)
            else:
                assert v.dtype == np.uint8 and v.shape == quant.storage_shape(d, s)
            np.testing.assert_array_equal(f.dequantize(n), quant.dequantize(quant.quantize(a, d), d, s))
            end = max(end, info["offset"] + info["nbytes"])
        assert p.stat().st_size == f.data_start + align_up(end)
    with open(p, "rb") as fh:
        magic, version, hlen = struct.unpack("<4sIQ", fh.read(16))
    assert magic == MAGIC and version == 1 and f.data_start == align_up(16 + hlen)


def test_writer_accepts_float_arrays_and_bytes(tmp_path):
    cfg = qora_config()
    ts = tensors_for(cfg, matrix_dtype="f16", embed_dtype="q4")
    with QoraWriter(tmp_path / "m.qora", cfg, TOKENIZER, tensors=[(n, d, s) for n, d, s, _ in ts]) as w:
        for i, (n, d, s, a) in enumerate(ts):
            w.add_tensor(n, d, s, a if i % 2 else quant.quantize(a, d).tobytes())  # floats are encoded here
    with read_qora(tmp_path / "m.qora") as f:
        for n, d, _s, a in ts:
            np.testing.assert_array_equal(f.tensor(n), quant.quantize(a, d))
        assert f.chat_template is None and f.generation == {} and f.special_tokens["eos"] == []


def test_close_releases_map_and_views_survive(tmp_path):
    p = tmp_path / "m.qora"
    write_model(p)
    f = read_qora(p)
    f.close()
    assert f.closed
    with pytest.raises(ValueError):
        f.tensor("norm")
    f = read_qora(p)
    v = f.tensor("norm").copy()
    view = f.tensor("norm")
    f.close()  # a view is alive: best effort, no error, the view stays valid
    np.testing.assert_array_equal(view, v)
    with pytest.raises(KeyError):
        read_qora(p).tensor("nope")


def test_writer_failure_leaves_no_file(tmp_path):
    cfg = qora_config()
    ts = tensors_for(cfg)
    p = tmp_path / "m.qora"
    with pytest.raises(RuntimeError):
        with QoraWriter(p, cfg, TOKENIZER, tensors=[(n, d, s) for n, d, s, _ in ts]) as w:
            n, d, s, a = ts[0]
            w.add_tensor(n, d, s, a)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FormatError, match="missing tensor"):
        with QoraWriter(p, cfg, TOKENIZER) as w:
            n, d, s, a = ts[0]
            w.add_tensor(n, d, s, a)
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_bad_tensors(tmp_path):
    cfg = qora_config()
    with QoraWriter(tmp_path / "m.qora", cfg, TOKENIZER) as w:
        with pytest.raises(FormatError, match="shape"):
            w.add_tensor("norm", "f32", [3], np.zeros(3, np.float32))
        with pytest.raises(FormatError, match="unexpected"):
            w.add_tensor("bias", "f32", [64], np.zeros(64, np.float32))
        with pytest.raises(FormatError, match="f32"):
            w.add_tensor("norm", "q8", [64], np.zeros(64, np.uint8))
        with pytest.raises(ValueError, match="bytes"):
            w.add_tensor("norm", "f32", [64], b"\0" * 10)
        w.abort()
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# reader errors: each corrupts a valid file in one way
# --------------------------------------------------------------------------------------------


@pytest.fixture
def good(tmp_path):
    p = tmp_path / "m.qora"
    write_model(p)
    return p


def rewrite(path, mutate=None, version=1, magic=MAGIC, hlen_override=None):
    """Re-emit `path` with a mutated header (mutate edits the dict in place, or returns raw bytes),
    keeping the data region: tensor offsets are relative to the data start."""
    raw = path.read_bytes()
    _, _, hlen = struct.unpack("<4sIQ", raw[:16])
    header = json.loads(raw[16 : 16 + hlen])
    data = raw[align_up(16 + hlen) :]
    replaced = mutate(header) if mutate else None
    hj = replaced if isinstance(replaced, bytes) else json.dumps(header).encode()
    pre = struct.pack("<4sIQ", magic, version, len(hj) if hlen_override is None else hlen_override)
    path.write_bytes(pre + hj + b"\0" * (align_up(16 + len(hj)) - 16 - len(hj)) + data)
    return path


def expect(path, pattern):
    with pytest.raises(FormatError, match=pattern) as ei:
        read_qora(path)
    assert str(ei.value).startswith(str(path) + ": ")
    return ei.value


def test_error_wrong_magic(good):
    expect(rewrite(good, magic=b"QORB"), "not a .qora file")
    expect(rewrite(good, magic=b"GGUF"), "GGUF")


def test_error_newer_version(good):
    e = expect(rewrite(good, version=2), "newer")
    assert str(e) == f"{good}: .qora format version 2 is newer than this qora supports (1); upgrade qora"


def test_error_version_zero(good):
    expect(rewrite(good, version=0), "version 0")


def test_error_empty_and_tiny_file(tmp_path):
    p = tmp_path / "e.qora"
    p.write_bytes(b"")
    expect(p, "not a .qora file")
    p.write_bytes(b"QORA\x01\x00")
    expect(p, "not a .qora file")


def test_error_truncated_data(good):
    raw = good.read_bytes()
    good.write_bytes(raw[: len(raw) - 100])
    expect(good, "truncated")


def test_error_truncated_header(good):
    raw = good.read_bytes()
    good.write_bytes(raw[:200])
    expect(good, "truncated: header")


def test_error_header_length_huge(good):
    expect(rewrite(good, hlen_override=1 << 40), "exceeds")


@pytest.mark.parametrize(
    "raw,pattern", [(b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object"), (b"\xff\xfe", "not valid JSON")]
)
def test_error_bad_json(good, raw, pattern):
    expect(rewrite(good, lambda h: raw), pattern)


def test_error_offset_out_of_range(good):
    def m(h):
        h["tensors"]["norm"]["offset"] = 1 << 40

    expect(rewrite(good, m), "runs past the end")


def test_error_misaligned_offset(good):
    def m(h):
        h["tensors"]["norm"]["offset"] += 4

    expect(rewrite(good, m), "not a multiple of 64")


def test_error_negative_offset(good):
    def m(h):
        h["tensors"]["norm"]["offset"] = -64

    expect(rewrite(good, m), "offset")


def test_error_nbytes_disagree(good):
    def m(h):
        h["tensors"]["norm"]["nbytes"] = 4

    expect(rewrite(good, m), "nbytes")


def test_error_missing_tensor(good):
    def m(h):
        del h["tensors"]["layers.1.wk"]

    expect(rewrite(good, m), "missing tensor layers.1.wk")


def test_error_missing_output_when_untied(tmp_path):
    p = tmp_path / "m.qora"
    write_model(p, qora_config(tie=True))

    def m(h):
        h["config"]["tie_embeddings"] = False

    expect(rewrite(p, m), "missing tensor output")


def test_error_output_present_when_tied(good):
    def m(h):
        h["config"]["tie_embeddings"] = True

    expect(rewrite(good, m), "unexpected tensor output")


def test_error_unexpected_tensor(good):
    def m(h):
        h["tensors"]["layers.0.bias"] = dict(h["tensors"]["norm"])

    expect(rewrite(good, m), "unexpected tensor layers.0.bias")


def test_error_shape_disagrees_with_config(good):
    def m(h):
        h["config"]["hidden_dim"] = 128

    expect(rewrite(good, m), "shape")


def test_error_unknown_dtype(good):
    def m(h):
        h["tensors"]["layers.0.wq"]["dtype"] = "q5"

    expect(rewrite(good, m), "unknown dtype 'q5'")


def test_error_norm_not_f32(good):
    def m(h):
        h["tensors"]["norm"]["dtype"] = "f16"
        h["tensors"]["norm"]["nbytes"] //= 2

    expect(rewrite(good, m), "must be stored as f32")


def test_error_q4_row_length(tmp_path):
    cfg = qora_config(dim=48, n_heads=3, n_kv_heads=1, head_dim=16)
    p = tmp_path / "m.qora"
    write_model(p, cfg, matrix_dtype="f16", embed_dtype="f16")

    def m(h):
        t = h["tensors"]["layers.0.wq"]
        t["dtype"], t["nbytes"] = "q4", 48 // 32 * 18

    expect(rewrite(p, m), "cannot be q4")


def test_error_overlap(good):
    def m(h):
        h["tensors"]["layers.0.ffn_norm"]["offset"] = h["tensors"]["layers.0.attn_norm"]["offset"]

    expect(rewrite(good, m), "overlap")


@pytest.mark.parametrize(
    "key,value,pattern",
    [
        ("n_kv_heads", 3, "not a multiple of n_kv_heads"),
        ("rope_layers", [1], "rope_layers"),
        ("rope_layers", [1, 2], "0 or 1"),
        ("dim", 0, "dim must be an integer"),
        ("dim", True, "dim must be an integer"),
        ("vocab_size", 1 << 40, "vocab_size must be an integer"),
        ("norm_eps", -1.0, "norm_eps"),
        ("rope_theta", "big", "rope_theta"),
        ("architecture", "gpt2", "unsupported architecture"),
        ("tie_embeddings", 1, "tie_embeddings"),
        ("rope_scaling", [1], "rope_scaling"),
        ("head_dim", 15, "even"),
    ],
)
def test_error_config_sanity(good, key, value, pattern):
    def m(h):
        h["config"][key] = value

    expect(rewrite(good, m), pattern)


def test_error_config_missing_key(good):
    def m(h):
        del h["config"]["max_seq_len"]

    expect(rewrite(good, m), "config is missing max_seq_len")


@pytest.mark.parametrize("key", ["config", "tokenizer", "tensors"])
def test_error_missing_header_key(good, key):
    def m(h):
        del h[key]

    expect(rewrite(good, m), f"missing '{key}'")


@pytest.mark.parametrize(
    "path,value,pattern",
    [
        (("tokenizer",), {"not": "a string"}, "tokenizer"),
        (("chat_template",), 5, "chat_template"),
        (("generation",), [1], "generation must be an object"),
        (("special_tokens", "eos"), [1 << 30], "special_tokens eos"),
        (("special_tokens", "bos"), "x", "special_tokens bos"),
        (("tensors", "norm", "shape"), ["64"], "bad shape"),
        (("tensors", "norm"), {"dtype": "f32"}, "needs dtype, shape, offset and nbytes"),
    ],
)
def test_error_bad_field_types(good, path, value, pattern):
    def m(h):
        d = h
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value

    expect(rewrite(good, m), pattern)
