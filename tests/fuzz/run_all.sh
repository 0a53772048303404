#!/usr/bin/env bash
# Run every fuzzer for a bounded time on a fresh copy of the committed corpus.
#   tests/fuzz/run_all.sh [SECONDS_PER_FUZZER]      (default 60; CI uses 20)
# Prints each fuzzer's execution count; exits non-zero on the first finding (the crashing input is
# kept under the work folder it prints, to be added to the corpus with make_corpus.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-60}
work=$(mktemp -d "${TMPDIR:-/tmp}/qora-fuzz.XXXXXX")
echo "fuzzing ${secs}s per target in $work"
status=0
for target in qora gguf hf template; do
    cp -r "tests/fuzz/corpus/$target" "$work/$target"
    mkdir -p "$work/$target-findings"
    log="$work/$target.log"
    if python "tests/fuzz/fuzz_$target.py" "$work/$target" -max_total_time="$secs" -timeout=30 \
        -rss_limit_mb=4096 -artifact_prefix="$work/$target-findings/" -print_final_stats=1 >"$log" 2>&1; then
        runs=$(grep -Eo 'Done [0-9]+ runs in [0-9]+ second' "$log" | tail -1 || true)
        echo "fuzz_$target: ${runs:-finished} ($(find "$work/$target" -type f | wc -l) corpus files)"
    else
        status=1
        echo "fuzz_$target: FINDING (log: $log, inputs: $work/$target-findings/)"
        tail -40 "$log"
    fi
done
exit $status
