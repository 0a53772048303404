"""Check that a .qora and the GGUF twin bench/random_gguf.py writes are the same model.

1. Bytes: the random GGUF, converted back by qora's own GGUF importer (which undoes llama.cpp's Q/K
   permutation independently), equals the random .qora tensor for tensor, byte for byte.
2. Layout as llama.cpp reads it: llama.cpp's logits on the GGUF against qora's on the .qora, for a
   few-layer model of the full SmolLM3-3B width. The bench weights give near-uniform attention, which
   would hide a Q/K row mix-up, so this step scales Q and K up (peaked attention) and also runs a
   negative control, the same GGUF without the Q/K permutation: it must land clearly further away.
3. (--qora M) the same logit check for any .qora, e.g. the real demo model.
Under a minute on two cores, about 1 GB of disk in $TMPDIR.
Needs a llama.cpp tree and its CPU build (static libraries, see bench/README.md). Usage:
    python bench/check_same_model.py --llama-src /tmp/lcp/src/vendor/llama.cpp --llama-build /tmp/lcb-native \
        [--qora ~/.cache/qora/smollm2-135m-instruct-q4.qora --pre smollm]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import random_gguf  # noqa: E402
import random_model  # noqa: E402

# Evaluates the prompt in one batch with logits for every position (F32 KV cache, no flash attention)
# and writes them as float32 (n_tokens, n_vocab). Arguments: model, n_threads, out, token ids...
DRIVER_CPP = r"""
#include "llama.h"
#include <cstdio>
#include <cstdlib>
#include <vector>
static void quiet(enum ggml_log_level, const char *, void *) {}
int main(int argc, char ** argv) {
    if (argc < 5) return 2;
    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model * model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (!model) return 3;
    std::vector<llama_token> toks;
    for (int i = 4; i < argc; i++) toks.push_back(atoi(argv[i]));
    auto cp = llama_context_default_params();
    cp.n_ctx = 512; cp.n_batch = 512; cp.n_ubatch = 512;
    cp.n_threads = cp.n_threads_batch = atoi(argv[2]);
    cp.type_k = GGML_TYPE_F32; cp.type_v = GGML_TYPE_F32;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) return 4;
    int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    llama_batch b = llama_batch_init(512, 0, 1);
    b.n_tokens = toks.size();
    for (size_t i = 0; i < toks.size(); i++) {
        b.token[i] = toks[i]; b.pos[i] = i; b.n_seq_id[i] = 1; b.seq_id[i][0] = 0; b.logits[i] = 1;
    }
    if (llama_decode(ctx, b)) return 5;
    FILE * f = fopen(argv[3], "wb");
    for (size_t i = 0; i < toks.size(); i++) fwrite(llama_get_logits_ith(ctx, i), sizeof(float), n_vocab, f);
    fclose(f);
    llama_batch_free(b); llama_free(ctx); llama_model_free(model);
    return 0;
}
"""


def build_driver(src: Path, build: Path, work: Path) -> Path:
    cpp, exe = work / "same_model.cpp", work / "same_model"
    cpp.write_text(DRIVER_CPP)
    libs = ["src/libllama.a", "ggml/src/libggml.a", "ggml/src/libggml-cpu.a", "ggml/src/libggml-base.a"]
    missing = [lib for lib in libs if not (build / lib).is_file()]
    if missing:
        sys.exit(f"check_same_model: {build} lacks {', '.join(missing)} (a static CPU build, see bench/README.md)")
    cmd = ["g++", "-O2", "-std=c++17", str(cpp), "-I", str(src / "include"), "-I", str(src / "ggml/include")]
    cmd += [str(build / lib) for lib in libs] + ["-fopenmp", "-lpthread", "-ldl", "-o", str(exe)]
    subprocess.run(cmd, check=True)
    return exe


def llama_logits(exe: Path, gguf: Path, ids, n_vocab: int, threads: int, work: Path) -> np.ndarray:
    out = work / "logits.bin"
    subprocess.run([str(exe), str(gguf), str(threads), str(out), *map(str, ids)], check=True)
    return np.fromfile(out, dtype=np.float32).reshape(len(ids), n_vocab)


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    """How close two (n_tokens, vocab) logit arrays are, relative to the spread of b."""
    d = a - b
    return {
        "rel_rms": float(np.sqrt((d * d).mean() / b.var())),
        "max_abs": float(np.abs(d).max()),
        "corr": float(np.corrcoef(a.ravel(), b.ravel())[0, 1]),
        "argmax_agree": float((a.argmax(1) == b.argmax(1)).mean()),
    }


def peaked_qora(path: Path, n_layers: int, scale: float = 0.01) -> Path:
    """random_model's weights with larger Q/K/V/O block scales: attention is peaked (so it depends on
    the Q/K row layout) and its output dominates the residual stream (so the logits show it)."""
    from qora.format import QoraWriter

    cfg = dict(random_model.SMOLLM3_CONFIG)
    cfg["n_layers"], cfg["rope_layers"] = n_layers, cfg["rope_layers"][:n_layers]
    tensors = random_model.tensor_list(cfg, "q4")
    tok = (HERE.parent / "tests" / "fixtures" / "tiny-smollm3" / "tokenizer.json").read_text()
    w = QoraWriter(path, cfg, tok, None, {}, {"eos": [], "bos": None}, {"from": "check"}, tensors=tensors)
    rng = np.random.default_rng(0)
    for name, dtype, shape in tensors:
        a = random_model.random_tensor(rng, dtype, shape)
        if name.endswith((".wq", ".wk", ".wv", ".wo")):
            blocks = a.reshape(shape[0], -1, 18)
            blocks[:, :, :2] = np.frombuffer(np.float16(scale).tobytes(), np.uint8)
        w.add_tensor(name, dtype, shape, a)
    w.finish()
    return path


def check_bytes(work: Path, n_layers: int) -> bool:
    from qora.convert import convert
    from qora.format import read_qora

    qpath, _ = random_model.write_random_model(work / "r.qora", "q4", n_layers)
    gpath, _ = random_gguf.write_random_gguf(work / "r.gguf", "q4", n_layers)
    back = convert(str(gpath), str(work / "back.qora"), quant="q4", progress=False)
    with read_qora(qpath) as a, read_qora(back) as b:
        names_ok = sorted(a.tensor_info) == sorted(b.tensor_info)
        same = [
            n
            for n in a.tensor_info
            if n in b.tensor_info
            and a.tensor_info[n]["dtype"] == b.tensor_info[n]["dtype"]
            and np.array_equal(a.tensor(n), b.tensor(n))
        ]
        ok = names_ok and len(same) == len(a.tensor_info) and a.config == b.config
        print(
            f"1. bytes: {len(same)}/{len(a.tensor_info)} tensors identical after GGUF -> qora convert, "
            f"config {'equal' if a.config == b.config else 'DIFFERENT'}: {'ok' if ok else 'FAILED'}"
        )
    for p in (qpath, gpath, back):
        Path(p).unlink()
    return ok


def check_logits(work: Path, exe: Path, qpath: Path, title: str, n_tokens: int, threads: int, pre: str) -> bool:
    """llama.cpp on qpath's GGUF twin vs qora on qpath, and on a twin without the Q/K permutation."""
    import qora
    from qora.format import read_qora

    gpath = random_gguf.qora_to_gguf(qpath, work / "twin.gguf", pre=pre)
    with read_qora(qpath) as q:
        vocab = q.config["vocab_size"]
    ids = np.random.default_rng(1).integers(0, vocab, size=n_tokens).tolist()
    with qora.load(qpath, threads=threads, max_seq_len=512) as m:
        ours = m.forward(ids)
    twin = compare(llama_logits(exe, gpath, ids, vocab, threads, work), ours)
    with read_qora(qpath) as q:  # negative control: Q/K rows left in HF order
        plan = [(n, i["dtype"], tuple(i["shape"])) for n, i in q.tensor_info.items()]
        quant = next(d for _, d, s in plan if len(s) == 2)

        def add_tok(w):
            random_gguf.add_tokenizer_from_json(w, q.tokenizer_json, vocab, q.special_tokens, pre)

        arrays = (q.tensor(n) for n, _, _ in plan)
        random_gguf.write_gguf(gpath, dict(q.config), plan, arrays, add_tok, quant, permute=False)
    control = compare(llama_logits(exe, gpath, ids, vocab, threads, work), ours)
    gpath.unlink()
    ok = twin["corr"] > 0.99 and twin["rel_rms"] < 0.25 * control["rel_rms"]
    print(f"{title}, {n_tokens} tokens: llama.cpp vs qora logits")
    for name, r in (("GGUF twin (Q/K permuted)", twin), ("control (not permuted)", control)):
        print(f"   {name:26s} " + "  ".join(f"{k} {v:.4g}" for k, v in r.items()))
    print(f"   {'ok' if ok else 'FAILED'}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-src", type=Path, required=True, help="llama.cpp source tree (include/, ggml/include/)")
    ap.add_argument("--llama-build", type=Path, required=True, help="its cmake build folder")
    ap.add_argument("--layers", type=int, default=4, help="4 covers a NoPE layer (every 4th)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--qora", type=Path, default=None, help="also check this .qora against its GGUF twin")
    ap.add_argument("--pre", default="llama-bpe", help="GGUF pre-tokenizer name for --qora (e.g. smollm)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="qora-same-") as tmp:
        work = Path(tmp)
        exe = build_driver(a.llama_src, a.llama_build, work)
        ok = check_bytes(work, a.layers)
        peaked = peaked_qora(work / "p.qora", a.layers)
        title = f"2. random {a.layers}-layer model with peaked attention"
        ok = check_logits(work, exe, peaked, title, a.tokens, a.threads, "llama-bpe") and ok
        if a.qora:
            ok = check_logits(work, exe, a.qora, f"3. {a.qora.name}", a.tokens, a.threads, a.pre) and ok
    print("same model: " + ("yes" if ok else "NO"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
