"""qora perplexity vs llama-perplexity on the same GGUF files and text: the table in bench/NOTES.md.

    python bench/perplexity_compare.py --text /usr/share/common-licenses/GPL-3 --ctx 512 --chunks 4 \\
        --llama /tmp/lcb-native/bin/llama-perplexity --threads 2 model.f16.gguf model.q8_0.gguf ...

For each file: `qora perplexity --json` and `llama-perplexity -f TEXT -c CTX --chunks N` (same
chunking: chunks of CTX tokens, the second half of each scored), run one after the other, and the
relative difference of the two PPLs. A file whose tensor types qora has no kernels for is listed
with qora's one-line error. Both run on the CPU with the same thread count.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path


def qora_ppl(path: str, args) -> tuple[float, float] | str:
    cmd = [sys.executable, "-m", "qora", "perplexity", "--load", path, "--file", args.text, "--ctx", str(args.ctx),
           "--cpu", "--threads", str(args.threads), "--json", "-q"]  # fmt: skip
    if args.chunks:
        cmd += ["--chunks", str(args.chunks)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return (p.stderr.strip().splitlines() or ["failed"])[-1]
    r = json.loads(p.stdout)
    return r["ppl"], r["error"]


def llama_ppl(path: str, args) -> tuple[float, float] | str:
    cmd = [args.llama, "-m", path, "-f", args.text, "-c", str(args.ctx), "-t", str(args.threads), "-b", str(args.ctx)]
    if args.chunks:
        cmd += ["--chunks", str(args.chunks)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", p.stdout + p.stderr)
    if not m:
        return (p.stderr.strip().splitlines() or ["failed"])[-1]
    return float(m.group(1)), float(m.group(2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--text", required=True)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama", default="/tmp/lcb-native/bin/llama-perplexity")
    args = ap.parse_args()
    print(f"text {args.text}, ctx {args.ctx}, chunks {args.chunks or 'all'}, {args.threads} threads")
    print("| file | qora PPL | llama.cpp PPL | difference |")
    print("|---|---|---|---|")
    for f in args.files:
        q, ll = qora_ppl(f, args), llama_ppl(f, args)
        name = Path(f).name
        if isinstance(q, str) or isinstance(ll, str):
            print(f"| {name} | {q if isinstance(q, str) else f'{q[0]:.4f} ± {q[1]:.4f}'} | "
                  f"{ll if isinstance(ll, str) else f'{ll[0]:.4f} ± {ll[1]:.4f}'} | – |", flush=True)  # fmt: skip
            continue
        diff = 100 * (q[0] - ll[0]) / ll[0]
        print(f"| {name} | {q[0]:.4f} ± {q[1]:.4f} | {ll[0]:.4f} ± {ll[1]:.4f} | {diff:+.2f} % |", flush=True)


if __name__ == "__main__":
    main()
