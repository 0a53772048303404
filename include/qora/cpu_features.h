/* qora — run-time CPU feature detection (CPUID + XCR0). Never executes an
   instruction the CPU or the OS has not announced. */
#ifndef QORA_CPU_FEATURES_H
#define QORA_CPU_FEATURES_H

#include "common.h"

#if QORA_X86 && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#elif QORA_X86 && defined(_MSC_VER)
#include <intrin.h>
#endif

typedef struct {
    int sse42, avx, avx2, fma, f16c, osxsave;
    int avx512f, avx512bw, avx512vl, avx512vnni, avxvnni;
    int os_avx;    /* XCR0 has XMM+YMM state */
    int os_avx512; /* XCR0 has opmask+ZMM state */
    int amx_tile, amx_int8;
    int os_amx;    /* XCR0 has XTILECFG+XTILEDATA state (Linux also wants a permission request, see amx.h) */
} qora_cpu_features;

#if QORA_X86
static void qora_cpuid(unsigned leaf, unsigned sub, unsigned r[4]) {
#if defined(_MSC_VER)
    int out[4];
    __cpuidex(out, (int)leaf, (int)sub);
    for (int i = 0; i < 4; i++) r[i] = (unsigned)out[i];
#else
    if (!__get_cpuid_count(leaf, sub, &r[0], &r[1], &r[2], &r[3])) r[0] = r[1] = r[2] = r[3] = 0;
#endif
}

static uint64_t qora_xgetbv0(void) {
#if defined(_MSC_VER)
    return _xgetbv(0);
#else
    uint32_t eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return ((uint64_t)edx << 32) | eax;
#endif
}
#endif

static qora_cpu_features qora_detect_cpu(void) {
    qora_cpu_features f;
    memset(&f, 0, sizeof f);
#if QORA_X86
    unsigned r[4];
    qora_cpuid(0, 0, r);
    unsigned max_leaf = r[0];
    if (max_leaf < 1) return f;
    qora_cpuid(1, 0, r);
    f.sse42 = (r[2] >> 20) & 1;
    f.fma = (r[2] >> 12) & 1;
    f.osxsave = (r[2] >> 27) & 1;
    f.avx = (r[2] >> 28) & 1;
    f.f16c = (r[2] >> 29) & 1;
    if (f.osxsave) { /* xgetbv is only legal when OSXSAVE is set */
        uint64_t xcr0 = qora_xgetbv0();
        f.os_avx = (xcr0 & 0x6) == 0x6;
        f.os_avx512 = f.os_avx && (xcr0 & 0xe0) == 0xe0;
        f.os_amx = (xcr0 & 0x60000) == 0x60000;
    }
    if (max_leaf >= 7) {
        qora_cpuid(7, 0, r);
        f.avx2 = (r[1] >> 5) & 1;
        f.avx512f = (r[1] >> 16) & 1;
        f.avx512bw = (r[1] >> 30) & 1;
        f.avx512vl = (r[1] >> 31) & 1;
        f.avx512vnni = (r[2] >> 11) & 1;
        f.amx_tile = (r[3] >> 24) & 1;
        f.amx_int8 = (r[3] >> 25) & 1;
        qora_cpuid(7, 1, r);
        f.avxvnni = (r[0] >> 4) & 1;
    }
#endif
    return f;
}

/* ISA paths, best last. A path whose kernels are not compiled in maps to the best one below it.
   AVX2VNNI: the AVX2 kernels with vpdpbusd (AVX-VNNI) in the repacked Q4 products. */
enum qora_isa { QORA_ISA_SCALAR = 0, QORA_ISA_AVX2 = 1, QORA_ISA_AVX2VNNI = 2, QORA_ISA_AVX512 = 3, QORA_ISA_COUNT = 4 };

static inline int qora_cpu_supports(const qora_cpu_features* f, int isa) {
    switch (isa) {
    case QORA_ISA_SCALAR: return 1;
    case QORA_ISA_AVX2: return f->os_avx && f->avx && f->avx2 && f->fma && f->f16c;
    case QORA_ISA_AVX2VNNI: return qora_cpu_supports(f, QORA_ISA_AVX2) && f->avxvnni;
    case QORA_ISA_AVX512:
        return qora_cpu_supports(f, QORA_ISA_AVX2) && f->os_avx512 && f->avx512f && f->avx512bw &&
               f->avx512vl && f->avx512vnni;
    default: return 0;
    }
}

#endif /* QORA_CPU_FEATURES_H */
