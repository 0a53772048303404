#!/usr/bin/env bash
# Decode mat-vecs on their own (bench/matvec_bench.c): the two decode walks of repacked Q4 (QORA_KERNEL=seq /
# seg4) and the OpenMP wait settings (libgomp's default spin, qora's GOMP_SPINCOUNT=1000, passive), interleaved,
# at 1 thread and at the given thread counts, each run against the read bandwidth at the same thread count.
#   bench/matvec_bench.sh [threads, comma separated (default: 1 and the physical cores)] [rounds (default 3)] [layers (default 8)]
# Needs gcc with OpenMP; builds into ${TMPDIR:-/tmp}. The isa is the best this CPU runs (QORA_BENCH_ISA=1 for
# the AVX2 path, 3 for AVX-512).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${TMPDIR:-/tmp}/qora_matvec_bench"
gcc -O3 -fopenmp -ffp-contract=off -I include bench/matvec_bench.c -o "$BIN" -lm
cores=$(python3 -c "import qora.system as s; print(s.usable_cores())" 2>/dev/null || nproc)
THREADS="${1:-1,$cores}"
ROUNDS="${2:-3}"
LAYERS="${3:-8}"
ISA="${QORA_BENCH_ISA:-}"
echo "# $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-) ; $(nproc) logical CPUs; load: $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq "$ROUNDS"); do
  for t in ${THREADS//,/ }; do
    for walk in seq seg4; do
      for omp in default GOMP_SPINCOUNT=1000 OMP_WAIT_POLICY=passive; do
        [ "$t" = 1 ] && [ "$omp" != default ] && continue  # one thread never waits on a team
        envs=(QORA_KERNEL=$walk)
        [ "$omp" != default ] && envs+=("$omp")
        echo "round $r omp $omp: $(env "${envs[@]}" "$BIN" "$t" "$LAYERS" 5 $ISA)"
      done
    done
  done
done
