# The C sampler (include/qora/sample.h), the same choice as qora/sampling.py's Sampler; included by
# _cpu.pyx. The Python Sampler decides which settings come here (qora.sampling.Sampler._fast).

from libc.stdint cimport uint32_t


cdef extern from "qora/sample.h" nogil:
    int QORA_SAMPLE_MAX_K
    int QORA_SAMPLE_NAN, QORA_SAMPLE_RANGE, QORA_SAMPLE_EMPTY, QORA_SAMPLE_ARGS

    ctypedef struct qora_sample_params:
        int greedy
        float temperature
        int top_k
        double top_p, min_p
        float log_min_p
        float repeat_penalty, presence_penalty, frequency_penalty

    ctypedef struct qora_sampler:
        int vocab

    ctypedef struct qora_sample_inputs:
        const int32_t* recent
        int n_recent
        const uint8_t* exempt
        const int32_t* bias_id
        const float* bias
        int n_bias
        const int32_t* banned
        int n_banned
        const uint32_t* mask
        int mask_bits

    qora_sampler* qora_sampler_new(int vocab)
    void qora_sampler_free(qora_sampler* S)
    int qora_sample(qora_sampler* S, const qora_sample_params* P, const float* x, const qora_sample_inputs* inp,
                    double u)
    double qora_pairwise_sum(const double* a, long n)
    int qora_sample_sparse(qora_sampler* S, const qora_sample_params* P, const uint32_t* pairs, int n, float thr,
                           int all, const qora_sample_inputs* inp, double u)
    float qora_key_float(uint32_t key)


SAMPLE_MAX_K = QORA_SAMPLE_MAX_K
SAMPLE_ERRORS = {QORA_SAMPLE_NAN: "nan", QORA_SAMPLE_RANGE: "range", QORA_SAMPLE_EMPTY: "empty",
                 QORA_SAMPLE_ARGS: "args"}
SAMPLE_ERRORS_BY_KIND = {v: k for k, v in SAMPLE_ERRORS.items()}


def pairwise_sum(const double[::1] a):
    """NumPy's float64 summation order, as the C sampler computes it (tests compare it with np.sum)."""
    return qora_pairwise_sum(&a[0] if a.shape[0] else NULL, a.shape[0])


cdef class CSampler:
    """One answer's C sampler: the settings and the fixed inputs (exempt, bias, banned) given once,
    scratch for one vocabulary size made on first use. sample(logits, recent, u, mask) -> id, or a
    negative code of SAMPLE_ERRORS."""
    cdef qora_sampler* S
    cdef qora_sample_params P
    cdef object exempt_ids, bias_id, bias, banned
    cdef object exempt_map  # uint8 per id of the vocabulary in use
    cdef int32_t[::1] recent_buf

    def __cinit__(self):
        self.S = NULL

    def __init__(self, bint greedy, float temperature, int top_k, double top_p, double min_p, float log_min_p,
                 float repeat_penalty, float presence_penalty, float frequency_penalty, exempt, bias_id, bias,
                 banned):
        self.P.greedy = greedy
        self.P.temperature = temperature
        self.P.top_k = top_k
        self.P.top_p = top_p
        self.P.min_p = min_p
        self.P.log_min_p = log_min_p
        self.P.repeat_penalty = repeat_penalty
        self.P.presence_penalty = presence_penalty
        self.P.frequency_penalty = frequency_penalty
        self.exempt_ids = np.ascontiguousarray(exempt, dtype=np.int64)
        self.bias_id = np.ascontiguousarray(bias_id, dtype=np.int32)
        self.bias = np.ascontiguousarray(bias, dtype=np.float32)
        self.banned = np.ascontiguousarray(np.clip(banned, -1, 2**31 - 1), dtype=np.int32)
        self.recent_buf = np.zeros(64, dtype=np.int32)
        self.exempt_map = None

    cdef int _ready(self, int vocab) except -1:
        if self.S != NULL and self.S.vocab == vocab:
            return 0
        qora_sampler_free(self.S)
        self.S = qora_sampler_new(vocab)
        if self.S == NULL:
            raise MemoryError(f"cannot allocate the sampler's scratch for a vocabulary of {vocab}")
        ex = np.zeros(vocab, dtype=np.uint8)
        ids = self.exempt_ids
        ex[ids[(ids >= 0) & (ids < vocab)]] = 1
        self.exempt_map = ex
        return 0

    cdef int _inputs(self, qora_sample_inputs* inp, int V, recent) except -1:
        cdef int n = len(recent), i
        cdef long long t
        self._ready(V)
        if n > self.recent_buf.shape[0]:
            self.recent_buf = np.zeros(max(n, 2 * self.recent_buf.shape[0]), dtype=np.int32)
        for i in range(n):
            try:
                t = recent[i]
            except OverflowError:
                t = -1
            if t < 0 or t >= V:
                t = -1  # out of range: C reports it when a penalty reads the window
            self.recent_buf[i] = <int32_t>t
        cdef const uint8_t[::1] ex = self.exempt_map
        cdef const int32_t[::1] bid = self.bias_id
        cdef const float[::1] bv = self.bias
        cdef const int32_t[::1] ban = self.banned
        inp.recent = &self.recent_buf[0]
        inp.n_recent = n
        inp.exempt = &ex[0]  # the arrays live on self: the pointers stay valid after return
        inp.n_bias = bid.shape[0]
        inp.bias_id = &bid[0] if inp.n_bias else NULL
        inp.bias = &bv[0] if inp.n_bias else NULL
        inp.n_banned = ban.shape[0]
        inp.banned = &ban[0] if inp.n_banned else NULL
        inp.mask = NULL
        inp.mask_bits = 0
        return 0

    def sample(self, const float[::1] logits, recent, double u, const uint32_t[::1] mask=None, int mask_bits=0):
        """recent: the window of recent token ids (a list); their range is checked here (RANGE)."""
        cdef int V = logits.shape[0], rc
        cdef qora_sample_inputs inp
        self._inputs(&inp, V, recent)
        if mask is not None:
            if mask.shape[0] * 32 < mask_bits:
                raise ValueError("the mask holds fewer bits than mask_bits")
            inp.mask = &mask[0]
            inp.mask_bits = mask_bits
        with nogil:
            rc = qora_sample(self.S, &self.P, &logits[0], &inp, u)
        return rc

    def __dealloc__(self):
        qora_sampler_free(self.S)

    def sample_sparse(self, const uint32_t[::1] out, int vocab, recent, double u):
        """The choice from a GPU step's candidates (qvk_model_forward_topk's `out`), or SAMPLE_ARGS when
        they cannot decide it (the caller then reads the whole row and calls sample)."""
        cdef qora_sample_inputs inp
        cdef int rc, n
        if out.shape[0] < 4 or out[1] != 0:  # too many ties at the threshold, or a NaN
            return QORA_SAMPLE_ARGS
        n = out[0]
        if out.shape[0] < 4 + 2 * n:
            raise ValueError("the candidates buffer is shorter than its count")
        self._inputs(&inp, vocab, recent)
        with nogil:
            rc = qora_sample_sparse(self.S, &self.P, &out[4], n, qora_key_float(out[2]), out[3] == <uint32_t>vocab,
                                    &inp, u)
        return rc
