"""`qora perplexity`: a model's perplexity on a text, computed as llama-perplexity computes it, and
its KL divergence from a reference model's saved log-probabilities.

    qora perplexity --load model.gguf --file wiki.test.raw [--ctx 512] [--chunks N]
    qora perplexity --load f16.gguf --file T --save-logits base.npz      # the reference, once
    qora perplexity --load q4_k.gguf --file T --kl-base base.npz         # KL divergence from it

The method (llama.cpp tools/perplexity, `perplexity()`): the text is tokenized once (with the BOS the
tokenizer adds, special-token spellings as plain text); it is cut into chunks of `ctx` tokens (as
many whole chunks as fit; at least two are needed), each run from an empty KV cache with its first
token replaced by BOS where the model adds one; in each chunk only the second half is scored (every
scored token sees at least ctx/2 tokens of context): the negative log-likelihood of token j+1 from
the logits at j, for j in [ctx/2, ctx - 1). PPL = exp(mean NLL), and the ± is the standard error
of that mean carried through exp: sqrt((mean(NLL²) - mean(NLL)²) / (n - 1)) × PPL.

The saved reference (`--save-logits`) holds the tokens, the context and each scored position's
log-probabilities over the whole vocabulary, stored as 16-bit steps between the row's minimum and
maximum (llama.cpp's --kl-divergence-base stores them the same way; the file format is qora's own,
an .npz). KL divergence per position is sum_v p_base(v) (log p_base(v) - log p_model(v)); the
report gives its mean ± standard error, median, 99th percentile and maximum, and how often both
models rank the same token first.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from qora.errors import FormatError, QoraError

DEFAULT_CTX = 512  # llama-perplexity's usual -c for published numbers


@dataclass
class KLStats:
    mean: float
    error: float
    median: float
    p99: float
    maximum: float
    same_top: float  # share of positions where both models rank the same token first
    base_ppl: float


@dataclass
class PerplexityResult:
    ppl: float
    error: float
    ctx: int
    chunks: int
    scored: int  # tokens whose NLL entered the mean
    text_tokens: int
    chunk_ppl: list[float] = field(default_factory=list)  # running PPL after each chunk, as llama prints
    kl: KLStats | None = None


def add_bos_id(tokenizer) -> int | None:
    """The BOS id the tokenizer puts in front of a text (llama-perplexity puts it at every chunk's
    start), or None when it adds none."""
    bos = tokenizer.bos_id
    if bos is None:
        return None
    probe = tokenizer.encode("a", add_special_tokens=True, parse_special=False)
    return bos if probe[:1] == [bos] else None


def tokenize_text(tokenizer, text: str) -> list[int]:
    """The text as llama-perplexity tokenizes it: special tokens added, their spellings plain text."""
    return tokenizer.encode(text, add_special_tokens=True, parse_special=False)


def chunk_count(n_tokens: int, ctx: int, chunks: int | None = None) -> int:
    if n_tokens < 2 * ctx:
        raise QoraError(
            f"the text is {n_tokens} tokens: at least {2 * ctx} are needed for a {ctx}-token context "
            "(give a longer text or a smaller --ctx)"
        )
    n = n_tokens // ctx
    return n if chunks is None else min(n, chunks)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Rows of float32 logits -> float64 log-probabilities."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


# ───── the reference log-probabilities ─────


def pack_logprobs(lp: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float log-probs [n, vocab] -> (uint16 steps, row minimum, row step) (16 bits over each row's range)."""
    lo = lp.min(axis=-1)
    step = np.maximum(lp.max(axis=-1) - lo, 1e-30) / 65535.0
    q = np.rint((lp - lo[:, None]) / step[:, None])
    return np.clip(q, 0, 65535).astype(np.uint16), lo.astype(np.float32), step.astype(np.float32)


def unpack_logprobs(q: np.ndarray, lo: np.ndarray, step: np.ndarray) -> np.ndarray:
    return q.astype(np.float64) * step[:, None].astype(np.float64) + lo[:, None].astype(np.float64)


class Reference:
    """Saved log-probabilities of a reference model on one text (--save-logits / --kl-base)."""

    def __init__(self, tokens, ctx: int, vocab: int):
        self.tokens = np.asarray(tokens, dtype=np.int32)
        self.ctx, self.vocab = int(ctx), int(vocab)
        self.q: list[np.ndarray] = []
        self.lo: list[np.ndarray] = []
        self.step: list[np.ndarray] = []

    def add(self, lp: np.ndarray) -> None:
        q, lo, step = pack_logprobs(lp)
        self.q.append(q)
        self.lo.append(lo)
        self.step.append(step)

    def chunk(self, i: int) -> np.ndarray:
        return unpack_logprobs(self.q[i], self.lo[i], self.step[i])

    def save(self, path) -> None:
        from qora.safeio import AtomicWriter

        with AtomicWriter(path) as w:
            np.savez(
                w.file, tokens=self.tokens, ctx=np.int64(self.ctx), vocab=np.int64(self.vocab),
                q=np.stack(self.q), lo=np.stack(self.lo), step=np.stack(self.step),
            )  # fmt: skip

    @classmethod
    def load(cls, path) -> Reference:
        from qora.safeio import open_regular

        where = str(path)
        try:
            with open_regular(path, where) as f, np.load(f, allow_pickle=False) as z:
                tokens, ctx, vocab = z["tokens"], int(z["ctx"]), int(z["vocab"])
                q, lo, step = z["q"], z["lo"], z["step"]
        except (OSError, ValueError, KeyError, EOFError) as e:
            raise FormatError(f"{where}: not a reference saved by qora perplexity --save-logits ({e})") from None
        n, rows = q.shape[0] if q.ndim == 3 else -1, ctx - 1 - ctx // 2
        if q.ndim != 3 or q.shape[1:] != (rows, vocab) or lo.shape != (n, rows) or step.shape != (n, rows):
            raise FormatError(f"{where}: the saved log-probabilities do not match its context {ctx} and vocab {vocab}")
        if q.dtype != np.uint16 or not (np.isfinite(lo).all() and np.isfinite(step).all()):
            raise FormatError(f"{where}: the saved log-probabilities are not 16-bit steps with finite scales")
        ref = cls(tokens, ctx, vocab)
        ref.q, ref.lo, ref.step = list(q), list(lo), list(step)
        return ref


def _kl_stats(kld: np.ndarray, same: np.ndarray, base_nll: float) -> KLStats:
    n = kld.size
    mean = float(kld.mean())
    err = math.sqrt(max(float((kld**2).mean()) - mean * mean, 0.0) / max(n - 1, 1))
    return KLStats(
        mean=mean, error=err, median=float(np.median(kld)), p99=float(np.percentile(kld, 99)),
        maximum=float(kld.max()), same_top=float(same.mean()), base_ppl=math.exp(base_nll),
    )  # fmt: skip


# ───── the run ─────


def perplexity(
    model,
    tokens,
    ctx: int = DEFAULT_CTX,
    chunks: int | None = None,
    save: Reference | None = None,
    base: Reference | None = None,
    on_chunk=None,
) -> PerplexityResult:
    """PPL of `model` on `tokens` (see the module docstring); `save` collects the scored positions'
    log-probabilities, `base` is a reference to compute the KL divergence from (same tokens and ctx).
    on_chunk(i, n, running_ppl) is called after each chunk."""
    n_chunk = chunk_count(len(tokens), ctx, chunks)
    if ctx > model.engine.max_seq_len:
        raise QoraError(f"--ctx {ctx} is larger than the model's {model.engine.max_seq_len}-token context")
    if base is not None:
        _check_base(base, tokens, ctx, model.config["vocab_size"], n_chunk)
    bos = add_bos_id(model.tokenizer)
    first = ctx // 2
    nll = nll2 = 0.0
    count = 0
    out = PerplexityResult(0.0, 0.0, ctx, n_chunk, 0, len(tokens))
    kld, same, base_nll = [], [], 0.0
    for i in range(n_chunk):
        start = i * ctx
        ids = list(tokens[start : start + ctx])
        if bos is not None:
            ids[0] = bos
        logits = model.forward(ids, 0)
        lp = log_softmax(logits[first : ctx - 1])
        target = np.asarray(tokens[start + first + 1 : start + ctx], dtype=np.int64)
        v = -lp[np.arange(target.size), target]
        nll += float(v.sum())
        nll2 += float((v * v).sum())
        count += target.size
        if save is not None:
            save.add(lp)
        if base is not None:
            b = base.chunk(i)
            kld.append((np.exp(b) * (b - lp)).sum(axis=-1))
            same.append(b.argmax(axis=-1) == lp.argmax(axis=-1))
            base_nll -= float(b[np.arange(target.size), target].sum())
        out.chunk_ppl.append(math.exp(nll / count))
        if on_chunk is not None:
            on_chunk(i + 1, n_chunk, out.chunk_ppl[-1])
    mean, mean2 = nll / count, nll2 / count
    out.ppl = math.exp(mean)
    var = mean2 - mean * mean
    out.error = math.sqrt(var / (count - 1)) * out.ppl if var > 0 and count > 1 else 0.0
    out.scored = count
    if base is not None:
        out.kl = _kl_stats(np.concatenate(kld), np.concatenate(same), base_nll / count)
    return out


def _check_base(base: Reference, tokens, ctx: int, vocab: int, n_chunk: int) -> None:
    if base.ctx != ctx:
        raise QoraError(f"the reference was computed with --ctx {base.ctx}, not {ctx}")
    if base.vocab != vocab:
        raise QoraError(f"the reference has a vocabulary of {base.vocab} tokens, this model {vocab}")
    if len(base.q) < n_chunk or not np.array_equal(base.tokens[: n_chunk * ctx], np.asarray(tokens[: n_chunk * ctx])):
        raise QoraError("the reference was computed on another text or tokenizer (its tokens differ)")


# ───── command line ─────


def build_parser() -> argparse.ArgumentParser:
    from qora.cli import PROG, add_context_args, int_at_least

    p = argparse.ArgumentParser(
        prog=f"{PROG} perplexity",
        description="Perplexity of a model on a text, as llama-perplexity computes it, and KL divergence "
        "from a reference model's saved log-probabilities.",
        epilog="Example: qora perplexity --load model.gguf --file wiki.test.raw --ctx 512",
    )
    p.add_argument("--load", metavar="PATH", help="the model (.gguf or .qora; default: ./model.qora, else the demo)")
    p.add_argument("--file", "-f", required=True, metavar="TEXT", help="the text (UTF-8)")
    p.add_argument("--ctx", "-c", type=int_at_least(4), default=DEFAULT_CTX, metavar="N",
                   help=f"tokens per chunk; the second half of each is scored (default {DEFAULT_CTX})")  # fmt: skip
    p.add_argument("--chunks", type=int_at_least(1), metavar="N", help="score at most N chunks (default: all)")
    p.add_argument("--save-logits", metavar="FILE", help="save the scored log-probabilities as a KL reference")
    p.add_argument("--kl-base", metavar="FILE", help="a reference saved with --save-logits: report KL divergence")
    p.add_argument("--threads", type=int_at_least(1), metavar="N", help="CPU threads")
    add_context_args(p)
    dev = p.add_mutually_exclusive_group()
    dev.add_argument("--cpu", action="store_true", help="never try a GPU")
    dev.add_argument("--gpu", action="store_true", help="require the GPU")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--quiet", "-q", action="store_true", help="no per-chunk progress on stderr")
    return p


def report(r: PerplexityResult) -> str:
    lines = [
        f"chunks: {r.chunks} x {r.ctx} tokens ({r.scored} scored of {r.text_tokens})",
        f"Final estimate: PPL = {r.ppl:.4f} +/- {r.error:.5f}",
    ]
    if r.kl is not None:
        k = r.kl
        lines += [
            f"PPL(base) = {k.base_ppl:.4f}   PPL ratio = {r.ppl / k.base_ppl:.5f}",
            f"Mean KLD: {k.mean:.6f} +/- {k.error:.6f}   median {k.median:.6f}   99% {k.p99:.6f}   max {k.maximum:.6f}",
            f"Same top token: {100 * k.same_top:.3f} %",
        ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from qora import log as qlog
    from qora.cli import PROG, device_choice, read_text
    from qora.loader import load_model
    from qora.safeio import open_regular

    args = build_parser().parse_args(argv)
    qlog.configure(False)
    with open_regular(Path(args.file).expanduser(), args.file, error=QoraError) as f:
        text = read_text(f, args.file)
    base = Reference.load(args.kl_base) if args.kl_base else None
    model = load_model(
        args.load, device_choice(args), args.threads, args.ctx, rope_scaling=args.rope_scaling, kv_type=args.kv_type,
        precision=args.precision,
    )  # fmt: skip
    try:
        tokens = tokenize_text(model.tokenizer, text)
        save = Reference(tokens, args.ctx, model.config["vocab_size"]) if args.save_logits else None

        def progress(i, n, ppl):
            if not args.quiet:
                end = "\n" if i == n else ""
                print(f"\r{PROG}: [{i}/{n}] PPL {ppl:.4f}", end=end, file=sys.stderr, flush=True)

        r = perplexity(model, tokens, args.ctx, args.chunks, save=save, base=base, on_chunk=progress)
        if save is not None:
            save.tokens = save.tokens[: r.chunks * args.ctx]
            save.save(args.save_logits)
        print(json.dumps(asdict(r)) if args.json else report(r))
        return 0
    finally:
        model.close()
