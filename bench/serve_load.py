"""Serving load: C concurrent streaming clients against `qora serve --parallel N` and against
llama-server `-np N` on the same GGUF with the same threads, interleaved (issue 17's goals).

Each client sends one streaming chat request (a prompt of its own, greedy, `ignore_eos` so every
answer is exactly --max-tokens tokens) at the same moment; reported per server and client count:
aggregate decode throughput (all completion tokens / wall time from the first request to the last
token) and p50 / p99 time to first token. Repetitions alternate between the two servers.

    python bench/serve_load.py                       # the demo model, 1 / 8 / 32 clients, 2 threads
    python bench/serve_load.py --model M.gguf --threads 16 --clients 1,8,32 --parallel 8
    python bench/serve_load.py --no-peer             # qora only
    python bench/serve_load.py --gpu --model M.gguf --peer /path/llama-server   # qora --gpu vs -ngl 99

The model defaults to the demo model's own Q4_1 GGUF (bench/harness.py ensure_demo_pair). qora runs
the GGUF file itself, so both servers read one file. llama-server: --peer PATH (default /tmp/lcb-native/bin/llama-server, built as
bench/README.md describes for llama-bench, target llama-server).

--gpu: qora serves with `--gpu` (the Vulkan engine's batched step: all rows of a step in one pass, the
slots' KV caches on the device) and llama-server with every layer offloaded (`-ngl 99`; give it a CUDA
or Vulkan build with --peer). --nvidia-icd writes a loader manifest for NVIDIA's Vulkan driver where a
container has the driver but no manifest (bench/vulkan_bench.py). The server's stderr goes to
--log-dir when given (which device it chose, the pre-flight of the slots).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
TOPICS = ["a dragon", "the sea", "a robot", "a city at night", "a lost key", "winter", "a train", "a garden"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not become ready")


class Server:
    def __init__(self, name: str, cmd: list[str], port: int, model_id: str | None, log_dir: Path | None = None):
        self.name, self.cmd, self.port, self.model_id = name, cmd, port, model_id
        self.url = f"http://127.0.0.1:{port}"
        self.proc = None
        self.log_dir = log_dir

    def __enter__(self):
        self.err = subprocess.DEVNULL
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.err = open(self.log_dir / f"{self.name}.log", "a")  # noqa: SIM115 (closed in __exit__)
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=self.err)
        wait_ready(self.url, self.proc)
        if self.model_id is None:
            self.model_id = httpx.get(self.url + "/v1/models", timeout=10).json()["data"][0]["id"]
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.err is not subprocess.DEVNULL:
            self.err.close()


def one_client(server: Server, i: int, max_tokens: int, start: threading.Event, out: list) -> None:
    body = {
        "model": server.model_id,
        "messages": [{"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]} (#{i})."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    start.wait()
    t0 = time.perf_counter()
    first = None
    chunks = 0
    usage = None
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                usage = ev["usage"]
            for ch in ev.get("choices") or []:
                if (ch.get("delta") or {}).get("content"):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter()
    end = time.perf_counter()
    tokens = usage["completion_tokens"] if usage and usage.get("completion_tokens") else chunks
    out.append({"t0": t0, "ttft": (first or end) - t0, "end": end, "tokens": tokens})


def load(server: Server, clients: int, max_tokens: int) -> dict:
    start, out = threading.Event(), []
    threads = [threading.Thread(target=one_client, args=(server, i, max_tokens, start, out)) for i in range(clients)]
    for t in threads:
        t.start()
    start.set()
    for t in threads:
        t.join()
    if len(out) != clients:
        raise RuntimeError(f"{server.name}: {clients - len(out)} clients failed")
    wall = max(o["end"] for o in out) - min(o["t0"] for o in out)
    ttfts = sorted(o["ttft"] for o in out)
    return {
        "tok_s": sum(o["tokens"] for o in out) / wall,
        "ttft_p50": statistics.median(ttfts),
        "ttft_p99": ttfts[min(len(ttfts) - 1, int(round(0.99 * (len(ttfts) - 1))))],
        "tokens": sum(o["tokens"] for o in out),
    }


def default_model() -> Path:
    sys.path.insert(0, str(HERE))
    import harness

    return Path(harness.ensure_demo_pair().gguf)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="GGUF file both servers run (default: the demo model's Q4_1 GGUF)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clients", default="1,8,32", help="client counts, comma-separated")
    p.add_argument("--parallel", type=int, default=8, help="qora --parallel / llama-server -np")
    p.add_argument("--context", type=int, default=1024, help="context per sequence")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--peer", default="/tmp/lcb-native/bin/llama-server")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--gpu", action="store_true", help="qora --gpu, llama-server -ngl 99")
    p.add_argument("--nvidia-icd", action="store_true", help="write an NVIDIA Vulkan loader manifest if missing")
    p.add_argument("--log-dir", type=Path, help="the servers' stderr, one file each")
    p.add_argument(
        "--precision",
        choices=("q8", "f32"),
        help="qora serve --precision (q8: llama.cpp's arithmetic, 8-bit activations; default: qora's choice "
        "for the file, f32 for a GGUF of up to 1B weights)",
    )
    a = p.parse_args(argv)
    if a.nvidia_icd and not os.environ.get("VK_ICD_FILENAMES"):
        sys.path.insert(0, str(HERE))
        from vulkan_bench import nvidia_icd

        icd = nvidia_icd()
        if icd:
            os.environ["VK_ICD_FILENAMES"] = icd
    model = a.model or default_model()
    counts = [int(c) for c in a.clients.split(",")]
    qport = free_port()
    qora_cmd = [sys.executable, "-m", "qora", "serve", "--load", str(model), "--port", str(qport)]
    qora_cmd += ["--threads", str(a.threads), "--parallel", str(a.parallel), "--context", str(a.context)]
    qora_cmd += ["--max-queued", "1024"] + (["--gpu", "--verbose"] if a.gpu else [])
    qora_cmd += ["--precision", a.precision] if a.precision else []
    servers = [Server("qora", qora_cmd, qport, None, a.log_dir)]
    if not a.no_peer:
        if not os.access(a.peer, os.X_OK):
            raise SystemExit(f"no llama-server at {a.peer} (--peer PATH, or --no-peer)")
        lport = free_port()
        llama_cmd = [a.peer, "-m", str(model), "--port", str(lport), "-t", str(a.threads), "-tb", str(a.threads)]
        llama_cmd += ["-np", str(a.parallel), "-c", str(a.parallel * a.context), "-cb", "--no-webui"]
        llama_cmd += ["-ngl", "99"] if a.gpu else []
        servers.append(Server("llama-server", llama_cmd, lport, "model", a.log_dir))
    results: dict[str, dict[int, list[dict]]] = {s.name: {c: [] for c in counts} for s in servers}
    where = "GPU (qora --gpu, llama-server -ngl 99)" if a.gpu else "CPU"
    print(f"model {model.name}, {where}, {a.threads} threads, parallel {a.parallel}, {a.max_tokens} tokens per answer")
    # one server at a time (they would fight for the cores), alternating over the repetitions
    for rep in range(a.reps):
        for srv in servers if rep % 2 == 0 else servers[::-1]:
            with srv:
                load(srv, 1, 4)  # warm-up
                for c in counts:
                    r = load(srv, c, a.max_tokens)
                    results[srv.name][c].append(r)
                    print(
                        f"rep {rep} {srv.name:12s} {c:3d} clients: {r['tok_s']:7.1f} tok/s, "
                        f"TTFT p50 {r['ttft_p50']:.2f} s p99 {r['ttft_p99']:.2f} s",
                        flush=True,
                    )
    print("\nbest of reps (aggregate tok/s; TTFT p50 / p99 of that rep)")
    print(f"{'clients':>7} " + " ".join(f"{s.name:>32s}" for s in servers))
    for c in counts:
        cells = []
        for s in servers:
            b = max(results[s.name][c], key=lambda r: r["tok_s"])
            cells.append(f"{b['tok_s']:8.1f} tok/s {b['ttft_p50']:6.2f}/{b['ttft_p99']:6.2f} s")
        print(f"{c:>7} " + " ".join(f"{x:>32s}" for x in cells))
    q = {c: max(r["tok_s"] for r in results["qora"][c]) for c in counts}
    if 1 in q:
        for c in counts[1:]:
            print(f"qora {c} clients / 1 client: {q[c] / q[1]:.2f}x")
    if not a.no_peer:
        for c in counts:
            peer = max(r["tok_s"] for r in results["llama-server"][c])
            print(f"qora / llama-server at {c} clients: {q[c] / peer:.2f}x")
    if a.json:
        a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
