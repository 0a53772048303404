#!/usr/bin/env bash
# The test suite against a C core built with AddressSanitizer + UndefinedBehaviorSanitizer.
#
#   .ci/sanitize.sh [pytest args]        (default: the whole suite, tests/)
#
# The sanitized build goes into a scratch copy of the tree, so the normal in-place build (and
# anyone using it) is left alone. Python itself is not instrumented, so the ASan runtime must be
# the first library loaded (LD_PRELOAD); leak detection is off because the interpreter keeps
# memory alive at exit by design. Any ASan or UBSan report aborts the run (non-zero exit).
set -euo pipefail
cd "$(dirname "$0")/.."
CC=${CC:-gcc}
work=${QORA_SANITIZE_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/qora-asan.XXXXXX")}
mkdir -p "$work"
if git rev-parse --git-dir >/dev/null 2>&1; then
    git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$work"
else
    tar --exclude=./build --exclude='*.so' -cf - . | tar -xf - -C "$work"
fi
rm -f "$work"/qora/_core/*.so
echo "sanitized build in $work"
(cd "$work" && CC="$CC" QORA_SANITIZE=address,undefined python setup.py build_ext --inplace >build.log 2>&1) ||
    { tail -30 "$work/build.log"; exit 1; }

libasan=$("$CC" -print-file-name=libasan.so)
[ -f "$libasan" ] || { echo "no libasan for $CC (install gcc's libasan, e.g. apt-get install libasan8)"; exit 1; }
export LD_PRELOAD="$libasan${LD_PRELOAD:+ $LD_PRELOAD}"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1:print_summary=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export PYTHONPATH="$work${PYTHONPATH:+:$PYTHONPATH}"
cd "$work"
# The import must resolve to the sanitized copy, not the editable install.
python -c "import qora._core._cpu as c, sys; p = c.__file__; print('core:', p); sys.exit(not p.startswith('$work'))"
ldd qora/_core/_cpu*.so | grep -E 'asan|ubsan'
python -m pytest -q -p no:cacheprovider "${@:-tests}" 2>&1 | tee "$work/pytest.log"
status=${PIPESTATUS[0]}
if grep -qE 'runtime error:|ERROR: AddressSanitizer' "$work/pytest.log"; then
    echo "sanitizer reports found (see $work/pytest.log)"
    exit 1
fi
exit "$status"
