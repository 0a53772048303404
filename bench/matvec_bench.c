/* The decode mat-vecs of SmolLM3-3B-shaped layers on their own, against the machine's read bandwidth.

   Build and run (bench/matvec_bench.sh does both):
       gcc -O3 -fopenmp -ffp-contract=off -I include bench/matvec_bench.c -o /tmp/matvec_bench -lm
       /tmp/matvec_bench [threads] [layers] [tokens] [isa]

   Per "token": for each layer, the products of one decode step in the engine's order (q, k, v from one
   quantized input, o, gate+up fused, down), through the same drivers the engine runs (qora_matmul,
   qora_swiglu over repacked Q4). The layers together are far larger than the last-level cache, so every
   weight comes from memory, as in a real decode step. Reported: weight GB/s of the products, the read
   bandwidth of qora_read_bandwidth at the same thread count, and their ratio; medians of interleaved
   repetitions (one product pass, then one 256 MB bandwidth pass, `tokens` times). Random weights with
   valid f16 scales; attention and norms are left out (the products are more than 95% of decode's bytes).
   QORA_KERNEL=seq|seg4 picks the decode walk (repack.h); MVB_HOT=1 first times the kernel on a matrix
   that stays in L2 (its compute-bound speed, per CPU second); isa: the qora_isa enum value. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include "qora/qora.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double cpu_now(void) { /* this process's CPU time: the hot test's speed on a shared machine */
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t rng_state = 88172645463325252ull;
static uint64_t rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static qora_tensor make_q4(int rows, int cols, int threads) {
    qora_tensor t;
    memset(&t, 0, sizeof t);
    t.dtype = QORA_Q4;
    t.rows = rows;
    t.cols = cols;
    t.row_bytes = qora_row_bytes(QORA_Q4, cols);
    block_q4* raw = malloc((size_t)rows * t.row_bytes);
    const size_t nblk = (size_t)rows * (cols / QK);
    for (size_t i = 0; i < nblk; i++) {
        raw[i].d = qora_fp32_to_fp16(0.001f + (float)(rnd() % 1000) * 1e-5f);
        for (int j = 0; j < QK / 2; j++) raw[i].qs[j] = (uint8_t)rnd();
    }
    t.data = raw;
    block_q4x8* p = qora_alloc_weights((size_t)(rows / 8) * (cols / QK) * sizeof(block_q4x8));
    qora_repack_q4x8(raw, t.row_bytes, rows, cols, p, threads);
    t.packed = p;
    return t;
}

typedef struct {
    qora_tensor q, k, v, o, gate, up, down;
} layer;

static int cmp_d(const void* a, const void* b) {
    const double x = *(const double*)a, y = *(const double*)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char** argv) {
    const int threads = argc > 1 ? atoi(argv[1]) : 1;
    const int n_layers = argc > 2 ? atoi(argv[2]) : 8;
    const int tokens = argc > 3 ? atoi(argv[3]) : 8;
    qora_cpu_features f = qora_detect_cpu();
    int isa = QORA_ISA_COUNT - 1;
    while (isa > 0 && !(qora_cpu_supports(&f, isa) && qora_kernel_table(isa))) isa--;
    if (argc > 4) isa = atoi(argv[4]);
    if (isa < 0 || isa >= QORA_ISA_COUNT || !qora_cpu_supports(&f, isa) || !qora_kernel_table(isa)) {
        fprintf(stderr, "isa %d: not runnable here\n", isa);
        return 1;
    }
    const qora_kernels* K = qora_kernel_table(isa);
    const char* walk = getenv("QORA_KERNEL"); /* the decode walk: seq or seg4 (repack.h) */
    if (walk) qora_set_decode_walk(strcmp(walk, "seq") == 0 ? QORA_WALK_SEQ : QORA_WALK_SEG4);
    const int D = 2048, QD = 2048, KV = 512, H = 11008;
    layer* L = calloc(n_layers, sizeof(layer));
    double bytes = 0;
    for (int l = 0; l < n_layers; l++) {
        L[l].q = make_q4(QD, D, threads);
        L[l].k = make_q4(KV, D, threads);
        L[l].v = make_q4(KV, D, threads);
        L[l].o = make_q4(D, QD, threads);
        L[l].gate = make_q4(H, D, threads);
        L[l].up = make_q4(H, D, threads);
        L[l].down = make_q4(D, H, threads);
        const qora_tensor* all[7] = {&L[l].q, &L[l].k, &L[l].v, &L[l].o, &L[l].gate, &L[l].up, &L[l].down};
        for (int i = 0; i < 7; i++) bytes += (double)all[i]->rows * all[i]->row_bytes;
    }
    const size_t lq = qora_xq_stride(H);
    block_q8* xq = calloc(lq, sizeof(block_q8));
    qora_xblock* xs = calloc(lq, sizeof(qora_xblock));
    float *x = malloc(H * 4), *y = malloc(H * 4), *h = malloc(H * 4);
    for (int i = 0; i < H; i++) x[i] = (float)((int)(rnd() % 2001) - 1000) * 1e-3f;
    if (getenv("MVB_HOT")) { /* the kernel alone on a matrix that stays in L2: its compute-bound speed */
        qora_tensor hot = make_q4(256, D, threads);
        const int reps = 2000;
        for (int it = 0; it < 3; it++) {
            const double t0 = cpu_now();
            for (int r = 0; r < reps; r++) {
                qora_prepare_inputs(K, QORA_Q4, x, D, xq, xs, lq, 1, D, threads);
                qora_matmul(K, &hot, x, D, xq, xs, lq, 1, y, 256, threads);
            }
            printf("hot 256x%d: %.2f GB/s per CPU second\n", D, (double)reps * hot.rows * hot.row_bytes / (cpu_now() - t0) / 1e9);
        }
    }
    double* gbs = malloc(sizeof(double) * tokens);
    double* bws = malloc(sizeof(double) * tokens);
    for (int it = -1; it < tokens; it++) {
        const double t0 = now();
        for (int l = 0; l < n_layers; l++) {
            layer* a = &L[l];
            qora_prepare_inputs(K, QORA_Q4, x, D, xq, xs, lq, 1, D, threads);
            qora_matmul(K, &a->q, x, D, xq, xs, lq, 1, y, QD, threads);
            qora_matmul(K, &a->k, x, D, xq, xs, lq, 1, y, KV, threads);
            qora_matmul(K, &a->v, x, D, xq, xs, lq, 1, y, KV, threads);
            qora_prepare_inputs(K, QORA_Q4, x, QD, xq, xs, lq, 1, QD, threads);
            qora_matmul(K, &a->o, x, QD, xq, xs, lq, 1, y, D, threads);
            qora_prepare_inputs(K, QORA_Q4, x, D, xq, xs, lq, 1, D, threads);
            qora_swiglu(K, &a->gate, &a->up, x, D, xq, xs, lq, 1, h, H, threads);
            qora_prepare_inputs(K, QORA_Q4, x, H, xq, xs, lq, 1, H, threads);
            qora_matmul(K, &a->down, x, H, xq, xs, lq, 1, y, D, threads);
        }
        const double dt = now() - t0;
        const double bw = qora_read_bandwidth(threads, (size_t)256 << 20, 1);
        if (it >= 0) {
            gbs[it] = bytes / dt / 1e9;
            bws[it] = bw;
        }
    }
    qsort(gbs, tokens, sizeof(double), cmp_d);
    qsort(bws, tokens, sizeof(double), cmp_d);
    printf("walk %s isa %s threads %d layers %d (%.0f MB): products %.2f GB/s (best %.2f), read bandwidth %.2f GB/s "
           "(best %.2f), ratio %.0f%%\n",
           qora_decode_walk == QORA_WALK_SEQ ? "seq" : "seg4", K->name, threads, n_layers, bytes / 1e6, gbs[tokens / 2], gbs[tokens - 1], bws[tokens / 2], bws[tokens - 1],
           100 * gbs[tokens / 2] / bws[tokens / 2]);
    return 0;
}
