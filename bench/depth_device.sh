#!/usr/bin/env bash
# Long-context CPU speed, qora vs llama.cpp on the same weights (issue 13): decode (tg32) at depth
# 0 / 512 / 4096 / 8192 and prefill of a 4096-token prompt (pp4096), same threads, peer in the same run.
# Run from the repository root, one step per call (each fits a 10-minute slot on a 16-core machine):
#
#   bench/depth_device.sh build LLAMA_CPP_SRC   # llama-bench (native: AVX-512 / AMX where present) and qora
#   bench/depth_device.sh tg  [THREADS]         # tg32 at depth 0,512,4096,8192 (compare.py, 2 rounds)
#   bench/depth_device.sh pp  [THREADS]         # pp4096 at depth 0 (compare.py)
#   bench/depth_device.sh all LLAMA_CPP_SRC [THREADS]
#
# Everything it writes (llama.cpp build, the random SmolLM3-3B-shaped Q4 model and its GGUF Q4_0 twin,
# JSON results) goes under build/depth (git-ignored, so it stays between calls); results are also
# copied to $OUT when that is set. THREADS defaults to the physical cores.
set -euo pipefail

ROOT=$(pwd)
WORK=$ROOT/build/depth
LCB=$WORK/llama.cpp-build
export QORA_BENCH_DIR=$WORK/models
mkdir -p "$WORK" "$QORA_BENCH_DIR"
step=${1:-}

threads() {
    if [ -n "${1:-}" ]; then echo "$1"; else python3 -c "import qora; print(qora.cpu_info()['physical_cores'])"; fi
}

build() {
    local src=${1:?llama.cpp source folder}
    cmake -S "$src" -B "$LCB" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
        -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >/dev/null
    cmake --build "$LCB" --target llama-bench -j "$(nproc)" >/dev/null
    "$LCB/bin/llama-bench" --version 2>&1 | head -2
    python3 setup.py build_ext --inplace -j "$(nproc)" >/dev/null
    python3 -c "import qora; print('qora', qora.cpu_info())"
}

save() {
    if [ -n "${OUT:-}" ]; then cp "$1" "$OUT/"; fi
}

tg() {
    local t
    t=$(threads "${1:-}")
    python3 bench/compare.py --llama-bench "$LCB/bin/llama-bench" --threads "$t" --pp 0 --tg 32 \
        --depth 0,512,4096,8192 --reps 3 --rounds 2 --no-stream --json "$WORK/depth_tg.json"
    save "$WORK/depth_tg.json"
}

pp() {
    local t
    t=$(threads "${1:-}")
    python3 bench/compare.py --llama-bench "$LCB/bin/llama-bench" --threads "$t" --pp 4096 --tg 0 \
        --reps 2 --no-stream --json "$WORK/pp4096.json"
    save "$WORK/pp4096.json"
}

case "$step" in
build) build "${2:-}" ;;
tg) tg "${2:-}" ;;
pp) pp "${2:-}" ;;
all) build "${2:-}" && tg "${3:-}" && pp "${3:-}" ;;
*)
    sed -n '2,13p' "$0"
    exit 2
    ;;
esac
