/* qora — choosing the next token in C: the choice qora/sampling.py's Sampler makes, for the same
   logits, settings and uniform number, without its full-vocabulary NumPy passes.

   The Python Sampler is the reference; every step here repeats its float operations in its order:
     penalties   over the distinct non-exempt ids of the recent window, in float32: repetition
                 (v > 0 ? v / r : v * r), then presence (v -= p), then frequency (v -= f * count)
     logit_bias  v += b (float32); banned ids and ids the structured-output mask refuses: -inf
     greedy      the first index of the largest value
     temperature v / t (float32 division; t == 1 divides nothing)
     top-k       the k largest, ties at the k-th value to the lower id (a heap over one scan: no sort);
                 then only finite values go on, in id order (as flatnonzero gives them)
     top-p       float64 softmax (exp, NumPy's pairwise sum), ids sorted by probability (ties by id),
                 kept while the probability ranked above is < p
     min-p       kept where v >= max + float32(log(min_p)) (float32 add)
     draw        float64 softmax again, cumulative sum, the first cdf > u * cdf[last]
   NumPy sums a float64 vector pairwise (8 accumulators per block of up to 128, halves above);
   qora_pairwise_sum is that order, so the probabilities are bit for bit NumPy's on this machine.

   No allocation per token: a qora_sampler holds the scratch (made once per vocabulary size). */
#ifndef QORA_SAMPLE_H
#define QORA_SAMPLE_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QORA_SAMPLE_MAX_K 1024 /* the most top-k candidates the C path keeps (more: the Python path) */
#define QORA_SAMPLE_SPARSE_MAX 4096 /* the most candidates a sparse choice takes */

enum {
    QORA_SAMPLE_NAN = -1,   /* a logit is NaN */
    QORA_SAMPLE_RANGE = -2, /* a recent token id is outside the vocabulary */
    QORA_SAMPLE_EMPTY = -3, /* every logit is -inf after the filters */
    QORA_SAMPLE_ARGS = -4,  /* settings the C path does not take (the caller routes those to Python) */
};

typedef struct {
    int greedy;          /* argmax after penalties, bias, bans and mask */
    float temperature;   /* float32 of the setting (> 0 unless greedy) */
    int top_k;           /* 1..QORA_SAMPLE_MAX_K, or 0 (every token) when vocab <= QORA_SAMPLE_MAX_K */
    double top_p;        /* (0, 1]; 1 is off */
    double min_p;        /* [0, 1); 0 is off */
    float log_min_p;     /* float32(log(min_p)) */
    float repeat_penalty, presence_penalty, frequency_penalty; /* 1, 0, 0 are off */
} qora_sample_params;

typedef struct {
    int vocab;
    float* y;          /* (vocab) the logits after penalties, bias, bans and mask */
    int32_t* count;    /* (vocab) occurrences in the window; zero between calls */
    int32_t* distinct; /* (vocab) the distinct ids of the window */
    uint8_t* mark;     /* (vocab) candidates of a sparse choice; zero between calls */
    int32_t* list;     /* (QORA_SAMPLE_SPARSE_MAX) their ids */
    /* candidates: top-k heap, then (id, value) in id order, probabilities, order by probability */
    float hv[QORA_SAMPLE_MAX_K];
    int32_t hi[QORA_SAMPLE_MAX_K];
    double e[QORA_SAMPLE_MAX_K], p[QORA_SAMPLE_MAX_K];
    int32_t ord[QORA_SAMPLE_MAX_K];
} qora_sampler;

/* The inputs of one choice besides the logits. */
typedef struct {
    const int32_t* recent; /* the window of recent tokens (already cut to repeat_window) */
    int n_recent;
    const uint8_t* exempt; /* (vocab) 1: never penalised; NULL: none */
    const int32_t* bias_id;
    const float* bias;
    int n_bias;
    const int32_t* banned;
    int n_banned;
    const uint32_t* mask; /* structured output: bit i of word i/32 set = id i allowed; NULL: no mask */
    int mask_bits;        /* ids >= mask_bits are refused */
} qora_sample_inputs;

static inline void qora_sampler_free(qora_sampler* S) {
    if (!S) return;
    free(S->y);
    free(S->count);
    free(S->distinct);
    free(S->mark);
    free(S->list);
    free(S);
}

static inline qora_sampler* qora_sampler_new(int vocab) {
    if (vocab < 1) return NULL;
    qora_sampler* S = (qora_sampler*)calloc(1, sizeof *S);
    if (!S) return NULL;
    S->vocab = vocab;
    S->y = (float*)malloc((size_t)vocab * sizeof(float));
    S->count = (int32_t*)calloc((size_t)vocab, sizeof(int32_t));
    S->distinct = (int32_t*)malloc((size_t)vocab * sizeof(int32_t));
    S->mark = (uint8_t*)calloc((size_t)vocab, 1);
    S->list = (int32_t*)malloc(QORA_SAMPLE_SPARSE_MAX * sizeof(int32_t));
    if (!S->y || !S->count || !S->distinct || !S->mark || !S->list) {
        qora_sampler_free(S);
        return NULL;
    }
    return S;
}

/* NumPy's float64 add.reduce order (numpy/_core/src/umath/loops_utils.h.src, pairwise_sum). */
static double qora_pairwise_sum(const double* a, long n) {
    if (n < 8) {
        double res = -0.0;
        for (long i = 0; i < n; i++) res += a[i];
        return res;
    }
    if (n <= 128) {
        double r[8], res;
        long i;
        for (int j = 0; j < 8; j++) r[j] = a[j];
        for (i = 8; i < n - (n % 8); i += 8)
            for (int j = 0; j < 8; j++) r[j] += a[i + j];
        res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++) res += a[i];
        return res;
    }
    long n2 = n / 2;
    n2 -= n2 % 8;
    return qora_pairwise_sum(a, n2) + qora_pairwise_sum(a + n2, n - n2);
}

/* heap order: the root is the worst kept candidate (lowest value; among equal values the highest id) */
static inline int qora_heap_worse(float av, int32_t ai, float bv, int32_t bi) {
    return av < bv || (av == bv && ai > bi);
}

static void qora_heap_down(float* hv, int32_t* hi, int n, int i) {
    const float v = hv[i];
    const int32_t id = hi[i];
    for (;;) {
        int c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && qora_heap_worse(hv[c + 1], hi[c + 1], hv[c], hi[c])) c++;
        if (!qora_heap_worse(hv[c], hi[c], v, id)) break;
        hv[i] = hv[c];
        hi[i] = hi[c];
        i = c;
    }
    hv[i] = v;
    hi[i] = id;
}

static void qora_heap_up(float* hv, int32_t* hi, int i) {
    const float v = hv[i];
    const int32_t id = hi[i];
    while (i > 0) {
        const int p = (i - 1) / 2;
        if (!qora_heap_worse(v, id, hv[p], hi[p])) break;
        hv[i] = hv[p];
        hi[i] = hi[p];
        i = p;
    }
    hv[i] = v;
    hi[i] = id;
}

/* Offer (v, id) to a heap of at most k entries holding *n; ids must come in increasing order, so an
   equal value never displaces a kept one. */
static inline void qora_heap_offer(float* hv, int32_t* hi, int* n, int k, float v, int32_t id) {
    if (*n < k) {
        hv[*n] = v;
        hi[*n] = id;
        qora_heap_up(hv, hi, (*n)++);
    } else if (v > hv[0]) {
        hv[0] = v;
        hi[0] = id;
        qora_heap_down(hv, hi, k, 0);
    }
}

#define QORA_SAMPLE_BLOCK 64

/* The top k of x[0..n) (divided by t unless t == 1) into the heap; returns how many it holds. Blocks
   whose values all fall at or below the heap's worst are passed over after one vectorizable test. */
static int qora_topk_scan(const float* x, int n, float t, int k, float* hv, int32_t* hi) {
    int kept = 0;
    const int div = t != 1.0f;
    float z[QORA_SAMPLE_BLOCK];
    for (int b = 0; b < n; b += QORA_SAMPLE_BLOCK) {
        const int m = n - b < QORA_SAMPLE_BLOCK ? n - b : QORA_SAMPLE_BLOCK;
        const float* xb = x + b; /* block pointers: Python's -fwrapv keeps b + j from vectorizing */
        if (div)
            for (int j = 0; j < m; j++) z[j] = xb[j] / t;
        else
            memcpy(z, xb, (size_t)m * sizeof(float));
        if (kept == k) {
            const float thr = hv[0];
            int any = 0;
            for (int j = 0; j < m; j++) any |= z[j] > thr;
            if (!any) continue;
        }
        for (int j = 0; j < m; j++) qora_heap_offer(hv, hi, &kept, k, z[j], b + j);
    }
    return kept;
}

/* The first index of the largest value (NumPy's argmax; no NaN here). */
static int qora_argmax(const float* x, int n) {
    int best = 0;
    float bv = x[0];
    for (int b = 0; b < n; b += QORA_SAMPLE_BLOCK) {
        const int m = n - b < QORA_SAMPLE_BLOCK ? n - b : QORA_SAMPLE_BLOCK;
        const float* xb = x + b;
        int any = 0;
        for (int j = 0; j < m; j++) any |= xb[j] > bv;
        if (!any) continue;
        for (int j = 0; j < m; j++)
            if (xb[j] > bv) {
                bv = xb[j];
                best = b + j;
            }
    }
    return best;
}

static int qora_has_nan(const float* x, int n) {
    int bad = 0;
    for (int i = 0; i < n; i++) bad |= x[i] != x[i];
    return bad;
}

/* The largest finite value of v[0..n) into *m; 0 when none is finite. */
static int qora_finite_max(const float* v, int n, float* m) {
    int any = 0;
    for (int i = 0; i < n; i++)
        if (isfinite(v[i]) && (!any || v[i] > *m)) {
            *m = v[i];
            any = 1;
        }
    return any;
}

/* Python's _softmax over v[0..n) into p (entries at -inf get 0); 0 when none is finite. */
static int qora_softmax64(const float* v, int n, double* e, double* p) {
    float m = 0.0f;
    if (!qora_finite_max(v, n, &m)) return 0;
    for (int i = 0; i < n; i++) e[i] = isfinite(v[i]) ? exp((double)v[i] - (double)m) : 0.0;
    const double s = qora_pairwise_sum(e, n);
    for (int i = 0; i < n; i++) p[i] = e[i] / s;
    return 1;
}

static const double* qora_sort_p; /* qsort's comparator reads the probabilities here (one thread at a time: the GIL) */

static int qora_by_prob(const void* a, const void* b) {
    const int32_t i = *(const int32_t*)a, j = *(const int32_t*)b;
    const double pi = qora_sort_p[i], pj = qora_sort_p[j];
    if (pi != pj) return pi > pj ? -1 : 1;
    return (i > j) - (i < j);
}

static int qora_by_id(const void* a, const void* b) {
    const int32_t i = *(const int32_t*)a, j = *(const int32_t*)b;
    return (i > j) - (i < j);
}

/* Top-p, min-p and the draw over n candidates (ids ascending, values after temperature and top-k,
   all finite): Python's _choose from `sub` on. Returns the chosen id or QORA_SAMPLE_EMPTY. */
static int qora_sample_candidates(qora_sampler* S, const qora_sample_params* P, const int32_t* ids, float* v, int n,
                                  double u) {
    if (n < 1) return QORA_SAMPLE_EMPTY;
    if (P->top_p < 1.0) {
        qora_softmax64(v, n, S->e, S->p);
        int nc = 0;
        for (int i = 0; i < n; i++)
            if (S->p[i] > 0) S->ord[nc++] = i;
        qora_sort_p = S->p;
        qsort(S->ord, (size_t)nc, sizeof(int32_t), qora_by_prob);
        double cs = 0.0;
        for (int r = 0; r < nc; r++) { /* mass_before = cumsum - p: kept while it is < top_p */
            const double pr = S->p[S->ord[r]];
            cs += pr;
            if (!(cs - pr < P->top_p)) S->e[S->ord[r]] = -1.0; /* mark: dropped */
        }
        for (int i = 0; i < n; i++)
            if (!(S->p[i] > 0) || S->e[i] == -1.0) v[i] = -INFINITY;
    }
    if (P->min_p > 0.0) {
        float m = 0.0f;
        const float thr = qora_finite_max(v, n, &m) ? m + P->log_min_p : INFINITY;
        for (int i = 0; i < n; i++)
            if (!(v[i] >= thr)) v[i] = -INFINITY;
    }
    if (!qora_softmax64(v, n, S->e, S->p)) return QORA_SAMPLE_EMPTY;
    double* cdf = S->e;
    double c = 0.0;
    for (int i = 0; i < n; i++) cdf[i] = c = c + S->p[i]; /* NumPy's cumsum: sequential */
    const double target = u * cdf[n - 1];
    int lo = 0, hi = n; /* searchsorted(side="right"): the first cdf > target */
    while (lo < hi) {
        const int mid = lo + (hi - lo) / 2;
        if (cdf[mid] <= target)
            lo = mid + 1;
        else
            hi = mid;
    }
    int i = lo < n - 1 ? lo : n - 1;
    while (S->p[i] == 0.0 && i > 0) i--;
    return ids[i];
}

/* Penalties, bias, bans and mask applied to a copy of the logits in S->y. Returns 0 or an error. */
static int qora_sample_modify(qora_sampler* S, const qora_sample_params* P, float* y,
                              const qora_sample_inputs* in) {
    const int V = S->vocab;
    const int pen = P->repeat_penalty != 1.0f || P->presence_penalty != 0.0f || P->frequency_penalty != 0.0f;
    if (pen && in->n_recent > 0) {
        for (int i = 0; i < in->n_recent; i++)
            if (in->recent[i] < 0 || in->recent[i] >= V) return QORA_SAMPLE_RANGE;
        int nd = 0;
        for (int i = 0; i < in->n_recent; i++) {
            const int32_t t = in->recent[i];
            if (in->exempt && in->exempt[t]) continue;
            if (S->count[t]++ == 0) S->distinct[nd++] = t;
        }
        for (int d = 0; d < nd; d++) {
            const int32_t t = S->distinct[d];
            float v = y[t];
            if (P->repeat_penalty != 1.0f) v = v > 0 ? v / P->repeat_penalty : v * P->repeat_penalty;
            if (P->presence_penalty != 0.0f) v -= P->presence_penalty;
            if (P->frequency_penalty != 0.0f) v -= P->frequency_penalty * (float)S->count[t];
            y[t] = v;
            S->count[t] = 0;
        }
    }
    for (int i = 0; i < in->n_bias; i++)
        if (in->bias_id[i] >= 0 && in->bias_id[i] < V) y[in->bias_id[i]] += in->bias[i];
    for (int i = 0; i < in->n_banned; i++)
        if (in->banned[i] >= 0 && in->banned[i] < V) y[in->banned[i]] = -INFINITY;
    return 0;
}

static int qora_sample_adjust(qora_sampler* S, const qora_sample_params* P, const float* x,
                              const qora_sample_inputs* in) {
    const int V = S->vocab;
    memcpy(S->y, x, (size_t)V * sizeof(float));
    float* y = S->y;
    const int rc = qora_sample_modify(S, P, y, in);
    if (rc) return rc;
    if (in->mask) {
        const int nb = in->mask_bits < V ? in->mask_bits : V;
        for (int i = 0; i < nb; i++)
            if (!((in->mask[i >> 5] >> (i & 31)) & 1u)) y[i] = -INFINITY;
        for (int i = nb; i < V; i++) y[i] = -INFINITY;
    }
    return 0;
}

static int qora_sample_heap(qora_sampler* S, const qora_sample_params* P, const float* y, int n, double u);

/* The whole choice over the vocabulary: the chosen id, or a QORA_SAMPLE_* error. */
static int qora_sample(qora_sampler* S, const qora_sample_params* P, const float* x, const qora_sample_inputs* in,
                       double u) {
    const int V = S->vocab;
    if (qora_has_nan(x, V)) return QORA_SAMPLE_NAN;
    const int pen = P->repeat_penalty != 1.0f || P->presence_penalty != 0.0f || P->frequency_penalty != 0.0f;
    const float* y = x;
    if ((pen && in->n_recent > 0) || in->n_bias || in->n_banned || in->mask) {
        const int rc = qora_sample_adjust(S, P, x, in);
        if (rc) return rc;
        y = S->y;
    }
    if (P->greedy) return qora_argmax(y, V);
    int k = P->top_k;
    if (k == 0 || k >= V) k = V; /* every token */
    if (k > QORA_SAMPLE_MAX_K || !(P->temperature > 0.0f)) return QORA_SAMPLE_ARGS;
    int n = qora_topk_scan(y, V, P->temperature, k, S->hv, S->hi);
    return qora_sample_heap(S, P, y, n, u);
}

/* From a top-k heap of n entries over the values y (before temperature) on: Python's _choose after
   apply_top_k. */
static int qora_sample_heap(qora_sampler* S, const qora_sample_params* P, const float* y, int n, double u) {
    int f = 0; /* finite ones, in id order */
    for (int i = 0; i < n; i++)
        if (isfinite(S->hv[i])) S->ord[f++] = S->hi[i];
    qsort(S->ord, (size_t)f, sizeof(int32_t), qora_by_id);
    /* values after temperature again for the sorted ids (the same division) */
    for (int i = 0; i < f; i++) {
        const int32_t id = S->ord[i];
        S->hi[i] = id;
        S->hv[i] = P->temperature != 1.0f ? y[id] / P->temperature : y[id];
    }
    return qora_sample_candidates(S, P, S->hi, S->hv, f, u);
}

/* float of an order-preserving key (sample_topk.comp's key_of) */
static inline float qora_key_float(uint32_t key) {
    const uint32_t u = (key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* The choice from part of the logits: n (value bits, id) pairs holding every logit >= thr (all of
   them when `all`; every other logit is below thr), for settings whose penalties, bias and bans only
   ever lower a logit (so a logit below thr stays below it) and no mask. Chooses exactly what
   qora_sample would over the whole row, or returns QORA_SAMPLE_ARGS when the pairs cannot decide it
   (a logit left out could tie or pass the k-th after temperature): the caller reads the whole row. */
static int qora_sample_sparse(qora_sampler* S, const qora_sample_params* P, const uint32_t* pairs, int n, float thr,
                              int all, const qora_sample_inputs* in, double u) {
    const int V = S->vocab;
    if (n < 1 || n > QORA_SAMPLE_SPARSE_MAX || in->mask) return QORA_SAMPLE_ARGS;
    if (P->repeat_penalty < 1.0f || P->presence_penalty < 0.0f || P->frequency_penalty < 0.0f) return QORA_SAMPLE_ARGS;
    for (int i = 0; i < in->n_bias; i++)
        if (in->bias[i] > 0.0f) return QORA_SAMPLE_ARGS; /* would raise a logit from below thr */
    float* y = S->y;
    int nl = 0, rc = 0;
    for (int i = 0; i < n; i++) {
        const int32_t id = (int32_t)pairs[2 * i + 1];
        if (id < 0 || id >= V || S->mark[id]) continue;
        float v;
        memcpy(&v, &pairs[2 * i], sizeof v);
        if (v != v) rc = QORA_SAMPLE_ARGS; /* NaN: the whole row says so */
        y[id] = v;
        S->mark[id] = 1;
        S->list[nl++] = id;
    }
    for (int i = 0; i < nl; i++) S->mark[S->list[i]] = 0;
    if (rc) return rc;
    /* ids outside the pairs are changed too (their y is not set): only their own entries are read */
    rc = qora_sample_modify(S, P, y, in);
    if (rc) return rc;
    qsort(S->list, (size_t)nl, sizeof(int32_t), qora_by_id);
    /* every logit left out is < thr, and stays below it: at most prev(thr) before temperature */
    const float out_max = nextafterf(thr, -INFINITY);
    if (P->greedy) {
        int best = S->list[0];
        for (int i = 1; i < nl; i++)
            if (y[S->list[i]] > y[best]) best = S->list[i];
        return all || y[best] > out_max ? best : QORA_SAMPLE_ARGS;
    }
    const int k = P->top_k;
    if (k < 1 || k >= V || k > QORA_SAMPLE_MAX_K || !(P->temperature > 0.0f)) return QORA_SAMPLE_ARGS;
    int kept = 0;
    for (int i = 0; i < nl; i++) {
        const int32_t id = S->list[i];
        qora_heap_offer(S->hv, S->hi, &kept, k, P->temperature != 1.0f ? y[id] / P->temperature : y[id], id);
    }
    const float z_out = P->temperature != 1.0f ? out_max / P->temperature : out_max;
    if (!all && (kept < k || !(S->hv[0] > z_out))) return QORA_SAMPLE_ARGS;
    return qora_sample_heap(S, P, y, kept, u);
}

#endif /* QORA_SAMPLE_H */
