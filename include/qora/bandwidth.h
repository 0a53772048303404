/* qora — the machine's memory read bandwidth, measured the way decode reads weights: every thread of an
   OpenMP team streams its contiguous share of a buffer far larger than the last-level cache with wide
   loads (a STREAM-like read, nothing written). Decode reads every weight once per token, so this is its
   ceiling at that thread count (`qora bench --bandwidth`). */
#ifndef QORA_BANDWIDTH_H
#define QORA_BANDWIDTH_H

#include <stdlib.h>
#include <time.h>
#include "common.h"
#include "cpu_features.h"
#include "repack.h" /* qora_alloc_weights: the buffer is allocated as the repacked weights are */

#ifdef _OPENMP
#include <omp.h>
#endif

#if QORA_X86
QORA_TARGET_AVX2 static uint64_t qora_read_avx2(const char* p, size_t n) {
    /* four independent loads per step: the loop is bound by the loads, not by the xor chain */
    __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
    size_t i = 0;
    for (; i + 128 <= n; i += 128) {
        a = _mm256_xor_si256(a, _mm256_load_si256((const __m256i*)(p + i)));
        b = _mm256_xor_si256(b, _mm256_load_si256((const __m256i*)(p + i + 32)));
        c = _mm256_xor_si256(c, _mm256_load_si256((const __m256i*)(p + i + 64)));
        d = _mm256_xor_si256(d, _mm256_load_si256((const __m256i*)(p + i + 96)));
    }
    a = _mm256_xor_si256(_mm256_xor_si256(a, b), _mm256_xor_si256(c, d));
    uint64_t r[4];
    _mm256_storeu_si256((__m256i*)r, a);
    return r[0] ^ r[1] ^ r[2] ^ r[3];
}
#endif

static uint64_t qora_read_plain(const char* p, size_t n) {
    const uint64_t* q = (const uint64_t*)p;
    uint64_t a = 0, b = 0, c = 0, d = 0;
    for (size_t i = 0; i + 4 <= n / 8; i += 4) {
        a ^= q[i];
        b ^= q[i + 1];
        c ^= q[i + 2];
        d ^= q[i + 3];
    }
    return a ^ b ^ c ^ d;
}

static double qora_wtime(void) {
#ifdef _OPENMP
    return omp_get_wtime();
#else
    return (double)clock() / CLOCKS_PER_SEC; /* one thread: its CPU time is its wall time */
#endif
}

/* GB/s (1e9 bytes per second) of `threads` threads reading `bytes` (rounded down to 128 * threads),
   the best of `reps` passes after one untimed pass that writes the pages; -1 when the buffer cannot
   be allocated. */
static double qora_read_bandwidth(int threads, size_t bytes, int reps) {
#ifndef _OPENMP
    threads = 1;
#endif
    if (threads < 1) threads = 1;
    const size_t share = bytes / (size_t)threads / 128 * 128;
    if (share == 0) return -1;
    bytes = share * (size_t)threads;
    char* buf = qora_alloc_weights(bytes);
    if (!buf) return -1;
#if QORA_X86
    qora_cpu_features f = qora_detect_cpu();
    const int wide = qora_cpu_supports(&f, QORA_ISA_AVX2);
#endif
    volatile uint64_t sink = 0;
    double best = 0;
    for (int r = -1; r < reps; r++) {
        double t0 = 0, t1 = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
        {
#ifdef _OPENMP
            const int me = omp_get_thread_num();
#else
            const int me = 0;
#endif
            const char* p = buf + (size_t)me * share;
            if (r < 0) {
                memset((char*)p, me + 1, share); /* each thread's pages touched by that thread (first touch) */
            } else {
#ifdef _OPENMP
#pragma omp barrier
#endif
#ifdef _OPENMP
#pragma omp master
#endif
                t0 = qora_wtime();
#ifdef _OPENMP
#pragma omp barrier
#endif
                uint64_t v;
#if QORA_X86
                v = wide ? qora_read_avx2(p, share) : qora_read_plain(p, share);
#else
                v = qora_read_plain(p, share);
#endif
#ifdef _OPENMP
#pragma omp atomic
#endif
                sink ^= v;
#ifdef _OPENMP
#pragma omp barrier
#pragma omp master
#endif
                t1 = qora_wtime();
            }
        }
        if (r >= 0 && t1 > t0) {
            const double gbs = (double)bytes / (t1 - t0) / 1e9;
            if (gbs > best) best = gbs;
        }
    }
    qora_free_weights(buf);
    (void)sink;
    return best;
}

#endif /* QORA_BANDWIDTH_H */
