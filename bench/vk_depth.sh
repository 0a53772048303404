#!/usr/bin/env bash
# Vulkan attention at depth (issue 13), on the random SmolLM3-3B-shaped Q4 model (bench/random_model.py,
# made on first use): decode tg128 and prefill pp512 with 0 / 512 / 4096 / 8192 tokens already in the
# KV cache, a 4096-token prompt from an empty cache, the GPU time of each decode kernel at each depth
# (timestamps), and decode at depth with the other decode attention kernel and other chunk settings.
# llama.cpp's CUDA llama-bench runs beside it on the same weights (bench/random_gguf.py) when
# LLAMA_BENCH names it.
#
#     bash bench/vk_depth.sh [all|depth|attn|prompt|peer]   # results and JSON under $OUT (default /tmp/vk_depth)
#     LLAMA_BENCH=/path/llama-bench bash bench/vk_depth.sh peer
#     QUICK=1 bash bench/vk_depth.sh              # 1 repetition, no settings sweep
# The parts (depth: tg/pp at depth + profile + sweep; attn: decode only, each decode attention setting's
# tok/s and attention GPU time at each depth; prompt: pp4096 / pp8192; peer: llama-bench) can run as
# separate commands where one command's time is limited.
#
# Needs the built extension (python3 setup.py build_ext --inplace) and a Vulkan loader + driver
# (--nvidia-icd writes the NVIDIA loader manifest when a container lacks it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/vk_depth}
REPS=${REPS:-3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true

STEP=${1:-all}
model=(--quant q4)
if [ -n "${MODEL:-}" ]; then model=(--model "$MODEL"); fi  # another .qora (smoke tests)
# decode attention: kernel 1 (attn_decode.comp) as it is and with its best chunk setting so far, kernel 2
# (attn_decode2.comp) with its defaults (128-thread workgroups, 512 of them on a long context, chunks
# of 32 positions at least), fewer / more chunks, smaller / larger workgroups, shorter / longer
# shortest chunks
K2=QORA_VK_ATT_KERNEL=2
tries=(--try QORA_VK_ATT_KERNEL=1 --try QORA_VK_ATT_KERNEL=1,QORA_VK_ATT_SHORT=128
    --try $K2 --try $K2,QORA_VK_ATT_SPLITS=32 --try $K2,QORA_VK_ATT_SPLITS=64 --try $K2,QORA_VK_ATT_SPLITS=256
    --try $K2,QORA_VK_ATT_THREADS=64 --try $K2,QORA_VK_ATT_THREADS=256,QORA_VK_ATT_SPLITS=64
    --try $K2,QORA_VK_ATT_SHORT=16 --try $K2,QORA_VK_ATT_SHORT=64)
if [ -n "${QUICK:-}" ]; then
    REPS=1
    tries=()
fi

if [ "$STEP" = all ] || [ "$STEP" = depth ]; then
    echo "== qora Vulkan: tg128 / pp512 at depth 0,512,4096,8192; decode kernel profile at each depth"
    $PY bench/vulkan_bench.py --nvidia-icd "${model[@]}" --tg 128 --pp 512 --depth 0,512,4096,8192 --reps "$REPS" \
        --profile ${tries[@]+"${tries[@]}"} --json "$OUT/depth.json"
fi

if [ "$STEP" = attn ]; then
    echo "== qora Vulkan decode attention settings: tg64 at depth 0,512,4096,8192, attention GPU time each"
    $PY bench/vulkan_bench.py --nvidia-icd "${model[@]}" --tg 64 --pp 0 --depth 0,512,4096,8192 --reps "$REPS" \
        ${tries[@]+"${tries[@]}"} --try-profile attention --json "$OUT/attn.json"
fi

if [ "$STEP" = all ] || [ "$STEP" = prompt ]; then
    echo "== qora Vulkan: a 4096-token prompt (and 8192) from an empty cache"
    $PY bench/vulkan_bench.py --nvidia-icd "${model[@]}" --tg 0 --pp 4096 --reps "$REPS" --json "$OUT/pp4096.json"
    $PY bench/vulkan_bench.py --nvidia-icd "${model[@]}" --tg 0 --pp 8192 --reps 1 --json "$OUT/pp8192.json"
fi

if { [ "$STEP" = all ] || [ "$STEP" = peer ]; } && [ -n "${LLAMA_BENCH:-}" ]; then
    GGUF=${GGUF:-$OUT/smollm3-3b-random-q4_0.gguf}
    [ -f "$GGUF" ] || $PY bench/random_gguf.py -o "$GGUF" --quant q4
    echo "== llama.cpp (same weights): tg128 / pp512 at depth, pp4096"
    "$LLAMA_BENCH" -m "$GGUF" -ngl 99 -fa 1 -p 512 -n 128 -d 0,512,4096,8192 -r "$REPS" -o md
    "$LLAMA_BENCH" -m "$GGUF" -ngl 99 -fa 1 -p 4096 -n 0 -r "$REPS" -o md
fi
echo "== JSON under $OUT"
