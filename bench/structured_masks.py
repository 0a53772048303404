"""Token-mask cost of two constrained-decoding libraries, llguidance and outlines-core, at two vocabulary
sizes: the demo model's 49,152 and SmolLM3's 128,256 (a synthetic byte-level BPE: the demo tokenizer
grown with merges of random token pairs up to that size, so the token trie looks like a real one).

For each JSON schema of tests/structured_schemas.py: the time to compile it for the vocabulary, then
the time per token to compute the mask while a valid instance of the schema is fed token by token.

    python bench/structured_masks.py [--schemas N] [--vocab 49152,128256]

Prints one line per (library, vocabulary): compile ms (median over schemas) and mask µs per token
(median and p99 over every step of every schema). It also checks each library accepts every token of
every instance (a mask that refuses a valid continuation is a correctness failure).

    python bench/structured_masks.py --decode MODEL.qora [--threads N] [--schemas N]

measures what qora pays inside decoding: each schema's answer generated greedily with the schema
(the time spent in the Constraint's mask and advance, against the generation time), then the same
prompts without one (decode tok/s either way); and qora's whole per-token mask step (llguidance's
mask, unpacking, applying it to a logits vector, advancing) at a 128,256 vocabulary, against the
model's decode step. The share of decode time is the figure the issue bounds (<= 10 %).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def demo_tokenizer_json() -> str:
    from qora import demo
    from qora.format import read_qora

    return read_qora(demo.ensure_demo_model(demo.default_cache_dir())).tokenizer_json


def grown_tokenizer_json(text: str, size: int, seed: int = 0) -> str:
    """The tokenizer grown to `size` ids with merges of random pairs of its own tokens."""
    t = json.loads(text)
    vocab, merges = t["model"]["vocab"], t["model"]["merges"]
    added = {a["id"] for a in t["added_tokens"]}
    normal = [tok for tok, i in vocab.items() if i not in added]
    rng = random.Random(seed)
    next_id = max(vocab.values()) + 1
    while next_id < size:
        a, b = rng.choice(normal), rng.choice(normal)
        if a + b in vocab or len(a) + len(b) > 16:
            continue
        vocab[a + b] = next_id
        merges.append([a, b])
        normal.append(a + b)
        next_id += 1
    return json.dumps(t)


def token_bytes(text: str) -> list[bytes]:
    """Each id's bytes (byte-level BPE: undo the GPT-2 byte → unicode map); b"" for special tokens."""
    t = json.loads(text)
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    unmap = {chr(c): b for b, c in zip(bs, cs, strict=True)}
    size = max(t["model"]["vocab"].values()) + 1
    out = [b""] * size
    for tok, i in t["model"]["vocab"].items():
        out[i] = bytes(unmap[ch] for ch in tok)
    for a in t["added_tokens"]:
        out[a["id"]] = b""
    return out


def bench_llguidance(text, eos, schemas, instances):
    import llguidance
    import llguidance.numpy as lnp
    from tokenizers import Tokenizer

    t0 = time.perf_counter()
    lt = llguidance.LLTokenizer(text, eos_token=eos)
    setup = time.perf_counter() - t0
    hf = Tokenizer.from_str(text)
    compile_s, mask_s, bad = [], [], 0
    mask = lnp.allocate_token_bitmask(1, lt.vocab_size)
    for schema, inst in zip(schemas, instances, strict=True):
        t0 = time.perf_counter()
        m = llguidance.LLMatcher(lt, llguidance.LLMatcher.grammar_from_json_schema(schema))
        compile_s.append(time.perf_counter() - t0)
        for tok in hf.encode(json.dumps(inst), add_special_tokens=False).ids + [eos]:
            t0 = time.perf_counter()
            lnp.fill_next_token_bitmask(m, mask)
            mask_s.append(time.perf_counter() - t0)
            if not (mask[0, tok // 32] >> (tok % 32)) & 1 or not m.consume_token(tok):
                bad += 1
                break
    return setup, compile_s, mask_s, bad


def bench_outlines(text, eos, schemas, instances):
    import outlines_core as oc
    from tokenizers import Tokenizer

    t0 = time.perf_counter()
    tb = token_bytes(text)
    table: dict[bytes, list[int]] = {}
    for i, b in enumerate(tb):
        if b and i != eos:
            table.setdefault(b, []).append(i)
    voc = oc.Vocabulary(eos, table)
    setup = time.perf_counter() - t0
    hf = Tokenizer.from_str(text)
    compile_s, mask_s, bad = [], [], 0
    mask = np.zeros((len(tb) + 31) // 32, dtype=np.int32)
    for schema, inst in zip(schemas, instances, strict=True):
        t0 = time.perf_counter()
        regex = oc.json_schema.build_regex_from_schema(json.dumps(schema))
        guide = oc.Guide(oc.Index(regex, voc))
        compile_s.append(time.perf_counter() - t0)
        for tok in hf.encode(json.dumps(inst), add_special_tokens=False).ids + [eos]:
            t0 = time.perf_counter()
            guide.write_mask_into(mask.ctypes.data, mask.size, 4)
            mask_s.append(time.perf_counter() - t0)
            if not (mask[tok // 32] >> (tok % 32)) & 1:
                bad += 1
                break
            if tok != eos:
                guide.advance(tok, return_tokens=False)
    return setup, compile_s, mask_s, bad


def _timed_constraints():
    """Wrap structured.Constraint.apply / advance to add up the time spent in them."""
    from qora import structured

    spent = [0.0]
    for name in ("apply", "advance"):
        real = getattr(structured.Constraint, name)

        def timed(self, *a, _real=real):
            t0 = time.perf_counter()
            try:
                return _real(self, *a)
            finally:
                spent[0] += time.perf_counter() - t0

        setattr(structured.Constraint, name, timed)
    return spent


def bench_decode(path: str, threads: int | None, cases, base_tokenizer: str) -> None:
    import qora
    from qora import structured
    from qora.generate import GenerationOptions, stream_generate

    spent = _timed_constraints()
    with qora.load(path, threads=threads) as m:
        gen_s = tokens = 0.0
        for c in cases:
            opts = GenerationOptions(greedy=True, json_schema=c.schema, max_tokens=c.max_tokens)
            last = list(stream_generate(m, c.prompt, opts))[-1]
            gen_s, tokens = gen_s + last.generation_time, tokens + last.generation_tokens
        masked, free_s, free_tokens = spent[0], 0.0, 0
        for c in cases:
            opts = GenerationOptions(greedy=True, max_tokens=max(8, c.max_tokens // 2), ignore_eos=True)
            last = list(stream_generate(m, c.prompt, opts))[-1]
            free_s, free_tokens = free_s + last.generation_time, free_tokens + last.generation_tokens
        vocab = m.engine.vocab_size
    step = free_s / max(free_tokens, 1)
    print(
        f"decode {path}: vocab {vocab}, threads {threads or 'default'}: with a schema {tokens / gen_s:.1f} tok/s, "
        f"mask+advance {masked / tokens * 1e3:.3f} ms/token = {100 * masked / gen_s:.1f} % of generation time; "
        f"without a schema {free_tokens / free_s:.1f} tok/s ({step * 1e3:.2f} ms/token)",
        flush=True,
    )
    # qora's mask step at SmolLM3's vocabulary, replaying the valid instances
    from tokenizers import Tokenizer as HF

    from qora.tokenizer import Tokenizer

    text = grown_tokenizer_json(base_tokenizer, 128256)
    tok = Tokenizer(text, None, {"eos": [0]})
    hf = HF.from_str(text)
    logits = np.random.default_rng(0).standard_normal(128256).astype(np.float32)
    spent[0], n = 0.0, 0
    for c in cases:
        con = structured.Grammar.json_schema(c.schema).start(tok)
        for t in hf.encode(json.dumps(c.example, separators=(",", ":")), add_special_tokens=False).ids:
            con.apply(logits)
            con.advance(t)
            n += 1
    per = spent[0] / n
    print(
        f"mask step at vocab 128256: {per * 1e3:.3f} ms/token = {100 * per / step:.1f} % of this model's decode "
        f"step ({step * 1e3:.2f} ms)",
        flush=True,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--schemas", type=int, default=0, help="only the first N schemas (0: all)")
    ap.add_argument("--vocab", default="49152,128256")
    ap.add_argument("--libs", default="llguidance,outlines")
    ap.add_argument("--decode", metavar="MODEL", help="measure the mask's share of decode time on this model")
    ap.add_argument("--threads", type=int)
    args = ap.parse_args(argv)
    from structured_schemas import SCHEMAS

    cases = SCHEMAS[: args.schemas or None]
    if args.decode:
        bench_decode(args.decode, args.threads, cases, demo_tokenizer_json())
        return 0
    schemas = [c.schema for c in cases]
    instances = [c.example for c in cases]
    base = demo_tokenizer_json()
    eos = json.loads(base)["added_tokens"][0]["id"]  # <|endoftext|>
    for size in (int(v) for v in args.vocab.split(",")):
        text = base if size <= 49152 else grown_tokenizer_json(base, size)
        for lib in args.libs.split(","):
            fn = bench_llguidance if lib == "llguidance" else bench_outlines
            setup, comp, masks, bad = fn(text, eos, schemas, instances)
            us = sorted(m * 1e6 for m in masks)
            print(
                f"{lib:11s} vocab {size:6d}: tokenizer setup {setup * 1e3:7.0f} ms, compile median "
                f"{statistics.median(comp) * 1e3:7.1f} ms max {max(comp) * 1e3:7.0f} ms, mask median "
                f"{statistics.median(us):7.1f} us p99 {us[int(0.99 * (len(us) - 1))]:8.1f} us over {len(us)} "
                f"steps, refused valid tokens in {bad}/{len(cases)} schemas",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
