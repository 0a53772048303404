"""Options, model files and the llama.cpp peer for the CPU speed benchmarks (python -m pytest bench).

Not part of the test suite: tests/ is what CI runs; bench/ is collected only when named.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

try:
    import pytest_benchmark  # noqa: F401
except ImportError:  # every benchmark then skips, saying what to install

    @pytest.fixture
    def benchmark():
        pytest.skip("pytest-benchmark is not installed: pip install -e '.[bench]'")


def pytest_addoption(parser):
    g = parser.getgroup("qora-bench", "qora CPU speed benchmarks")
    g.addoption(
        "--threads",
        type=int,
        default=None,
        help="threads for qora and the peer (QORA_BENCH_THREADS; default: physical cores)",
    )
    g.addoption(
        "--pp",
        default=os.environ.get("QORA_BENCH_PP", "128"),
        help="prompt lengths, comma separated, e.g. 128,512 (QORA_BENCH_PP; default 128)",
    )
    g.addoption(
        "--tg",
        default=os.environ.get("QORA_BENCH_TG", "64"),
        help="decode lengths, comma separated (QORA_BENCH_TG; default 64)",
    )
    g.addoption(
        "--reps",
        type=int,
        default=int(os.environ.get("QORA_BENCH_REPS", "3")),
        help="timed repetitions after one warm-up (QORA_BENCH_REPS; default 3)",
    )
    g.addoption(
        "--peer",
        default=os.environ.get("QORA_BENCH_PEER", "auto"),
        choices=["auto", "llama-bench", "llama-cpp-python", "none"],
        help="how to run llama.cpp (auto: llama-bench if found, else the llama-cpp-python binding)",
    )
    g.addoption("--llama-bench", default=None, help="llama-bench executable or build folder (QORA_LLAMA_BENCH)")
    g.addoption(
        "--bench-layers", type=int, default=None, help="random model with fewer layers (full width), for quick runs"
    )
    g.addoption("--no-demo", action="store_true", help="skip the SmolLM2-135M demo model benchmarks")
    g.addoption(
        "--kernel-tokens",
        default=os.environ.get("QORA_BENCH_KERNEL_TOKENS", "1,16,64"),
        help="tokens per kernel call, comma separated (QORA_BENCH_KERNEL_TOKENS; default 1,16,64)",
    )


def _ints(text):
    return [int(x) for x in str(text).split(",") if x.strip() and int(x) > 0]


def pytest_generate_tests(metafunc):
    if "pp_test" in metafunc.fixturenames:
        metafunc.parametrize("pp_test", [f"pp{n}" for n in _ints(metafunc.config.getoption("pp"))])
    if "tg_test" in metafunc.fixturenames:
        metafunc.parametrize("tg_test", [f"tg{n}" for n in _ints(metafunc.config.getoption("tg"))])
    if "kernel_tokens" in metafunc.fixturenames:
        metafunc.parametrize("kernel_tokens", _ints(metafunc.config.getoption("kernel_tokens")))


@pytest.fixture(scope="session")
def settings(pytestconfig):
    o = pytestconfig.getoption
    tests = [f"pp{n}" for n in _ints(o("pp"))] + [f"tg{n}" for n in _ints(o("tg"))]
    return {
        "threads": o("threads") or harness.default_threads(),
        "reps": max(1, o("reps")),
        "tests": tests,
        "max_tokens": max((int(t[2:]) for t in tests), default=1),
        "peer": o("peer"),
        "llama_bench": o("llama_bench"),
        "layers": o("bench_layers"),
        "no_demo": o("no_demo"),
    }


def _log(msg):
    print(f"\n[bench] {msg}", file=sys.stderr, flush=True)


@pytest.fixture(scope="session")
def models(settings):
    """Model name -> ModelPair, built lazily on first use."""
    cache = {}

    def get(kind):
        if kind == "demo" and settings["no_demo"]:
            pytest.skip("demo model benchmarks disabled (--no-demo)")
        if kind not in cache:
            from qora.errors import QoraError

            try:
                if kind == "random":
                    cache[kind] = harness.ensure_random_pair(n_layers=settings["layers"], log=_log)
                else:
                    cache[kind] = harness.ensure_demo_pair(log=_log)
            except QoraError as e:  # e.g. no network for the demo download
                cache[kind] = e
        if isinstance(cache[kind], Exception):
            pytest.skip(f"{kind} model unavailable: {cache[kind]}")
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def peer(settings):
    """The llama.cpp runner, or the reason there is none."""
    try:
        return harness.make_peer(settings["peer"], settings["llama_bench"])
    except harness.PeerUnavailable as e:
        return e


@pytest.fixture(scope="session")
def peer_results(settings, peer):
    """kind -> {test: Result} or an exception; each model's peer runs once (all its tests at once)."""
    cache = {}

    def get(kind, model):
        if kind not in cache:
            if isinstance(peer, Exception):
                cache[kind] = peer
            else:
                _log(
                    f"llama.cpp ({peer.version}) on {model.gguf.name}: {', '.join(settings['tests'])}, "
                    f"{settings['threads']} threads, {settings['reps']} reps ..."
                )
                try:
                    cache[kind] = peer.run_many(model.gguf, settings["tests"], settings["threads"], settings["reps"])
                except Exception as e:  # a crash of the peer must not hide qora's numbers
                    cache[kind] = e
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def qora_runners(settings):
    runners = {}

    def get(kind, model):
        if kind not in runners:
            runners[kind] = harness.QoraRunner(model.qora, settings["threads"], settings["max_tokens"])
        return runners[kind]

    yield get
    for r in runners.values():
        r.close()


def pytest_terminal_summary(terminalreporter):
    rows = [(m, q, p) for m, q, p in harness.RESULTS.values() if q is not None]
    rows.sort(key=lambda r: (r[0].name, r[1].test[:2], r[1].n_tokens))
    if rows:
        terminalreporter.write_line("")
        terminalreporter.write_line(harness.table(rows, "qora vs llama.cpp (same weights, same threads)"))
    if harness.KERNELS:
        terminalreporter.write_line("")
        terminalreporter.write_line(harness.kernel_table(harness.KERNELS))
