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
    int neon, dotprod, i8mm; /* aarch64: AdvSIMD, SDOT/UDOT (FEAT_DotProd), SMMLA (FEAT_I8MM); 0 elsewhere */
    int vendor;    /* QORA_VENDOR_*: the per-CPU kernel choice reads it (engine/cpu.py) */
    int family, model; /* x86 CPUID leaf 1, extended family and model folded in; 0 elsewhere */
} qora_cpu_features;

enum { QORA_VENDOR_OTHER = 0, QORA_VENDOR_INTEL = 1, QORA_VENDOR_AMD = 2 };

#if defined(__aarch64__) || defined(_M_ARM64)
#define QORA_ARM64 1
#else
#define QORA_ARM64 0
#endif

#if QORA_ARM64
/* ---- aarch64: what the OS reports (HWCAPs on Linux / Android, sysctl on macOS); ARM has no user-mode
   CPUID, and the kernel only announces what it saves and restores. */
#if defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMD
#define HWCAP_ASIMD (1UL << 1)
#endif
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1UL << 20)
#endif
#ifndef HWCAP2_I8MM
#define HWCAP2_I8MM (1UL << 13)
#endif
#elif defined(__APPLE__)
#include <sys/sysctl.h>
static int qora_sysctl_flag(const char* name) {
    int v = 0;
    size_t len = sizeof v;
    return sysctlbyname(name, &v, &len, NULL, 0) == 0 && v != 0;
}
#endif

static void qora_detect_arm(qora_cpu_features* f) {
    f->neon = 1; /* AdvSIMD is part of every aarch64 CPU the OSes run on */
#if defined(__linux__)
    const unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
    f->neon = (hw & HWCAP_ASIMD) != 0;
    f->dotprod = f->neon && (hw & HWCAP_ASIMDDP) != 0;
    f->i8mm = f->dotprod && (hw2 & HWCAP2_I8MM) != 0;
#elif defined(__APPLE__)
    f->dotprod = qora_sysctl_flag("hw.optional.arm.FEAT_DotProd");
    f->i8mm = f->dotprod && qora_sysctl_flag("hw.optional.arm.FEAT_I8MM");
#endif /* elsewhere (Windows on ARM, the BSDs): NEON only, until a test for them is written */
}

/* ISA paths on aarch64, best last: NEON (every aarch64 CPU), dotprod (sdot: Cortex-A76 / Neoverse N1,
   Apple M1 and later), i8mm (smmla prefill tiles: Neoverse V1 / N2, Graviton 3, Apple M2 and later). */
enum qora_isa { QORA_ISA_SCALAR = 0, QORA_ISA_NEON = 1, QORA_ISA_DOTPROD = 2, QORA_ISA_I8MM = 3, QORA_ISA_COUNT = 4 };

static inline int qora_cpu_supports(const qora_cpu_features* f, int isa) {
    switch (isa) {
    case QORA_ISA_SCALAR: return 1;
    case QORA_ISA_NEON: return f->neon;
    case QORA_ISA_DOTPROD: return f->neon && f->dotprod;
    case QORA_ISA_I8MM: return f->neon && f->dotprod && f->i8mm;
    default: return 0;
    }
}
#endif /* QORA_ARM64 */

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
    char vendor[13];
    memcpy(vendor, &r[1], 4);
    memcpy(vendor + 4, &r[3], 4);
    memcpy(vendor + 8, &r[2], 4);
    vendor[12] = 0;
    f.vendor = strcmp(vendor, "GenuineIntel") == 0   ? QORA_VENDOR_INTEL
               : strcmp(vendor, "AuthenticAMD") == 0 ? QORA_VENDOR_AMD
                                                     : QORA_VENDOR_OTHER;
    if (max_leaf < 1) return f;
    qora_cpuid(1, 0, r);
    {
        const unsigned fam = (r[0] >> 8) & 0xf, mod = (r[0] >> 4) & 0xf;
        f.family = (int)(fam == 0xf ? fam + ((r[0] >> 20) & 0xff) : fam);
        f.model = (int)(fam == 0x6 || fam == 0xf ? mod + (((r[0] >> 16) & 0xf) << 4) : mod);
    }
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
#if QORA_ARM64
    qora_detect_arm(&f);
#endif
    return f;
}

#if !QORA_ARM64
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
#endif /* !QORA_ARM64 */

#endif /* QORA_CPU_FEATURES_H */
