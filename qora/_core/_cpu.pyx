# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Design: the C engine in include/qora/ is header-only; this module is the one
translation unit that compiles it. Three layers (as in scikit-learn's _loss):
C nogil primitives -> thin typed-memoryview wrappers that check every size
before handing a pointer to C and release the GIL -> Python classes in
qora/engine/ that validate user input. Kernel wrappers take an explicit ISA so
tests can run each path; CpuModel holds the weights (views into the mmap) and
the preallocated run state, and does one C call per forward."""

from libc.stdint cimport int32_t, uint8_t, uint16_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset

import numpy as np

include "weights.pxi"

cdef extern from "qora/qora.h" nogil:
    ctypedef struct qora_xblock:
        pass

    ctypedef struct qora_cpu_features:
        int sse42, avx, avx2, fma, f16c, osxsave
        int avx512f, avx512bw, avx512vl, avx512vnni, avxvnni
        int os_avx, os_avx512
        int amx_tile, amx_int8, os_amx
        int neon, dotprod, i8mm
        int vendor, family, model

    qora_cpu_features qora_detect_cpu()
    int qora_amx_set_mode(int mode)
    int qora_amx_mode
    int qora_set_decode_walk(int walk)
    int qora_decode_walk
    int QORA_WALK_SEQ, QORA_WALK_SEG4, QORA_WALK_STREAM, QORA_WALK_COUNT
    int QORA_VENDOR_OTHER, QORA_VENDOR_INTEL, QORA_VENDOR_AMD
    double qora_read_bandwidth(int threads, size_t nbytes, int reps)
    int qora_cpu_supports(const qora_cpu_features* f, int isa)
    int QORA_ISA_SCALAR, QORA_ISA_COUNT
    int QORA_OK, QORA_ERR_ARGS, QORA_ERR_TOKEN, QORA_ERR_CONTEXT, QORA_ERR_NOMEM

    ctypedef struct qora_kernels:
        const char* name
        int isa
        void (*quantize_q8)(const float* x, block_q8* y, int n) noexcept nogil
        void (*rmsnorm)(float* out, const float* x, const float* w, int n, float eps) noexcept nogil

    const qora_kernels* qora_kernel_table(int isa)

    void* qora_alloc_weights(size_t nbytes)
    void qora_free_weights(void* p)
    void qora_repack_q4x8(const void* src, size_t row_bytes, int rows, int cols, block_q4x8* dst, int n_threads)
    ctypedef void (*qora_kx8_fn)(int dtype, int n, const void* w, const void* x, const qora_xblock* xe, size_t xs,
                                 int nt, float* out, size_t ldo) noexcept nogil
    qora_kx8_fn qora_kx8_kernel(int isa)
    size_t qora_kx8_bytes(int dtype, int rows, int cols)
    void qora_kx8_repack(int dtype, const void* src, size_t row_bytes, int rows, int cols, void* dst, int n_threads)
    ctypedef struct qora_repack_job:
        int dtype, rows, cols
        size_t row_bytes
        const void* src
        void* dst
    size_t qora_repack_job_bytes(const qora_repack_job* j)
    int qora_repack_all(const qora_repack_job* jobs, int n_jobs, int n_threads)

    void qora_matmul(const qora_kernels* K, const qora_tensor* W, const float* X, size_t ldx, const block_q8* XQ,
                     const qora_xblock* XS, size_t ldxq, int n, float* Y, size_t ldy, int n_threads)
    void qora_swiglu(const qora_kernels* K, const qora_tensor* Wg, const qora_tensor* Wu, const float* X,
                     size_t ldx, const block_q8* XQ, const qora_xblock* XS, size_t ldxq, int n, float* H, size_t ldh,
                     int n_threads)
    void qora_prepare_inputs(const qora_kernels* K, int dtype, const float* X, size_t ldx, block_q8* XQ,
                             qora_xblock* XS, size_t ldxq, int n, int cols, int n_threads)
    size_t qora_xq_stride(int widest)
    int qora_act_needs(int dtype)
    void qora_prepare_acts(const qora_kernels* K, int needs, const float* X, size_t ldx, block_q8* XQ,
                           qora_xblock* XS, size_t ldxq, int n, int cols, int n_threads)
    void qora_quantize_q8k(const float* x, block_q8K* y, int n)
    void qora_quantize_q8k_isa(int isa, const float* x, block_q8K* y, int n)
    void qora_dequant_row(const qora_tensor* W, int r, float* out)
    void qora_rope(float* v, int n_heads, int head_dim, int pos, const float* inv_freq, float scale)
    void qora_attention(const qora_kernels* K, const float* q, const void* kc, const void* vc, int kv_type, int n_pos,
                        int n, int n_heads, int n_kv_heads, int head_dim, size_t kv_stride, float* scores,
                        size_t score_stride, float* out, int n_threads)

    ctypedef struct qora_state:
        float* x

    ctypedef struct qora_model:
        qora_config cfg
        qora_weights w
        qora_state s
        const qora_kernels* K
        int n_threads

    int qora_state_init(qora_state* s, const qora_config* c)
    void qora_state_free(qora_state* s)
    int qora_forward(qora_model* m, const int32_t* tokens, int n, int start_pos, float* logits, int all_logits) nogil

    ctypedef struct qora_batch:
        int rows, n_slots

    int qora_batch_init(qora_batch* b, const qora_config* c, int ctx, int rows, int n_slots)
    void qora_batch_free(qora_batch* b)
    int qora_forward_batch(qora_model* m, qora_batch* b, const int32_t* tokens, const int32_t* slots,
                           const int32_t* pos, int n, float* logits, const int32_t* want, int n_want) nogil
    int qora_batch_copy(qora_batch* b, int src, int dst, int n) nogil

cdef extern from "qora/mapguard.h" nogil:
    int QORA_GUARD_SLOTS
    int qora_guard_install()
    int qora_guard_register(const void* addr, size_t length)
    void qora_guard_unregister(int slot)
    int qora_guard_poisoned(int slot)
    int qora_guard_supported()

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int qora_openmp_enabled(void) { return 1; }
    static int qora_omp_max_threads(void) { return omp_get_max_threads(); }
    #else
    static int qora_openmp_enabled(void) { return 0; }
    static int qora_omp_max_threads(void) { return 1; }
    #endif
    """
    int qora_openmp_enabled()
    int qora_omp_max_threads()

cdef extern from *:
    """
    /* the enum qora_isa of the architecture this core is built for (cpu_features.h), by constant name */
    #if QORA_ARM64
    #define QORA_ISA_CONSTANTS {"QORA_ISA_SCALAR", QORA_ISA_SCALAR}, {"QORA_ISA_NEON", QORA_ISA_NEON}, \
        {"QORA_ISA_DOTPROD", QORA_ISA_DOTPROD}, {"QORA_ISA_I8MM", QORA_ISA_I8MM}
    #else
    #define QORA_ISA_CONSTANTS {"QORA_ISA_SCALAR", QORA_ISA_SCALAR}, {"QORA_ISA_AVX2", QORA_ISA_AVX2}, \
        {"QORA_ISA_AVX2VNNI", QORA_ISA_AVX2VNNI}, {"QORA_ISA_AVX512", QORA_ISA_AVX512}
    #endif
    typedef struct { const char* name; int value; } qora_isa_constant;
    static const qora_isa_constant qora_isa_constants[] = {QORA_ISA_CONSTANTS};
    static const int qora_isa_n_constants = (int)(sizeof qora_isa_constants / sizeof qora_isa_constants[0]);
    """
    ctypedef struct qora_isa_constant:
        const char* name
        int value
    const qora_isa_constant qora_isa_constants[]
    const int qora_isa_n_constants

from qora.engine.cpu import DECODE_WALKS, ISA_NAMES  # the names of the C enums, in their order


def c_isa_table():
    """The C side of the ISA table, as compiled (tests/test_engine_protocol.py compares it with
    ISA_NAMES): the enum qora_isa values, and the name each compiled kernel table gives itself."""
    kernels = {}
    for i in range(QORA_ISA_COUNT):
        if qora_kernel_table(i) != NULL:
            kernels[i] = qora_kernel_table(i).name.decode()
    return {
        "enum": {qora_isa_constants[i].name.decode(): qora_isa_constants[i].value for i in range(qora_isa_n_constants)},
        "count": QORA_ISA_COUNT,
        "kernels": kernels,
        "walks": {"QORA_WALK_SEQ": QORA_WALK_SEQ, "QORA_WALK_SEG4": QORA_WALK_SEG4, "QORA_WALK_STREAM": QORA_WALK_STREAM,
                  "count": QORA_WALK_COUNT},
    }


# ------------------------------------------------------------------ CPU info
def cpu_features():
    """Raw CPUID/XCR0 flags and which ISA paths this CPU and this build can run."""
    cdef qora_cpu_features f = qora_detect_cpu()
    flags = dict(sse42=f.sse42, avx=f.avx, avx2=f.avx2, fma=f.fma, f16c=f.f16c,
                 avx512f=f.avx512f, avx512bw=f.avx512bw, avx512vl=f.avx512vl,
                 avx512vnni=f.avx512vnni, avxvnni=f.avxvnni, os_avx=f.os_avx, os_avx512=f.os_avx512,
                 amx_tile=f.amx_tile, amx_int8=f.amx_int8, os_amx=f.os_amx, neon=f.neon, dotprod=f.dotprod,
                 i8mm=f.i8mm)
    cpu_ok = [ISA_NAMES[i] for i in range(QORA_ISA_COUNT) if qora_cpu_supports(&f, i)]
    built = [ISA_NAMES[i] for i in range(QORA_ISA_COUNT) if qora_kernel_table(i) != NULL]
    vendor = {QORA_VENDOR_INTEL: "intel", QORA_VENDOR_AMD: "amd"}.get(f.vendor, "other")
    return {"flags": {k: bool(v) for k, v in flags.items()}, "cpu_supports": cpu_ok, "compiled": built,
            "openmp": bool(qora_openmp_enabled()), "omp_max_threads": qora_omp_max_threads(),
            "vendor": vendor, "family": f.family, "model": f.model}


def set_decode_walk(str walk):
    """How one-token products walk a Q4 group's blocks (repack.h): 'seq', 'seg4' or 'stream'; the same numbers
    either way. Process-wide; returns the walk now in effect."""
    if walk not in DECODE_WALKS:
        raise ValueError(f"decode walk must be one of {', '.join(DECODE_WALKS)}, got {walk!r}")
    return DECODE_WALKS[qora_set_decode_walk(DECODE_WALKS.index(walk))]


def decode_walk():
    return DECODE_WALKS[qora_decode_walk]


def read_bandwidth(int n_threads, size_t nbytes, int reps=3):
    """GB/s of n_threads threads reading their shares of an nbytes buffer (bandwidth.h), best of reps;
    raises MemoryError when the buffer cannot be allocated."""
    _threads(n_threads)
    if reps < 1:
        raise ValueError(f"reps must be positive, got {reps}")
    if nbytes < 128 * <size_t>n_threads:
        raise ValueError(f"a {nbytes}-byte buffer is too small for {n_threads} threads")
    cdef double gbs
    with nogil:
        gbs = qora_read_bandwidth(n_threads, nbytes, reps)
    if gbs < 0:
        raise MemoryError(f"cannot allocate {nbytes} bytes for the bandwidth probe")
    return gbs


AMX_MODES = ("off", "hw", "emulate")


def set_amx(str mode):
    """AMX tiles for full 16-token prefill tiles on the AVX-512 path: 'hw' (used when the CPU and OS
    allow, else left off), 'emulate' (a software model of the tile instructions, for tests) or 'off'.
    Process-wide; returns the mode now in effect."""
    if mode not in AMX_MODES:
        raise ValueError(f"AMX mode must be one of {', '.join(AMX_MODES)}, got {mode!r}")
    return AMX_MODES[qora_amx_set_mode(AMX_MODES.index(mode))]


def amx_mode():
    return AMX_MODES[qora_amx_mode]


cdef const qora_kernels* _kernels(int isa) except NULL:
    """Kernel table for an ISA that both this CPU and this build support."""
    cdef qora_cpu_features f = qora_detect_cpu()
    if isa < 0 or isa >= QORA_ISA_COUNT:
        raise ValueError(f"unknown ISA index {isa}")
    if not qora_cpu_supports(&f, isa):
        raise RuntimeError(f"this CPU cannot run the {ISA_NAMES[isa]} path")
    cdef const qora_kernels* K = qora_kernel_table(isa)
    if K == NULL:
        raise RuntimeError(f"the {ISA_NAMES[isa]} kernels are not compiled into this build")
    return K


cdef class _Packed:
    """A matrix repacked into 8-row interleaved groups (freed with this object)."""
    cdef void* buf

    def __cinit__(self):
        self.buf = NULL

    def __dealloc__(self):
        qora_free_weights(self.buf)


cdef bint _repackable(const qora_tensor* t, int isa):
    """t gets an interleaved copy: at least one full group of 8 rows, and Q4_0 (repack.h) or a type with an
    x8 kernel on the ISA path `isa` (-1: the scalar one; kquants_repack.h)."""
    if t.rows < 8:
        return False
    return t.dtype == QORA_Q4 or (qora_kx8_kernel(QORA_ISA_SCALAR if isa < 0 else isa) != NULL and
                                  qora_kx8_bytes(t.dtype, t.rows, t.cols) > 0)


cdef _Packed _repack_all(qora_tensor** ts, int n, int n_threads, int isa=-1):
    """Give each tensor of ts[0..n) that _repackable() accepts its interleaved copy (Q4 rows as block_q4x8,
    Q8_0 and the K types in their x8 layout), all in one buffer allocated once and filled by one parallel
    pass over every matrix (qora_repack_all); the others stay in the file's layout."""
    cdef _Packed p = _Packed()
    cdef qora_repack_job* jobs = <qora_repack_job*>calloc(max(n, 1), sizeof(qora_repack_job))
    cdef qora_tensor** owner = <qora_tensor**>calloc(max(n, 1), sizeof(qora_tensor*))
    cdef size_t* offs = <size_t*>calloc(max(n, 1), sizeof(size_t))
    cdef int i, n_jobs = 0, rc
    cdef size_t total = 0, nbytes
    cdef char* base
    try:
        if jobs == NULL or owner == NULL or offs == NULL:
            raise MemoryError("cannot allocate the repack table")
        for i in range(n):
            if not _repackable(ts[i], isa):
                continue
            jobs[n_jobs].dtype, jobs[n_jobs].rows, jobs[n_jobs].cols = ts[i].dtype, ts[i].rows, ts[i].cols
            jobs[n_jobs].row_bytes, jobs[n_jobs].src = ts[i].row_bytes, ts[i].data
            nbytes = qora_repack_job_bytes(&jobs[n_jobs])
            if nbytes == 0:
                continue
            offs[n_jobs] = total
            total += (nbytes + 63) // 64 * 64  # each copy starts on a cache line
            owner[n_jobs] = ts[i]
            n_jobs += 1
        if n_jobs == 0:
            return p
        p.buf = qora_alloc_weights(total)
        if p.buf == NULL:
            raise MemoryError(f"cannot allocate {total} bytes for repacked weights")
        base = <char*>p.buf
        for i in range(n_jobs):
            jobs[i].dst = base + offs[i]
        with nogil:
            rc = qora_repack_all(jobs, n_jobs, n_threads)
        if rc != 0:
            raise MemoryError("cannot allocate the repack table")
        for i in range(n_jobs):
            if owner[i].dtype == QORA_Q4:
                owner[i].packed = <const block_q4x8*>jobs[i].dst
            else:
                owner[i].kpacked = jobs[i].dst
        return p
    finally:
        free(jobs)
        free(owner)
        free(offs)


cdef _Packed _repack(qora_tensor* t, int n_threads, int isa=-1):
    """One tensor's interleaved copy (_repack_all)."""
    return _repack_all(&t, 1, n_threads, isa)


def _bytes(arr):
    """Flat uint8 view of a C-contiguous array (no copy; a copy if arr is not contiguous).
    The caller must hold the result in a variable for as long as C uses its pointer: a
    temporary would be freed as soon as _tensor() returns."""
    arr = np.ascontiguousarray(arr)
    return arr.reshape(-1).view(np.uint8)


MAX_THREADS = 1024


cdef int _threads(int n_threads) except -1:
    """OpenMP's num_threads() must be positive; a huge team would exhaust the process."""
    if n_threads < 1 or n_threads > MAX_THREADS:
        raise ValueError(f"n_threads must be in 1..{MAX_THREADS}, got {n_threads}")
    return n_threads


# ------------------------------------------------------------ kernel wrappers
def quantize_q8k(const float[::1] x, int isa=0):
    """x (n,), n % 256 == 0 -> Q8_K blocks (the K types' activations) as uint8 (n/256*292,), by the
    quantizer of ISA path `isa` (0: the scalar reference)."""
    cdef int n = x.shape[0]
    if n == 0 or n % 256:
        raise ValueError(f"quantize_q8k: length must be a positive multiple of 256, got {n}")
    out = np.empty(n // 256 * 292, dtype=np.uint8)
    cdef uint8_t[::1] o = out
    with nogil:
        qora_quantize_q8k_isa(isa, &x[0], <block_q8K*>&o[0], n)
    return out


def quantize_q8(const float[::1] x, int isa):
    """x (n,), n % 32 == 0 -> Q8 blocks as uint8 (n/32*34,)."""
    cdef const qora_kernels* K = _kernels(isa)
    cdef int n = x.shape[0]
    if n == 0 or n % 32:
        raise ValueError(f"quantize_q8: length must be a positive multiple of 32, got {n}")
    out = np.empty(n // 32 * 34, dtype=np.uint8)
    cdef uint8_t[::1] o = out
    with nogil:
        K.quantize_q8(&x[0], <block_q8*>&o[0], n)
    return out


cdef class Matrix:
    """A weight matrix (rows, cols) stored as dtype, prepared once as the engine does at load
    (repack: Q4 rows interleaved by 8), for any number of products."""
    cdef qora_tensor t
    cdef object data, packed
    cdef readonly int rows, cols

    def __init__(self, w, str dtype, int rows, int cols, bint repack=False, int n_threads=1, str what="matmul"):
        _threads(n_threads)
        self.data = _bytes(w)  # held here: C reads it for the life of this object
        self.t = _tensor(dtype, rows, cols, self.data, what)
        self.packed = _repack(&self.t, n_threads) if repack else None
        self.rows, self.cols = rows, cols

    def matmul(self, const float[:, ::1] x, int isa, int n_threads=1, bint act_f32=False):
        """Y (n, rows) = X (n, cols) W^T: activations quantized (or kept as floats: act_f32), then the tiled
        product."""
        cdef const qora_kernels* K = _kernels(isa)
        _threads(n_threads)
        cdef int n = _check_x(x, self.cols, "matmul")
        y = np.empty((n, self.rows), dtype=np.float32)
        cdef float[:, ::1] yv = y
        inputs = _Inputs(n, self.cols)
        cdef block_q8* xq = NULL if act_f32 else inputs.xq
        with nogil:
            qora_prepare_inputs(K, self.t.dtype, &x[0, 0], self.cols, xq, inputs.xs, inputs.lq, n,
                                self.cols, n_threads)
            qora_matmul(K, &self.t, &x[0, 0], self.cols, xq, inputs.xs, inputs.lq, n, &yv[0, 0], self.rows,
                        n_threads)
        return y


cdef class _Inputs:
    """Scratch for n activation rows quantized to Q8 (blocks and their extras)."""
    cdef object xq_buf, xs_buf
    cdef block_q8* xq
    cdef qora_xblock* xs
    cdef size_t lq

    def __init__(self, int n, int cols):
        self.lq = qora_xq_stride(cols)  # room for the Q8_0 and the Q8_K form of a row
        self.xq_buf = np.zeros(n * self.lq * 34, dtype=np.uint8)
        self.xs_buf = np.zeros(2 * n * self.lq, dtype=np.int32)  # qora_xblock: int32 + float
        cdef uint8_t[::1] xq = self.xq_buf
        cdef int32_t[::1] xs = self.xs_buf
        self.xq = <block_q8*>&xq[0]
        self.xs = <qora_xblock*>&xs[0]


cdef int _check_x(const float[:, ::1] x, int cols, str what) except -1:
    if x.shape[0] == 0 or x.shape[1] != cols:
        raise ValueError(f"{what}: X has shape {tuple(x.shape)[:2]}, W has {cols} columns")
    return x.shape[0]


def matmul(w, str dtype, int rows, int cols, const float[:, ::1] x, int isa, int n_threads=1, bint repack=False,
           bint act_f32=False):
    """Y (n, rows) = X (n, cols) W^T with W (rows, cols) stored as dtype: the tiled product
    (repack: Q4 rows interleaved by 8 first, as the engine does at load; act_f32: float activations)."""
    _kernels(isa)
    return Matrix(w, dtype, rows, cols, repack, n_threads).matmul(x, isa, n_threads, act_f32)


def repacked_layouts(list mats, int n_threads, int isa, bint together=True):
    """The interleaved copies the engine makes at load of matrices (w, dtype, rows, cols), as bytes (None
    for a matrix kept in the file's layout): together, all in one pass (_repack_all, the engine's load);
    else each on its own through the per-matrix loops (qora_repack_q4x8 / qora_kx8_repack), the reference
    the one pass must equal byte for byte."""
    cdef int i, n = len(mats)
    cdef qora_tensor* ts = <qora_tensor*>calloc(max(n, 1), sizeof(qora_tensor))
    cdef qora_tensor** tp = <qora_tensor**>calloc(max(n, 1), sizeof(qora_tensor*))
    cdef size_t nbytes
    cdef const uint8_t[::1] view
    cdef uint8_t[::1] o
    keep, out = [], []
    _threads(n_threads)
    _kernels(isa)
    try:
        if ts == NULL or tp == NULL:
            raise MemoryError()
        for i in range(n):
            w, dtype, rows, cols = mats[i]
            keep.append(_bytes(w))
            ts[i] = _tensor(dtype, rows, cols, keep[i], "repacked_layouts")
            tp[i] = &ts[i]
        if together:
            packed = _repack_all(tp, n, n_threads, isa)
        for i in range(n):
            if not _repackable(&ts[i], isa):
                out.append(None)
                continue
            nbytes = (<size_t>(ts[i].rows // 8) * <size_t>(ts[i].cols // 32) * 144 if ts[i].dtype == QORA_Q4 else
                      qora_kx8_bytes(ts[i].dtype, ts[i].rows, ts[i].cols))
            arr = np.empty(nbytes, dtype=np.uint8)
            o = arr
            if together:
                memcpy(&o[0], ts[i].kpacked if ts[i].dtype != QORA_Q4 else <const void*>ts[i].packed, nbytes)
            elif ts[i].dtype == QORA_Q4:
                qora_repack_q4x8(ts[i].data, ts[i].row_bytes, ts[i].rows, ts[i].cols, <block_q4x8*>&o[0], n_threads)
            else:
                qora_kx8_repack(ts[i].dtype, ts[i].data, ts[i].row_bytes, ts[i].rows, ts[i].cols, &o[0], n_threads)
            out.append(arr)
        return out
    finally:
        free(ts)
        free(tp)


def matvec(w, str dtype, int rows, int cols, const float[::1] x, int isa, int n_threads=1, bint act_f32=False):
    """y = W x with W (rows, cols) stored as dtype (raw bytes / f16 / f32 array)."""
    if x.shape[0] != cols:
        raise ValueError(f"matvec: x has {x.shape[0]} elements, W has {cols} columns")
    return matmul(w, dtype, rows, cols, np.asarray(x).reshape(1, cols), isa, n_threads, False, act_f32)[0]


def swiglu_prepared(Matrix gate, Matrix up, const float[:, ::1] x, int isa, int n_threads=1, bint act_f32=False):
    """H (n, rows) = silu(X Wg^T) * (X Wu^T), one pass over both prepared matrices (of any two types)."""
    cdef const qora_kernels* K = _kernels(isa)
    _threads(n_threads)
    if gate.rows != up.rows or gate.cols != up.cols:
        raise ValueError("swiglu: gate and up must have the same shape")
    cdef int n = _check_x(x, gate.cols, "swiglu")
    h = np.empty((n, gate.rows), dtype=np.float32)
    cdef float[:, ::1] hv = h
    inputs = _Inputs(n, gate.cols)
    cdef block_q8* xq = NULL if act_f32 else inputs.xq
    cdef int needs = qora_act_needs(gate.t.dtype) | qora_act_needs(up.t.dtype)
    with nogil:
        qora_prepare_acts(K, needs, &x[0, 0], gate.cols, xq, inputs.xs, inputs.lq, n, gate.cols, n_threads)
        qora_swiglu(K, &gate.t, &up.t, &x[0, 0], gate.cols, xq, inputs.xs, inputs.lq, n, &hv[0, 0],
                    gate.rows, n_threads)
    return h


def swiglu(wg, wu, str dtype, int rows, int cols, const float[:, ::1] x, int isa, int n_threads=1,
           bint repack=False):
    """H (n, rows) = silu(X Wg^T) * (X Wu^T), one pass over both matrices."""
    _kernels(isa)
    gate = Matrix(wg, dtype, rows, cols, repack, n_threads, "swiglu gate")
    up = Matrix(wu, dtype, rows, cols, repack, n_threads, "swiglu up")
    return swiglu_prepared(gate, up, x, isa, n_threads)


def dequant_row(w, str dtype, int rows, int cols, int r):
    """Row r of W as float32 (the embedding lookup)."""
    wb = _bytes(w)  # kept alive while C reads it
    cdef qora_tensor t = _tensor(dtype, rows, cols, wb, "dequant_row")
    if r < 0 or r >= rows:
        raise IndexError(f"row {r} out of range for {rows} rows")
    out = np.empty(cols, dtype=np.float32)
    cdef float[::1] o = out
    qora_dequant_row(&t, r, &o[0])
    return out


def rmsnorm(const float[::1] x, const float[::1] w, float eps, int isa):
    cdef const qora_kernels* K = _kernels(isa)
    if x.shape[0] != w.shape[0] or x.shape[0] == 0:
        raise ValueError("rmsnorm: x and w must have the same non-zero length")
    out = np.empty(x.shape[0], dtype=np.float32)
    cdef float[::1] o = out
    with nogil:
        K.rmsnorm(&o[0], &x[0], &w[0], <int>x.shape[0], eps)
    return out


def rope(v, int n_heads, int head_dim, int pos, const float[::1] inv_freq, float scale=1.0):
    """RoPE (rotate-half) applied to a copy of v (n_heads*head_dim,)."""
    out = np.array(v, dtype=np.float32, copy=True).reshape(-1)
    cdef float[::1] o = out
    if head_dim <= 0 or head_dim % 2 or n_heads <= 0 or o.shape[0] != <Py_ssize_t>n_heads * head_dim:
        raise ValueError("rope: v must hold n_heads*head_dim values with an even head_dim")
    if inv_freq.shape[0] != head_dim // 2:
        raise ValueError("rope: inv_freq must have head_dim/2 values")
    if pos < 0:
        raise ValueError("rope: negative position")
    qora_rope(&o[0], n_heads, head_dim, pos, &inv_freq[0], scale)
    return out


KV_TYPES = {"f32": QORA_F32, "f16": QORA_F16, "q8": QORA_Q8}


def _kv_type(kv):
    """A KV cache type name of KV_TYPES (True / False: f16 / f32) -> its qora_dtype value."""
    if isinstance(kv, bool):
        return QORA_F16 if kv else QORA_F32
    if kv not in KV_TYPES:
        raise ValueError(f"KV cache type must be one of {', '.join(KV_TYPES)}, got {kv!r}")
    return KV_TYPES[kv]


def attention(const float[::1] q, kc_in, vc_in, int n_heads, int n_kv_heads, int head_dim, int isa,
              int n_threads=1, kv_type="f16", int n_queries=1):
    """Causal softmax(q k^T / sqrt(d)) v for n_queries queries (q: n_queries * n_heads * head_dim,
    token by token) whose own positions are the last n_queries rows of kc/vc (n_pos,
    n_kv_heads*head_dim), held as kv_type: "f16" (True, the engine's default cache), "f32" (False), or
    "q8" (each row n_kv_heads*head_dim/32 Q8_0 blocks of 34 bytes, as uint8): query t sees
    positions 0 .. n_pos - n_queries + t (prefill's flash attention; one query is decode)."""
    cdef const qora_kernels* K = _kernels(isa)
    cdef int kvt = _kv_type(kv_type)
    kv_dtype = {QORA_F16: np.float16, QORA_F32: np.float32, QORA_Q8: np.uint8}[kvt]
    kc_arr = np.ascontiguousarray(kc_in, dtype=kv_dtype)
    vc_arr = np.ascontiguousarray(vc_in, dtype=kv_dtype)
    if kc_arr.ndim != 2 or vc_arr.ndim != 2:
        raise ValueError("attention: kc and vc must be 2-D")
    cdef const uint8_t[:, ::1] kc = kc_arr.view(np.uint8)
    cdef const uint8_t[:, ::1] vc = vc_arr.view(np.uint8)
    cdef int n_pos = kc.shape[0]
    cdef Py_ssize_t kv_width = kc_arr.shape[1]
    if kvt == QORA_Q8:
        if kv_width % sizeof(block_q8) or head_dim % QK:
            raise ValueError("attention: a q8 cache needs rows of whole 34-byte blocks and head_dim % 32 == 0")
        kv_width = kv_width // sizeof(block_q8) * QK
    _threads(n_threads)
    if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads or head_dim <= 0:
        raise ValueError("attention: bad head configuration")
    if n_queries < 1 or n_queries > n_pos:
        raise ValueError("attention: n_queries must be 1 .. n_pos")
    # products in Py_ssize_t: an int product could wrap and let a short buffer through
    if q.shape[0] != <Py_ssize_t>n_queries * n_heads * head_dim or kv_width != <Py_ssize_t>n_kv_heads * head_dim or \
            vc.shape[0] != n_pos or vc.shape[1] != kc.shape[1] or n_pos == 0:
        raise ValueError("attention: shapes disagree")
    scores = np.empty(<Py_ssize_t>n_queries * n_heads * n_pos, dtype=np.float32)
    out = np.empty(<Py_ssize_t>n_queries * n_heads * head_dim, dtype=np.float32)
    cdef float[::1] sc = scores
    cdef float[::1] o = out
    with nogil:
        qora_attention(K, &q[0], &kc[0, 0], &vc[0, 0], kvt, n_pos, n_queries, n_heads, n_kv_heads, head_dim,
                       <size_t>kv_width, &sc[0], <size_t>n_pos, &o[0], n_threads)
    return out


# -------------------------------------------------------------- mapped files
GUARD_SLOTS = QORA_GUARD_SLOTS


cdef class MapGuard:
    """Watches a memory-mapped model file (include/qora/mapguard.h): a read past the end of a file
    truncated under the mapping reads zeros instead of killing the process with SIGBUS, and
    `poisoned` turns true. Holds a buffer export of the mapping, so the mapping cannot be unmapped
    while it is registered (a registered range never belongs to anything else)."""
    cdef const uint8_t[::1] view
    cdef int slot

    def __cinit__(self):
        self.slot = -1

    def __init__(self, buf):
        cdef int rc
        if self.slot >= 0:
            raise RuntimeError("MapGuard is already initialised")
        self.view = buf
        if self.view.shape[0] == 0 or not qora_guard_supported():
            self.view = None
            return
        rc = qora_guard_install()
        if rc:
            raise OSError(rc, "cannot install the SIGBUS handler for the model mapping")
        rc = qora_guard_register(&self.view[0], <size_t>self.view.shape[0])
        if rc == -1:
            self.view = None
            raise MemoryError(f"more than {QORA_GUARD_SLOTS} model files are mapped at once")
        if rc < 0:
            self.view = None
            raise ValueError("MapGuard needs a whole mapping (page-aligned, not empty)")
        self.slot = rc

    @property
    def poisoned(self):
        """A read of the mapping faulted (the file shrank): what was computed from it is garbage."""
        return self.slot >= 0 and qora_guard_poisoned(self.slot) != 0

    def ensure(self):
        """Put the handler back on top of SIGBUS if something (faulthandler) replaced it since."""
        cdef int rc
        if self.slot >= 0:
            rc = qora_guard_install()
            if rc:
                raise OSError(rc, "cannot install the SIGBUS handler for the model mapping")

    def release(self):
        """Stop watching and let go of the mapping."""
        qora_guard_unregister(self.slot)
        self.slot = -1
        self.view = None

    def __dealloc__(self):
        # before the view (the buffer export) is released: the range is unpublished while mapped
        qora_guard_unregister(self.slot)


# ------------------------------------------------------------------- engine
cdef class CpuModel:
    """The C model over weights that stay in the caller's (memory-mapped) arrays."""
    cdef qora_model m
    cdef qora_batch b  # the slots of batched steps (open_batch), none until asked for
    cdef qora_layer* layers
    cdef list _refs
    cdef readonly int vocab_size
    cdef readonly int max_seq_len
    cdef readonly int n_threads
    cdef readonly str isa_name
    cdef readonly bint act_f32

    def __cinit__(self):
        memset(&self.m, 0, sizeof(qora_model))
        memset(&self.b, 0, sizeof(qora_batch))
        self.layers = NULL

    def __init__(self, dict cfg, dict tensors, inv_freq, float rope_scale, int max_seq_len, int n_threads, int isa,
                 bint repack=True, kv_type="f16", bint act_f32=False):
        """cfg: normalized config; tensors: name -> (dtype, shape, array) as stored in the file (the dtype
        names of qora/dtypes.py, the array the type's raw bytes: GGUF blocks as they are). act_f32: float
        activations (the weights dequantized block by block, nothing rounded to 8 bits) instead of each
        type's Q8_0 / Q8_K partner."""
        cdef int i, n_layers = cfg["n_layers"]
        cdef qora_config* c = &self.m.cfg
        cdef qora_layer* L
        _threads(n_threads)
        if self.layers != NULL:  # a second __init__ would leak (and swap weights under the state)
            raise RuntimeError("CpuModel is already initialised")
        self._refs = []
        self.m.K = _kernels(isa)
        self.isa_name = ISA_NAMES[self.m.K.isa]
        _fill_config(c, cfg, max_seq_len, rope_scale)
        c.kv_type = _kv_type(kv_type)
        c.act_f32 = act_f32
        self.act_f32 = act_f32
        self.layers = <qora_layer*>calloc(n_layers, sizeof(qora_layer))
        if self.layers == NULL:
            raise MemoryError()
        _fill_weights(&self.m.w, self.layers, c, cfg, tensors, inv_freq, self._refs)
        if repack and not act_f32:  # integer decode and prefill read Q4 matrices through the interleaved copy
            self._keep(self._repack_matrices(n_layers, n_threads, isa))
        if qora_state_init(&self.m.s, c) != QORA_OK:
            raise MemoryError(f"cannot allocate the run state for a {max_seq_len}-token context")
        self.vocab_size = c.vocab_size
        self.max_seq_len = max_seq_len
        self.n_threads = n_threads
        self.m.n_threads = n_threads

    cdef _Packed _repack_matrices(self, int n_layers, int n_threads, int isa):
        """Every matrix's interleaved copy in one buffer, in one pass (file order: output, then layer by layer)."""
        cdef qora_tensor** ts = <qora_tensor**>calloc(1 + 7 * <size_t>n_layers, sizeof(qora_tensor*))
        cdef qora_layer* L
        cdef int i, n = 0
        if ts == NULL:
            raise MemoryError()
        try:
            ts[n] = &self.m.w.output
            n += 1
            for i in range(n_layers):
                L = &self.layers[i]
                ts[n], ts[n + 1], ts[n + 2], ts[n + 3] = &L.wq, &L.wk, &L.wv, &L.wo
                ts[n + 4], ts[n + 5], ts[n + 6] = &L.w_gate, &L.w_up, &L.w_down
                n += 7
            return _repack_all(ts, n, n_threads, isa)
        finally:
            free(ts)

    cdef object _keep(self, arr):
        self._refs.append(arr)
        return arr

    def forward(self, const int32_t[::1] tokens, int start_pos, bint all_logits=False):
        """Logits (n, vocab) or (1, vocab) for the last token; fills the KV cache."""
        cdef int n = tokens.shape[0]
        cdef int rc
        self._check_open()
        if n < 1:
            raise ValueError("forward needs at least one token")
        out = np.empty((n if all_logits else 1, self.vocab_size), dtype=np.float32)
        cdef float[:, ::1] o = out
        with nogil:
            rc = qora_forward(&self.m, &tokens[0], n, start_pos, &o[0, 0], all_logits)
        self._check_rc(rc, "forward",
                       f"positions {start_pos}..{start_pos + n - 1} exceed the {self.max_seq_len}-token cache")
        return out

    cdef int _check_open(self) except -1:
        if self.m.s.x == NULL:
            raise RuntimeError("model is closed")
        return 0

    cdef int _check_rc(self, int rc, str entry, str overflow) except -1:
        """A forward entry's return code as the exception both entries raise (overflow: the message when
        a position is past the cache)."""
        if rc == QORA_ERR_CONTEXT:
            raise OverflowError(overflow)
        if rc == QORA_ERR_TOKEN:
            raise ValueError(f"token id out of range [0, {self.vocab_size})")
        if rc != QORA_OK:
            raise ValueError(f"bad {entry} arguments")
        return 0

    def open_batch(self, int ctx, int rows, int n_slots):
        """(Re)allocate the state of batched steps: n_slots KV caches of ctx positions, passes of `rows` rows."""
        self._check_open()
        qora_batch_free(&self.b)
        if ctx < 1 or rows < 1 or n_slots < 1:
            raise ValueError("open_batch needs ctx, rows and n_slots >= 1")
        if qora_batch_init(&self.b, &self.m.cfg, ctx, rows, n_slots) != QORA_OK:
            raise MemoryError(f"cannot allocate {n_slots} KV caches of {ctx} tokens")

    @property
    def batch_slots(self):
        return self.b.n_slots

    def forward_batch(self, const int32_t[::1] tokens, const int32_t[::1] slots, const int32_t[::1] pos,
                      const int32_t[::1] want):
        """Logits (len(want), vocab) of rows `want` of one batched step (row i: tokens[i] of slot slots[i]
        at position pos[i])."""
        cdef int n = tokens.shape[0], n_want = want.shape[0]
        cdef int rc
        self._check_open()
        if self.b.n_slots < 1:
            raise RuntimeError("open_batch first")
        if n < 1 or slots.shape[0] != n or pos.shape[0] != n:
            raise ValueError("forward_batch needs as many slots and positions as tokens (at least one)")
        out = np.empty((n_want, self.vocab_size), dtype=np.float32)
        cdef float[:, ::1] o = out
        cdef float* op = &o[0, 0] if n_want else NULL
        cdef const int32_t* wp = &want[0] if n_want else NULL
        with nogil:
            rc = qora_forward_batch(&self.m, &self.b, &tokens[0], &slots[0], &pos[0], n, op, wp, n_want)
        self._check_rc(rc, "forward_batch", "a position exceeds the slots' context")
        return out

    def copy_slot(self, int src, int dst, int n):
        """Positions 0..n-1 of slot src's KV cache copied to slot dst."""
        cdef int rc
        with nogil:
            rc = qora_batch_copy(&self.b, src, dst, n)
        if rc != QORA_OK:
            raise ValueError("bad copy_slot arguments")

    def close(self):
        qora_batch_free(&self.b)
        qora_state_free(&self.m.s)
        free(self.layers)
        self.layers = NULL
        self.m.w.layers = NULL
        self._refs = []

    def __dealloc__(self):
        qora_batch_free(&self.b)
        qora_state_free(&self.m.s)
        free(self.layers)


include "sample.pxi"
