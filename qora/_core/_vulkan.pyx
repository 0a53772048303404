# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Design: the Vulkan backend is C (qora/_core/qora_vk.c, API in include/qora/vk_backend.h); this
module is its thin Cython layer, the twin of _cpu.pyx: it checks every size before a pointer goes
to C, releases the GIL around GPU work, and turns C error codes into VulkanError(code, message).
It imports on any machine: the Vulkan loader is opened at run time by the C side, so a machine
without one only sees VulkanError(kind="loader") when it asks for a device. Policy (which device,
when to fall back to the CPU) is in qora/engine/vulkan.py."""

from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset

import numpy as np

include "weights.pxi"

cdef extern from "qora/vk_backend.h" nogil:
    int QVK_OK

    ctypedef struct qvk_device_info:
        char name[256]
        int type
        uint32_t vendor_id, device_id, api_version, driver_version
        uint64_t vram_bytes, vram_budget
        uint32_t subgroup_size, max_storage_buffer_range
        uint64_t max_allocation
        uint32_t max_shared_memory
        int int_dot, int_dot_fast, subgroup_shuffle
        int coopmat
        int usable
        char why_not[160]

    ctypedef struct qvk_ctx:
        pass

    ctypedef struct qvk_model:
        pass

    ctypedef struct qvk_hostbuf:
        void* data
        size_t bytes

    ctypedef struct qvk_model_opts:
        int max_seq_len, batch, logit_rows, mv_threads, mv_rows, kv_type, att_splits, att_short, att_kernel, att_threads
        int gu_rows, int_dot
        int f32_act
        int coopmat, coop_min_tiles
        int profile, chunk_rows
        int fail_after

    int QVK_MAX_BINDINGS
    ctypedef struct qvk_profile_entry:
        char name[24]
        double ns
        long calls

    int qvk_list_devices(const char* loader, qvk_device_info* out, int cap, int* n, char* err, size_t errlen)
    int qvk_ctx_create(const char* loader, int device_index, qvk_ctx** out, char* err, size_t errlen)
    void qvk_ctx_destroy(qvk_ctx* c)
    const qvk_device_info* qvk_ctx_info(const qvk_ctx* c)
    void qvk_ctx_set_fail_alloc(qvk_ctx* c, int fail)
    int qvk_run_kernel(qvk_ctx* c, const char* name, const uint32_t* spec, int n_spec, const qvk_hostbuf* bufs,
                       const void* push, size_t push_bytes, uint32_t gx, uint32_t gy, uint32_t gz, char* err,
                       size_t errlen)
    size_t qvk_packed_bytes(int dtype, int rows, int cols)
    int qvk_pack(int dtype, int rows, int cols, const void* src, void* dst)
    int qvk_model_estimate(const qvk_ctx* c, const qora_config* cfg, const qora_weights* w,
                           const qvk_model_opts* o, uint64_t* bytes, char* err, size_t errlen)
    int qvk_model_create(qvk_ctx* c, const qora_config* cfg, const qora_weights* w, const qvk_model_opts* o,
                         qvk_model** out, char* err, size_t errlen)
    int qvk_model_forward(qvk_model* m, const int32_t* tokens, int n, int start_pos, float* logits,
                          int all_logits, char* err, size_t errlen)
    int QVK_SAMPLE_CAP, QVK_SAMPLE_OUT_WORDS
    int qvk_model_forward_topk(qvk_model* m, int32_t token, int start_pos, int need, const int32_t* gather,
                               int n_gather, uint32_t* out, char* err, size_t errlen)
    int qvk_model_read_logits(qvk_model* m, float* logits, char* err, size_t errlen)
    int qvk_model_batch(const qvk_model* m)
    int qvk_model_logit_rows(const qvk_model* m)
    int qvk_model_profile(const qvk_model* m, qvk_profile_entry* out, int cap, double* step_ns, long* steps)
    void qvk_model_prefill_profile(const qvk_model* m, double* ns, long* runs)
    void qvk_model_destroy(qvk_model* m)
    int qvk_model_batch_bytes(const qvk_model* m, int n_slots, int ctx, int ents, uint64_t* bytes, char* err,
                              size_t n)
    int qvk_model_open_batch(qvk_model* m, int n_slots, int ctx, int ents, char* err, size_t n)
    int qvk_model_slots(const qvk_model* m)
    int qvk_model_forward_batch(qvk_model* m, const int32_t* tokens, int n_rows, const int32_t* ents, int n_ent,
                                float* logits, char* err, size_t n)
    int qvk_model_copy_slot(qvk_model* m, int src, int dst, int n_pos, char* err, size_t n)
    void qvk_model_set_slot_decode(qvk_model* m, int rows)

ERROR_KINDS = {-10: "loader", -11: "no_device", -12: "feature", -13: "oom", -14: "device_lost", -15: "vulkan",
               -16: "args", -17: "unsupported"}
DEVICE_TYPES = {0: "other", 1: "integrated", 2: "discrete", 3: "virtual", 4: "cpu"}
cdef enum:
    ERRLEN = 512


class VulkanError(RuntimeError):
    """A failure of the Vulkan backend; `kind` is one of ERROR_KINDS' values."""

    def __init__(self, int code, str message):
        super().__init__(message)
        self.code = code
        self.kind = ERROR_KINDS.get(code, "vulkan")


cdef _raise(int code, const char* err):
    raise VulkanError(code, err.decode("utf-8", "replace") or f"Vulkan error {code}")


cdef bytes _loader_arg(loader):
    return b"" if not loader else str(loader).encode()


def _driver_version(vendor, v):
    if vendor == 0x10DE:  # NVIDIA packs its own 10.8.8.6 scheme
        return f"{(v >> 22) & 0x3FF}.{(v >> 14) & 0xFF}.{(v >> 6) & 0xFF}"
    return f"{(v >> 22) & 0x7F}.{(v >> 12) & 0x3FF}.{v & 0xFFF}"


cdef dict _info(const qvk_device_info* d):
    v = d.api_version
    return {
        "name": (<char*>d.name).decode("utf-8", "replace"),
        "type": DEVICE_TYPES.get(d.type, "other"),
        "vendor_id": d.vendor_id,
        "device_id": d.device_id,
        "api_version": f"{(v >> 22) & 0x7F}.{(v >> 12) & 0x3FF}.{v & 0xFFF}",
        "driver_version": _driver_version(d.vendor_id, d.driver_version),
        "vram_bytes": d.vram_bytes,
        "vram_budget": d.vram_budget,
        "subgroup_size": d.subgroup_size,
        "max_storage_buffer_range": d.max_storage_buffer_range,
        "max_allocation": d.max_allocation,
        "max_shared_memory": d.max_shared_memory,
        "int_dot": bool(d.int_dot),
        "int_dot_fast": bool(d.int_dot_fast),
        "coopmat": bool(d.coopmat),
        "subgroup_shuffle": bool(d.subgroup_shuffle),
        "usable": bool(d.usable),
        "why_not": (<char*>d.why_not).decode("utf-8", "replace"),
    }


def list_devices(loader=None):
    """Every Vulkan physical device, in the driver's order, as dicts (index = position)."""
    cdef qvk_device_info infos[16]
    cdef char err[ERRLEN]
    cdef int n = 0, rc
    cdef bytes lb = _loader_arg(loader)
    cdef const char* lp = lb
    err[0] = 0
    with nogil:
        rc = qvk_list_devices(lp, infos, 16, &n, err, ERRLEN)
    if rc != QVK_OK:
        _raise(rc, err)
    return [dict(_info(&infos[i]), index=i) for i in range(n)]


def packed_bytes(str dtype, int rows, int cols):
    return qvk_packed_bytes(DTYPES[dtype], rows, cols)


def pack(str dtype, int rows, int cols, data):
    """The device layout of a (rows, cols) matrix given in the file's layout (uint8 / f16 / f32 array)."""
    src = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    if src.shape[0] != qora_row_bytes(DTYPES[dtype], cols) * rows:
        raise ValueError(f"pack: {src.shape[0]} bytes do not hold a {dtype} ({rows}, {cols}) matrix")
    out = np.zeros(qvk_packed_bytes(DTYPES[dtype], rows, cols), dtype=np.uint8)
    cdef const uint8_t[::1] s = src
    cdef uint8_t[::1] o = out
    if qvk_pack(DTYPES[dtype], rows, cols, &s[0], &o[0]) != QVK_OK:
        raise ValueError(f"pack: {dtype} cannot hold {cols} columns on the GPU")
    return out


cdef class Context:
    """A Vulkan instance + logical device + pipelines on one physical device."""
    cdef qvk_ctx* c

    def __cinit__(self):
        self.c = NULL

    def __init__(self, loader=None, int index=0):
        cdef char err[ERRLEN]
        cdef bytes lb = _loader_arg(loader)
        cdef const char* lp = lb
        cdef int rc
        err[0] = 0
        with nogil:
            rc = qvk_ctx_create(lp, index, &self.c, err, ERRLEN)
        if rc != QVK_OK:
            _raise(rc, err)

    cdef qvk_ctx* _get(self) except NULL:
        if self.c == NULL:
            raise VulkanError(-16, "the Vulkan context is closed")
        return self.c

    @property
    def info(self):
        return _info(qvk_ctx_info(self._get()))

    def set_fail_alloc(self, bint fail):
        qvk_ctx_set_fail_alloc(self._get(), fail)

    def run_kernel(self, str name, spec, list bufs, bytes push, int gx, int gy=1, int gz=1):
        """Run one shader; bufs[i] (None or a C-contiguous array) is bound at binding i and
        overwritten with what the shader left there."""
        cdef qvk_hostbuf hb[16]
        cdef uint32_t sp[8]
        cdef char err[ERRLEN]
        cdef int i, rc, n_spec = len(spec)
        cdef uint8_t[::1] view
        cdef qvk_ctx* c = self._get()
        cdef bytes nm = name.encode()
        cdef const char* np_ = nm
        cdef const char* pp = push
        cdef size_t pn = len(push)
        if len(bufs) > QVK_MAX_BINDINGS or n_spec > 8:
            raise ValueError(f"at most {QVK_MAX_BINDINGS} buffers and 8 specialization constants")
        for i in range(n_spec):
            sp[i] = spec[i]
        views = []
        for i in range(QVK_MAX_BINDINGS):
            hb[i].data = NULL
            hb[i].bytes = 0
            if i < len(bufs) and bufs[i] is not None:
                a = bufs[i]
                if not a.flags.c_contiguous or not a.flags.writeable:
                    raise ValueError("kernel buffers must be writeable C-contiguous arrays")
                view = a.reshape(-1).view(np.uint8)
                views.append(view)
                hb[i].data = &view[0]
                hb[i].bytes = view.shape[0]
        err[0] = 0
        with nogil:
            rc = qvk_run_kernel(c, np_, sp, n_spec, hb, pp, pn, gx, gy, gz, err, ERRLEN)
        if rc != QVK_OK:
            _raise(rc, err)

    def close(self):
        if self.c != NULL:
            qvk_ctx_destroy(self.c)
            self.c = NULL

    def __dealloc__(self):
        if self.c != NULL:
            qvk_ctx_destroy(self.c)


cdef class _Weights:
    """qora_config + qora_weights over the caller's arrays (the same mapping as _cpu.CpuModel)."""
    cdef qora_config cfg
    cdef qora_weights w
    cdef qora_layer* layers
    cdef list refs

    def __cinit__(self):
        memset(&self.cfg, 0, sizeof(qora_config))
        memset(&self.w, 0, sizeof(qora_weights))
        self.layers = NULL

    def __init__(self, dict cfg, dict tensors, inv_freq, float rope_scale, int max_seq_len):
        if self.layers != NULL:
            raise RuntimeError("weights are already set")
        self.refs = []
        _fill_config(&self.cfg, cfg, max_seq_len, rope_scale)
        self.layers = <qora_layer*>calloc(self.cfg.n_layers, sizeof(qora_layer))
        if self.layers == NULL:
            raise MemoryError()
        _fill_weights(&self.w, self.layers, &self.cfg, cfg, tensors, inv_freq, self.refs)

    def __dealloc__(self):
        free(self.layers)


cdef qvk_model_opts _opts(int max_seq_len, dict opts):
    cdef qvk_model_opts o
    o.max_seq_len = max_seq_len
    o.batch = opts.get("batch", 0)
    o.logit_rows = opts.get("logit_rows", 0)
    o.mv_threads = opts.get("mv_threads", 0)
    o.mv_rows = opts.get("mv_rows", 0)
    o.kv_type = opts.get("kv_type", 1)
    o.att_splits = opts.get("att_splits", 0)
    o.att_short = opts.get("att_short", -1)
    o.att_kernel = opts.get("att_kernel", 0)
    o.att_threads = opts.get("att_threads", 0)
    o.gu_rows = opts.get("gu_rows", 0)
    o.int_dot = opts.get("int_dot", -1)
    o.coopmat = opts.get("coopmat", 1)
    o.coop_min_tiles = opts.get("coop_min_tiles", 0)
    o.profile = opts.get("profile", 0)
    o.chunk_rows = opts.get("chunk_rows", 0)
    o.f32_act = opts.get("f32_act", 0)
    o.fail_after = opts.get("fail_after", -1)
    return o


def estimate(Context ctx, dict cfg, dict tensors, inv_freq, float rope_scale, int max_seq_len, dict opts):
    """Device memory (bytes) the model would take; VulkanError if it cannot run on this device."""
    cdef _Weights w = _Weights(cfg, tensors, inv_freq, rope_scale, max_seq_len)
    cdef qvk_model_opts o = _opts(max_seq_len, opts)
    cdef uint64_t nbytes = 0
    cdef char err[ERRLEN]
    err[0] = 0
    rc = qvk_model_estimate(ctx._get(), &w.cfg, &w.w, &o, &nbytes, err, ERRLEN)
    if rc != QVK_OK:
        _raise(rc, err)
    return nbytes


cdef class Model:
    """The model on the device: weights uploaded once, KV cache and the recorded steps."""
    cdef qvk_model* m
    cdef Context ctx
    cdef readonly int vocab_size
    cdef readonly int max_seq_len
    cdef readonly int batch
    cdef readonly int logit_rows

    def __cinit__(self):
        self.m = NULL

    def __init__(self, Context ctx, dict cfg, dict tensors, inv_freq, float rope_scale, int max_seq_len,
                 dict opts):
        cdef _Weights w = _Weights(cfg, tensors, inv_freq, rope_scale, max_seq_len)
        cdef qvk_model_opts o = _opts(max_seq_len, opts)
        cdef char err[ERRLEN]
        cdef int rc
        cdef qvk_ctx* c = ctx._get()
        err[0] = 0
        with nogil:
            rc = qvk_model_create(c, &w.cfg, &w.w, &o, &self.m, err, ERRLEN)
        if rc != QVK_OK:
            _raise(rc, err)
        self.ctx = ctx
        self.vocab_size = w.cfg.vocab_size
        self.max_seq_len = max_seq_len
        self.batch = qvk_model_batch(self.m)
        self.logit_rows = qvk_model_logit_rows(self.m)

    def forward(self, const int32_t[::1] tokens, int start_pos, bint all_logits=False):
        """Logits (n, vocab) or (1, vocab) for the last token; fills the KV cache."""
        cdef int n = tokens.shape[0], rc
        cdef char err[ERRLEN]
        if self.m == NULL:
            raise VulkanError(-16, "the model is closed")
        if n < 1 or n > self.batch or (all_logits and n > self.logit_rows):
            raise ValueError(f"forward takes 1..{self.logit_rows if all_logits else self.batch} tokens, got {n}")
        out = np.empty((n if all_logits else 1, self.vocab_size), dtype=np.float32)
        cdef float[:, ::1] o = out
        err[0] = 0
        with nogil:
            rc = qvk_model_forward(self.m, &tokens[0], n, start_pos, &o[0, 0], all_logits, err, ERRLEN)
        if rc != QVK_OK:
            _raise(rc, err)
        return out

    def forward_topk(self, int token, int start_pos, int need):
        """One decode step whose logits stay on the device: the sampling candidates (every logit at or
        above a threshold, at least `need` of them; layout in vk_backend.h) as a uint32 array."""
        cdef int rc
        cdef char err[ERRLEN]
        cdef int32_t tok = token
        if self.m == NULL:
            raise VulkanError(-16, "the model is closed")
        out = np.empty(QVK_SAMPLE_OUT_WORDS, dtype=np.uint32)
        cdef uint32_t[::1] o = out
        err[0] = 0
        with nogil:
            rc = qvk_model_forward_topk(self.m, tok, start_pos, need, NULL, 0, &o[0], err, ERRLEN)
        if rc != QVK_OK:
            _raise(rc, err)
        return out

    def read_logits(self):
        """The last step's logits row (1, vocab), copied back from the device."""
        cdef int rc
        cdef char err[ERRLEN]
        if self.m == NULL:
            raise VulkanError(-16, "the model is closed")
        out = np.empty((1, self.vocab_size), dtype=np.float32)
        cdef float[:, ::1] o = out
        err[0] = 0
        with nogil:
            rc = qvk_model_read_logits(self.m, &o[0, 0], err, ERRLEN)
        if rc != QVK_OK:
            _raise(rc, err)
        return out

    def profile(self):
        """Decode GPU time per kernel: ({name: (ms per step, calls per step)}, ms per whole step),
        averaged over the decode steps so far; ({}, 0.0) when the model was made without profile=1."""
        cdef qvk_profile_entry e[64]
        cdef double step_ns = 0
        cdef long steps = 0
        cdef int i, n
        if self.m == NULL:
            raise VulkanError(-16, "the model is closed")
        n = qvk_model_profile(self.m, e, 64, &step_ns, &steps)
        if n <= 0 or steps <= 0:
            return {}, 0.0
        names = [(<char*>e[i].name).decode() for i in range(n)]
        return ({names[i]: (e[i].ns / steps / 1e6, e[i].calls / steps) for i in range(n)
                 if not names[i].startswith("pp:")}, step_ns / steps / 1e6)

    def prefill_profile(self):
        """Prefill GPU time per kernel: ({name: (ms per prefill, dispatches per prefill)}, ms per whole
        prefill), averaged over the profiled prefill submissions so far; ({}, 0.0) when none."""
        cdef qvk_profile_entry e[64]
        cdef double step_ns = 0, pp_ns = 0
        cdef long steps = 0, runs = 0
        cdef int i, n
        if self.m == NULL:
            raise VulkanError(-16, "the model is closed")
        n = qvk_model_profile(self.m, e, 64, &step_ns, &steps)
        qvk_model_prefill_profile(self.m, &pp_ns, &runs)
        if n <= 0 or runs <= 0:
            return {}, 0.0
        names = [(<char*>e[i].name).decode() for i in range(n)]
        return ({names[i][3:]: (e[i].ns / runs / 1e6, e[i].calls / runs) for i in range(n)
                 if names[i].startswith("pp:")}, pp_ns / runs / 1e6)

    cdef qvk_model* _get(self) except NULL:
        if self.m == NULL:
            raise VulkanError(-16, "the model is closed")
        return self.m

    def batch_bytes(self, int n_slots, int ctx, int ents):
        """Device memory n_slots KV caches of ctx positions and passes of ents entries would take."""
        cdef uint64_t nbytes = 0
        cdef char err[ERRLEN]
        err[0] = 0
        rc = qvk_model_batch_bytes(self._get(), n_slots, ctx, ents, &nbytes, err, ERRLEN)
        if rc != QVK_OK:
            _raise(rc, err)
        return nbytes

    def open_batch(self, int n_slots, int ctx, int ents):
        """Allocate the slots' KV caches (replacing any opened before)."""
        cdef char err[ERRLEN]
        cdef int rc
        cdef qvk_model* m = self._get()
        err[0] = 0
        with nogil:
            rc = qvk_model_open_batch(m, n_slots, ctx, ents, err, ERRLEN)
        if rc != QVK_OK:
            _raise(rc, err)

    @property
    def batch_slots(self):
        return qvk_model_slots(self.m) if self.m != NULL else 0

    def forward_batch(self, const int32_t[::1] tokens, const int32_t[:, ::1] ents):
        """One pass over the rows of (slot, start, count) entries: each entry's last-row logits (n_ent, vocab)."""
        cdef int n_rows = tokens.shape[0], n_ent = ents.shape[0], rc
        cdef char err[ERRLEN]
        cdef qvk_model* m = self._get()
        if n_rows < 1 or n_ent < 1 or ents.shape[1] != 3:
            raise ValueError("forward_batch needs token rows and (slot, start, count) entries")
        out = np.empty((n_ent, self.vocab_size), dtype=np.float32)
        cdef float[:, ::1] o = out
        err[0] = 0
        with nogil:
            rc = qvk_model_forward_batch(m, &tokens[0], n_rows, &ents[0, 0], n_ent, &o[0, 0], err, ERRLEN)
        if rc != QVK_OK:
            _raise(rc, err)
        return out

    def set_slot_decode(self, int rows):
        qvk_model_set_slot_decode(self._get(), rows)

    def copy_slot(self, int src, int dst, int n_pos):
        cdef char err[ERRLEN]
        cdef int rc
        cdef qvk_model* m = self._get()
        err[0] = 0
        with nogil:
            rc = qvk_model_copy_slot(m, src, dst, n_pos, err, ERRLEN)
        if rc != QVK_OK:
            _raise(rc, err)

    def close(self):
        if self.m != NULL:
            qvk_model_destroy(self.m)
            self.m = NULL

    def __dealloc__(self):
        if self.m != NULL:
            qvk_model_destroy(self.m)
