/* qora — AMX int8 tiles for prefill on CPUs that have them (Sapphire Rapids and later).
   One tile product does 16 tokens x 16 rows x 32 of the Q4 x Q8 work that takes 16
   vpdpbusd, so prompt processing goes several times faster per core. Used only for
   full 16-token tiles; decode stays on the AVX-512 kernels (it is bound by memory).
   qora_amx_mode: 0 off, 1 the hardware, 2 a software model of the tile instructions
   (tests: same code path, any machine). */
#ifndef QORA_AMX_H
#define QORA_AMX_H

#include "repack.h"
#include "cpu_features.h"

enum { QORA_AMX_OFF = 0, QORA_AMX_HW = 1, QORA_AMX_EMULATE = 2 };
static int qora_amx_mode = QORA_AMX_OFF;

#if QORA_X86 && (defined(__GNUC__) || defined(__clang__)) && !defined(_WIN32)
#define QORA_HAVE_AMX_MODEL 1
#if defined(__linux__) && (defined(__clang__) || __GNUC__ >= 11)
#define QORA_HAVE_AMX 1
#include <errno.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#define QORA_ALIGNED(n) __attribute__((aligned(n)))

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} qora_tilecfg;
QORA_STATIC_ASSERT(sizeof(qora_tilecfg) == 64, "tile config is 64 bytes");

/* ---- software model of the tile instructions used (per thread, like the real tile state) */
typedef struct {
    qora_tilecfg cfg;
    QORA_ALIGNED(64) uint8_t t[8][16][64];
} qora_tile_model;
static __thread qora_tile_model qora_tm;

static void qtm_cfg(const qora_tilecfg* c) { qora_tm.cfg = *c; memset(qora_tm.t, 0, sizeof qora_tm.t); }
static void qtm_zero(int t) { memset(qora_tm.t[t], 0, sizeof qora_tm.t[t]); }
static void qtm_load(int t, const void* p, size_t stride) {
    for (int r = 0; r < qora_tm.cfg.rows[t]; r++) memcpy(qora_tm.t[t][r], (const char*)p + r * stride, qora_tm.cfg.colsb[t]);
}
static void qtm_store(int t, void* p, size_t stride) {
    for (int r = 0; r < qora_tm.cfg.rows[t]; r++) memcpy((char*)p + r * stride, qora_tm.t[t][r], qora_tm.cfg.colsb[t]);
}
/* C[m][n] += sum over k of A[m][k] * B[k/4][4n + k%4], all signed bytes (tdpbssd) */
static void qtm_dpbssd(int c, int a, int b) {
    const int M = qora_tm.cfg.rows[c], N = qora_tm.cfg.colsb[c] / 4, K4 = qora_tm.cfg.colsb[a] / 4;
    for (int m = 0; m < M; m++)
        for (int nn = 0; nn < N; nn++) {
            int32_t acc;
            memcpy(&acc, &qora_tm.t[c][m][4 * nn], 4);
            for (int k4 = 0; k4 < K4; k4++)
                for (int i = 0; i < 4; i++)
                    acc += (int32_t)(int8_t)qora_tm.t[a][m][4 * k4 + i] * (int32_t)(int8_t)qora_tm.t[b][k4][4 * nn + i];
            memcpy(&qora_tm.t[c][m][4 * nn], &acc, 4);
        }
}

#define QORA_AMX_FN q4x16_amx_model
#define QORA_AMX_TARGET QORA_TARGET_AVX512
#define T_CFG(c) qtm_cfg(c)
#define T_ZERO(t) qtm_zero(t)
#define T_LOAD(t, p, s) qtm_load(t, p, s)
#define T_DP(c, a, b) qtm_dpbssd(c, a, b)
#define T_STORE(t, p, s) qtm_store(t, p, s)
#define T_RELEASE() ((void)0)
#include "amx_q4x16.h"

#if QORA_HAVE_AMX
#include <immintrin.h>
#define QORA_AMX_FN q4x16_amx_hw
#define QORA_AMX_TARGET \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c,amx-tile,amx-int8")))
#define T_CFG(c) _tile_loadconfig(c)
#define T_ZERO(t) _tile_zero(t)
#define T_LOAD(t, p, s) _tile_loadd(t, p, s)
#define T_DP(c, a, b) _tile_dpbssd(c, a, b)
#define T_STORE(t, p, s) _tile_stored(t, p, s)
#define T_RELEASE() _tile_release()
#include "amx_q4x16.h"
#endif
#endif /* x86 GCC/clang */

/* Ask for a mode; returns the one in effect. Hardware needs the CPU bits, the OS
   saving tile state (XCR0) and, on Linux, permission for the large tile state
   (arch_prctl ARCH_REQ_XCOMP_PERM); anything missing leaves AMX off, silently. */
#if QORA_HAVE_AMX
/* Linux refuses the tile state (ENOSPC) while some thread has an alternate signal stack too
   small for the larger signal frame, as Python's faulthandler installs on the main thread
   (pytest enables it). Give this thread a larger one, once, and keep it for the process. */
static int qora_amx_request_perm(void) {
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0) return 1;
    if (errno != ENOSPC) return 0;
    stack_t cur;
    if (sigaltstack(NULL, &cur) != 0 || (cur.ss_flags & SS_DISABLE) || (cur.ss_flags & SS_ONSTACK)) return 0;
    const size_t size = cur.ss_size + ((size_t)256 << 10);
    stack_t big;
    big.ss_sp = malloc(size); /* kept for the life of the process: signals may run on it */
    big.ss_size = size;
    big.ss_flags = 0;
    if (!big.ss_sp || sigaltstack(&big, NULL) != 0) {
        free(big.ss_sp);
        return 0;
    }
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}
#endif

static int qora_amx_set_mode(int mode) {
    qora_amx_mode = QORA_AMX_OFF;
#if QORA_HAVE_AMX_MODEL
    if (mode == QORA_AMX_EMULATE) qora_amx_mode = QORA_AMX_EMULATE;
#endif
#if QORA_HAVE_AMX
    if (mode == QORA_AMX_HW) {
        const qora_cpu_features f = qora_detect_cpu();
        static int granted = -1; /* asked once per process */
        if (granted < 0)
            granted = qora_cpu_supports(&f, QORA_ISA_AVX512) && f.amx_tile && f.amx_int8 && f.os_amx &&
                      qora_amx_request_perm();
        if (granted) qora_amx_mode = QORA_AMX_HW;
    }
#endif
    (void)mode;
    return qora_amx_mode;
}

/* The AMX kernel for this mode, or NULL: 16 rows (two groups) x exactly 16 tokens. */
typedef void (*qora_q4x16_amx_fn)(int n, const block_q4x8* w0, const block_q4x8* w1, const block_q8* x,
                                  const qora_xblock* xsum, size_t xs, float* out, size_t ldo);
static inline qora_q4x16_amx_fn qora_amx_kernel(void) {
#if QORA_HAVE_AMX
    if (qora_amx_mode == QORA_AMX_HW) return q4x16_amx_hw;
#endif
#if QORA_HAVE_AMX_MODEL
    if (qora_amx_mode == QORA_AMX_EMULATE) return q4x16_amx_model;
#endif
    return NULL;
}

#endif /* QORA_AMX_H */
