"""Shared driver of the fuzz harnesses (fuzz_qora.py, fuzz_gguf.py, fuzz_hf.py, fuzz_template.py).

    python tests/fuzz/fuzz_gguf.py CORPUS_DIR [libFuzzer flags, e.g. -max_total_time=60]

The property under test: for any input bytes, qora's entry point for that format either succeeds or
raises QoraError (one clean line). Any other exception, a crash in C, a hang (-timeout) or a memory
blow-up (-rss_limit_mb) is a finding. atheris (libFuzzer, coverage-guided over qora, gguf and
jinja2) is used where it installs; otherwise hypothesis mutates the corpus files for the same time
budget. CORPUS_DIR is read (and, with atheris, grown): run_all.sh hands each fuzzer a fresh copy.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Interesting integers for the hypothesis mutator: the values that break size arithmetic.
_INTERESTING = [
    b"\xff" * 8,
    b"\x00" * 8,
    (1 << 31).to_bytes(8, "little"),
    (1 << 32).to_bytes(8, "little"),
    (1 << 63).to_bytes(8, "little"),
    b"\x7f\xff\xff\xff",
    b"\x01\x00\x00\x00",
]


def _one_input(target: str):
    import corpus_tools as ct

    from qora.errors import QoraError

    def test_one_input(data: bytes) -> None:
        try:
            ct.run_target(target, data)
        except QoraError:
            pass  # the clean refusal every bad input must get

    return test_one_input


def _flag(argv, name, default):
    for a in argv:
        if a.startswith(f"-{name}="):
            return a.split("=", 1)[1]
    return default


def _run_atheris(target: str, argv: list[str]) -> None:
    import atheris

    with atheris.instrument_imports(include=["qora", "gguf", "jinja2"]):
        import qora.convert  # noqa: F401
        import qora.format  # noqa: F401
        import qora.generate  # noqa: F401
        import qora.model  # noqa: F401
        import qora.tokenizer  # noqa: F401
    atheris.Setup([sys.argv[0], *argv], _one_input(target))
    atheris.Fuzz()


def _run_hypothesis(target: str, argv: list[str]) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    dirs = [Path(a) for a in argv if not a.startswith("-")]
    seeds = [p.read_bytes() for d in dirs for p in sorted(d.iterdir()) if p.is_file()] or [b""]
    budget = float(_flag(argv, "max_total_time", "60"))
    check = _one_input(target)

    @st.composite
    def mutated(draw):
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(0, 6))):
            kind = draw(st.integers(0, 3))
            pos = draw(st.integers(0, max(len(data) - 1, 0)))
            if kind == 0:
                data[pos : pos + 1] = bytes([draw(st.integers(0, 255))])
            elif kind == 1:
                blob = draw(st.sampled_from(_INTERESTING))
                data[pos : pos + len(blob)] = blob
            elif kind == 2:
                del data[pos:]
            else:
                data[pos:pos] = draw(st.binary(max_size=16))
        return bytes(data)

    runs = 0

    @settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(mutated())
    def fuzz(data):
        nonlocal runs
        runs += 1
        check(data)

    t0 = time.monotonic()
    while time.monotonic() - t0 < budget:
        fuzz()
    print(f"Done {runs} runs in {int(time.monotonic() - t0)} second(s) (hypothesis)", flush=True)


def main(target: str) -> None:
    argv = sys.argv[1:]
    if os.environ.get("QORA_FUZZ_ENGINE") != "hypothesis":
        try:
            import atheris  # noqa: F401
        except ImportError:
            print("atheris is not installed: fuzzing with hypothesis instead", file=sys.stderr)
        else:
            _run_atheris(target, argv)
            return
    _run_hypothesis(target, argv)
