#!/usr/bin/env bash
# Why the tensor-core prefill (matmul_coop.comp) runs far below the tensor cores' rate (issue 14): the
# driver's pipeline statistics (registers, local memory) and the cooperative-matrix shapes it lists, then
# pp512 with the GPU time of each prefill kernel for each variant of the Q4 kernel and each pipeline
# setting, and each real variant's logits against the CPU's float arithmetic on the tiny fixture model.
#
#     python3 tools/gen_shaders.py --probes    # here, where glslangValidator + spirv-opt are (the variants)
#     python3 setup.py build_ext --inplace     # on the GPU machine (the header travels with the tree)
#     bash bench/coopmat_probe.sh              # output under $OUT (default /tmp/coopmat_probe)
#     git checkout qora/_core/shaders_spv.h    # the variants are never committed
#
# Variants (tools/gen_shaders.py COOP_PROBES): v2 / v1 shared memory as f16vec2 / f16, a16 f16
# accumulators, noopt without spirv-opt, n8 16 x 8 accumulators; pm* the products alone on operands
# loaded once (timing only: their results are wrong). QORA_VK_COOP_SUBGROUPS=1|2: the pipelines require
# full subgroups (of 32 lanes). QORA_VK_COOP_MIN_TILES: which products take the tensor cores.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/coopmat_probe}
mkdir -p "$OUT"
M=${MODEL:-$($PY -c "import sys; sys.path.insert(0, 'bench'); import harness; print(harness.ensure_random_pair().qora)")}
VB="$PY bench/vulkan_bench.py --nvidia-icd --model $M --pp 512 --tg 0 --reps 2 --profile"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader 2>/dev/null || true
run() {
    echo "== $*"
    env QORA_VK_PIPELINE_STATS=1 "$@" timeout 60 $VB > "$OUT/run.txt" 2>&1
    grep -a "pipeline matmul_coop" "$OUT/run.txt" | cut -c1-300 | sort -u
    grep -a "pp512\|gate_up\|qkv\|rror" "$OUT/run.txt"
}
run X=1
grep -a "coopmat [0-9]" "$OUT/run.txt" | sort -u
run QORA_VK_COOPMAT=0
run QORA_VK_COOP_MIN_TILES=1 # every product on the tensor cores (the default threshold was set when they were slow)
run QORA_VK_COOP_MIN_TILES=48
run QORA_VK_COOP_SUBGROUPS=1
run QORA_VK_COOP_SUBGROUPS=2
for v in noopt v2 a16 n8 n8noopt pm pmnoopt pm16 pm168 pm168h; do
    run QORA_VK_COOP_SHADER=matmul_coop_q4_$v
done
run QORA_VK_COOP_SHADER=matmul_coop_q4_pm QORA_VK_COOP_SUBGROUPS=2
run QORA_VK_COOP_SHADER=matmul_coop_q4_n8 QORA_VK_COOP_SUBGROUPS=2
# the real variants' logits: prefill on tensor cores vs the CPU engine's float arithmetic (tiny model)
$PY - matmul_coop_q4_noopt matmul_coop_q4_v2 matmul_coop_q4_a16 matmul_coop_q4_n8 matmul_coop_q4_n8noopt <<'PYEOF'
import os, sys, tempfile
from pathlib import Path
import numpy as np
import qora
from qora.convert import convert
os.environ.update(QORA_KV="f32", QORA_VK_COOPMAT="2")
m = convert(Path("tests/fixtures/tiny-smollm3"), Path(tempfile.mkdtemp()) / "t.qora", quant="q4", progress=False)
toks = np.random.default_rng(11).integers(0, 400, 250).tolist()
os.environ["QORA_PRECISION"] = "f32"
with qora.load(m, device="cpu", max_seq_len=512) as cpu:
    ref = cpu.forward(toks)
del os.environ["QORA_PRECISION"]
for v in ["", *sys.argv[1:]]:
    os.environ["QORA_VK_COOP_SHADER"] = v
    with qora.load(m, device="gpu", max_seq_len=512) as gpu:
        err = float(np.abs(gpu.forward(toks) - ref).max() / np.abs(ref).max())
        path = gpu.engine.matmul
    print(f"{v or 'matmul_coop_q4'} ({path} path): max|gpu - cpu f32| / max|cpu| = {err:.2e}")
PYEOF
