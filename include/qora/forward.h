/* qora — the model: structs by lifetime (config, weights, run state) and the
   forward pass, top to bottom like the math. */
#ifndef QORA_FORWARD_H
#define QORA_FORWARD_H

#include <stdlib.h>
#include "kernels.h"

/* ---------------------------------------------------------------- config */
typedef struct {
    int n_layers;
    int dim;         /* hidden size */
    int n_heads;     /* query heads */
    int n_kv_heads;  /* key/value heads (GQA: n_heads % n_kv_heads == 0) */
    int head_dim;
    int hidden_dim;  /* MLP intermediate size */
    int vocab_size;
    int max_seq_len; /* KV cache capacity in tokens (not the model's maximum) */
    float norm_eps;
    float rope_scale; /* YaRN attention factor applied to cos/sin; 1 otherwise */
    int kv_type;      /* KV cache: QORA_F32 (exact), QORA_F16 (half the bytes attention streams) or QORA_Q8
                         (Q8_0 blocks of 32 per head, 34 bytes: about half of f16; head_dim % 32 == 0) */
    int act_f32;      /* float activations: weights dequantized, no activation rounding (else Q8_0 / Q8_K) */
} qora_config;

/* --------------------------------------------------------------- weights */
typedef struct {
    const float* attn_norm; /* (dim,) */
    qora_tensor wq;         /* (n_heads*head_dim, dim) */
    qora_tensor wk;         /* (n_kv_heads*head_dim, dim) */
    qora_tensor wv;         /* (n_kv_heads*head_dim, dim) */
    qora_tensor wo;         /* (dim, n_heads*head_dim) */
    const float* ffn_norm;  /* (dim,) */
    qora_tensor w_gate;     /* (hidden_dim, dim) */
    qora_tensor w_up;       /* (hidden_dim, dim) */
    qora_tensor w_down;     /* (dim, hidden_dim) */
    int use_rope;           /* 0 on SmolLM3's NoPE layers */
} qora_layer;

typedef struct {
    qora_tensor tok_embeddings; /* (vocab, dim) */
    qora_tensor output;         /* (vocab, dim); the embeddings again when tied */
    const float* norm;          /* (dim,) final RMSNorm */
    const float* inv_freq;      /* (head_dim/2,) RoPE inverse frequencies, YaRN-adjusted */
    qora_layer* layers;         /* (n_layers,) */
} qora_weights;

/* ------------------------------------------------------------- run state */
/* Tokens go through the layers in chunks of up to QORA_CHUNK: one token when
   decoding, a prompt's worth when prefilling (weights then stream once per chunk). */
#define QORA_CHUNK 16

/* Attention over a long context goes in chunks of QORA_ATT_CHUNK cached positions, each with
   its own max, sum and unnormalised V sum, folded together in chunk order (flash-decoding).
   The chunk length is fixed in positions, never derived from the thread count, so every
   thread count and path computes the same operations (common.h); a context of one chunk is
   plain softmax attention. */
#define QORA_ATT_CHUNK 256

static inline int qora_att_chunks(int n_pos) { return (n_pos + QORA_ATT_CHUNK - 1) / QORA_ATT_CHUNK; }

/* Floats of qora_attention_tiles's scratch for n queries over n_pos positions: per chunk, every
   query vector's V sum, max and sum. */
static inline size_t qora_att_part_floats(int n_pos, int n, int n_heads, int head_dim) {
    return (size_t)qora_att_chunks(n_pos) * n * n_heads * (head_dim + 2);
}

typedef struct {
    float* x;        /* (QORA_CHUNK, dim) residual stream */
    float* xb;       /* (QORA_CHUNK, dim) normed input of a sublayer */
    float* xb2;      /* (QORA_CHUNK, dim) sublayer output */
    float* q;        /* (QORA_CHUNK, n_heads*head_dim) */
    float* k;        /* (QORA_CHUNK, n_kv_heads*head_dim) */
    float* v;        /* (QORA_CHUNK, n_kv_heads*head_dim) */
    float* att;      /* (QORA_CHUNK, n_heads*head_dim) attention output */
    float* hb;       /* (QORA_CHUNK, hidden_dim) silu(gate) * up */
    block_q8* xq;    /* (QORA_CHUNK, xq_stride) activations as Q8_0 / Q8_K (qora_q8k_at), widest = max(dim, q_dim, hidden_dim) */
    qora_xblock* xs; /* (QORA_CHUNK, widest/32) extras of each Q8 block */
    size_t xq_stride;   /* blocks per row of xq and xs */
    float* scores;      /* (QORA_CHUNK, n_heads, max_seq_len) attention weights */
    float* att_part;    /* attention scratch: the chunk partials of every query vector */
    float* qg;          /* (QORA_CHUNK, n_heads*head_dim) the queries regrouped by KV group */
    void* key_cache;   /* (n_layers, max_seq_len) rows of n_kv_heads*head_dim, of cfg.kv_type (qora_kv_row_bytes) */
    void* value_cache; /* the same */
} qora_state;

typedef struct {
    qora_config cfg;
    qora_weights w;
    qora_state s;
    const qora_kernels* K;
    int n_threads;
} qora_model;

enum { QORA_OK = 0, QORA_ERR_ARGS = -1, QORA_ERR_TOKEN = -2, QORA_ERR_CONTEXT = -3, QORA_ERR_NOMEM = -4 };

/* the KV cache types: f32, f16, and Q8_0 (llama.cpp's block layout, 32 values per block, which
   never straddles two heads) */
static inline int qora_kv_type_ok(int kv_type, int head_dim) {
    return kv_type == QORA_F32 || kv_type == QORA_F16 || (kv_type == QORA_Q8 && head_dim % QK == 0);
}

/* bytes of one cached position's keys (or values) in one layer */
static inline size_t qora_kv_row_bytes(const qora_config* c) {
    return qora_row_bytes(c->kv_type, c->n_kv_heads * c->head_dim);
}

static void qora_state_free(qora_state* s) {
    free(s->x); free(s->xb); free(s->xb2); free(s->q); free(s->k); free(s->v); free(s->att); free(s->hb);
    free(s->xq); free(s->xs); free(s->scores); free(s->att_part); free(s->qg); free(s->key_cache); free(s->value_cache);
    memset(s, 0, sizeof *s);
}

/* All buffers are allocated once here: a forward call allocates nothing. rows: token rows a pass
   takes at once; n_caches: KV caches of max_seq_len positions (one per sequence slot). */
static int qora_state_alloc(qora_state* s, const qora_config* c, size_t rows, size_t n_caches) {
    if (!s || !c) return QORA_ERR_ARGS;
    memset(s, 0, sizeof *s);
    if (c->n_layers < 1 || c->dim < 1 || c->n_heads < 1 || c->n_kv_heads < 1 || c->head_dim < 1 ||
        c->hidden_dim < 1 || c->vocab_size < 1 || c->max_seq_len < 1 || rows < 1 || n_caches < 1 ||
        !qora_kv_type_ok(c->kv_type, c->head_dim))
        return QORA_ERR_ARGS;
    const size_t C = rows;
    const size_t q_dim = (size_t)c->n_heads * c->head_dim, kv_dim = (size_t)c->n_kv_heads * c->head_dim;
    size_t widest = (size_t)c->dim;
    if (q_dim > widest) widest = q_dim;
    if ((size_t)c->hidden_dim > widest) widest = (size_t)c->hidden_dim;
    const size_t cache = n_caches * (size_t)c->n_layers * (size_t)c->max_seq_len; /* rows of qora_kv_row_bytes */
    s->x = calloc(C * c->dim, sizeof(float));
    s->xb = calloc(C * c->dim, sizeof(float));
    s->xb2 = calloc(C * c->dim, sizeof(float));
    s->q = calloc(C * q_dim, sizeof(float));
    s->k = calloc(C * kv_dim, sizeof(float));
    s->v = calloc(C * kv_dim, sizeof(float));
    s->att = calloc(C * q_dim, sizeof(float));
    s->hb = calloc(C * c->hidden_dim, sizeof(float));
    s->xq_stride = qora_xq_stride((int)widest);
    s->xq = calloc(C * s->xq_stride, sizeof(block_q8));
    s->xs = calloc(C * s->xq_stride, sizeof(qora_xblock));
    s->scores = calloc(C * (size_t)c->n_heads * c->max_seq_len, sizeof(float)); /* touched only as far as used */
    /* attention scratch: qora_attention_tiles' partials for up to QORA_CHUNK queries, or
       qora_attend_group's per (row, group) pair */
    size_t part = qora_att_part_floats(c->max_seq_len, C < QORA_CHUNK ? (int)C : QORA_CHUNK, c->n_heads, c->head_dim);
    if (part < C * c->n_heads * (size_t)(c->head_dim + 4)) part = C * c->n_heads * (size_t)(c->head_dim + 4);
    s->att_part = malloc(part * sizeof(float));
    s->qg = malloc(C * q_dim * sizeof(float));
    s->key_cache = calloc(cache, qora_kv_row_bytes(c));
    s->value_cache = calloc(cache, qora_kv_row_bytes(c));
    if (!s->x || !s->xb || !s->xb2 || !s->q || !s->k || !s->v || !s->att || !s->hb || !s->xq || !s->xs || !s->scores ||
        !s->att_part || !s->qg || !s->key_cache || !s->value_cache) {
        qora_state_free(s);
        return QORA_ERR_NOMEM;
    }
    return QORA_OK;
}

static int qora_state_init(qora_state* s, const qora_config* c) { return qora_state_alloc(s, c, QORA_CHUNK, 1); }

/* ------------------------------------------------------------ components */

/* RoPE, rotate-half form: element i pairs with i + head_dim/2 (HF Llama). */
static void qora_rope(float* v, int n_heads, int head_dim, int pos, const float* inv_freq, float scale) {
    const int half = head_dim / 2;
    for (int i = 0; i < half; i++) {
        const float angle = (float)pos * inv_freq[i]; /* float32 product, as HF computes it */
        const float c = cosf(angle) * scale, s = sinf(angle) * scale;
        for (int h = 0; h < n_heads; h++) {
            float* vh = v + (size_t)h * head_dim;
            const float x0 = vh[i], x1 = vh[i + half];
            vh[i] = x0 * c - x1 * s;
            vh[i + half] = x1 * c + x0 * s;
        }
    }
}

/* One chunk, positions p0..p0+n-1, of the query heads that share KV head g: K/V rows are read
   once for the whole group (GQA). Per head j of the group: scores (at their positions in
   scores[j * score_stride]) = q . k * head_dim^-0.5, replaced by e_t = exp(s_t - mx[j]);
   sum[j] = the e_t summed; acc[j * head_dim ..] = fma chain over positions of e_t * v_t.
   kc/vc: (n_pos, kv_stride) values of kv_type (f32, f16, or Q8_0: kv_stride / 32 blocks a row, each
   value f16(d) * q, exact in float, so its steps are the float ones); q, scores: the group's first head. */
static void qora_attend_chunk(const qora_kernels* K, const float* q, const void* kc, const void* vc, int kv_type,
                              int p0, int n, int g, int group, int ng, int head_dim, size_t kv_stride,
                              float* scores, size_t score_stride, float* acc, float* mx, float* sum) {
    const float scale = 1.0f / sqrtf((float)head_dim);
    const size_t off = (size_t)p0 * kv_stride + (size_t)g * head_dim;
    float* sc = scores + p0;
    const block_q8* kq = kv_type == QORA_Q8 ? (const block_q8*)kc + off / QK : NULL;
    const block_q8* vq = kv_type == QORA_Q8 ? (const block_q8*)vc + off / QK : NULL;
    if (kv_type == QORA_F16 && K->attend_f16 &&
        K->attend_f16(q, (const uint16_t*)kc + off, (const uint16_t*)vc + off, n, group, ng, head_dim, kv_stride, sc,
                      score_stride, acc, mx, sum, scale))
        return;
    if (kv_type == QORA_Q8 && K->attend_q8 &&
        K->attend_q8(q, kq, vq, n, group, ng, head_dim, kv_stride, sc, score_stride, acc, mx, sum, scale))
        return;
    if (ng > 1) { /* the generic loop takes one group at a time */
        for (int i = 0; i < ng; i++) {
            const size_t h = (size_t)i * group;
            qora_attend_chunk(K, q + h * head_dim, kc, vc, kv_type, p0, n, g + i, group, 1, head_dim, kv_stride,
                              scores + h * score_stride, score_stride, acc + h * head_dim, mx + h, sum + h);
        }
        return;
    }
    for (int t = 0; t < n; t++) {
        const size_t row = off + (size_t)t * kv_stride;
        for (int j = 0; j < group; j++) {
            const float* qh = q + (size_t)j * head_dim;
            const float d = kv_type == QORA_F16 ? K->dot_f16_f32(head_dim, (const uint16_t*)kc + row, qh)
                            : kv_type == QORA_Q8 ? dot_q8kv_f32_scalar(head_dim, kq + (size_t)t * (kv_stride / QK), qh)
                                                 : K->dot_f32(head_dim, (const float*)kc + row, qh);
            sc[j * score_stride + t] = d * scale;
        }
    }
    /* heads go 64 at a time so the V rows are read once per batch of heads */
    for (int jb = 0; jb < group; jb += 64) {
        const int je = group - jb < 64 ? group : jb + 64;
        for (int j = jb; j < je; j++) {
            sum[j] = K->softmax_unnorm(sc + j * score_stride, n, mx + j);
            memset(acc + (size_t)j * head_dim, 0, (size_t)head_dim * sizeof(float));
        }
        for (int t = 0; t < n; t++) {
            const size_t row = off + (size_t)t * kv_stride;
            for (int j = jb; j < je; j++) {
                float* aj = acc + (size_t)j * head_dim;
                const float e = sc[j * score_stride + t];
                if (kv_type == QORA_F16) K->axpy_f16(head_dim, e, (const uint16_t*)vc + row, aj);
                else if (kv_type == QORA_Q8) axpy_q8kv_scalar(head_dim, e, vq + (size_t)t * (kv_stride / QK), aj);
                else K->axpy(head_dim, e, (const float*)vc + row, aj);
            }
        }
    }
}

/* Folds a later chunk (acc, mx, sum of one head) into the running (*M, *S, o), in the order of
   common.h: M' = max(M, mx), a = exp(M - M'), b = exp(mx - M'), S = fma(sum, b, S * a),
   o = fma(b, acc, o * a). */
static inline void qora_attend_fold(const qora_kernels* K, int head_dim, const float* acc, float mx, float sum,
                                    float* M, float* S, float* o) {
    const float m2 = mx > *M ? mx : *M;
    const float a = qora_exp_neg(*M - m2), b = qora_exp_neg(mx - m2);
    *S = fmaf(sum, b, *S * a);
    for (int i = 0; i < head_dim; i++) o[i] = o[i] * a;
    K->axpy(head_dim, b, acc, o);
    *M = m2;
}

/* o = o * (1 / S) */
static inline void qora_attend_finish(int head_dim, float S, float* o) {
    const float inv = 1.0f / S;
    for (int i = 0; i < head_dim; i++) o[i] = o[i] * inv;
}

/* Causal attention of KV group g's query heads for one query over n_pos cached positions, the
   chunks one after another (the batched step's rows, where the threads take (row, group) pairs):
   the operations of qora_attention_tiles for that query.
   scores: (n_heads, score_stride); tmp: group * (head_dim + 4) floats. */
static void qora_attend_group(const qora_kernels* K, const float* q, const void* kc, const void* vc, int kv_type,
                              int n_pos, int g, int group, int head_dim, size_t kv_stride, float* scores,
                              size_t score_stride, float* out, float* tmp) {
    const int h0 = g * group;
    const float* qg = q + (size_t)h0 * head_dim;
    float* sg = scores + (size_t)h0 * score_stride;
    float* o = out + (size_t)h0 * head_dim;
    float *M = tmp + (size_t)group * head_dim, *S = M + group, *mx = S + group, *sum = mx + group;
    qora_attend_chunk(K, qg, kc, vc, kv_type, 0, n_pos < QORA_ATT_CHUNK ? n_pos : QORA_ATT_CHUNK, g, group, 1, head_dim,
                      kv_stride, sg, score_stride, o, M, S);
    for (int p0 = QORA_ATT_CHUNK; p0 < n_pos; p0 += QORA_ATT_CHUNK) {
        const int n = n_pos - p0 < QORA_ATT_CHUNK ? n_pos - p0 : QORA_ATT_CHUNK;
        qora_attend_chunk(K, qg, kc, vc, kv_type, p0, n, g, group, 1, head_dim, kv_stride, sg, score_stride, tmp, mx,
                          sum);
        for (int j = 0; j < group; j++)
            qora_attend_fold(K, head_dim, tmp + (size_t)j * head_dim, mx[j], sum[j], M + j, S + j,
                             o + (size_t)j * head_dim);
    }
    for (int j = 0; j < group; j++) qora_attend_finish(head_dim, S[j], o + (size_t)j * head_dim);
}

/* Causal GQA attention of n queries at positions pos0 .. pos0+n-1 (all heads) over the cache's
   first pos0 + n positions: flash attention in the order of common.h. A work item is one KV
   group against one key chunk: the group's query heads of all n tokens (n * group vectors) share
   each K and V row, read once per item; a chunk every query sees whole is one tile, and on the
   diagonal each query takes the chunk's first positions up to its own (the causally masked rest
   is never computed, and a chunk past a query is skipped). Items spread over the threads; then
   each (token, head) folds its chunks in order. Every query computes exactly the operations of
   one decode step at its position, for any n and thread count. Decode is n = 1.
   q, out: (n, n_heads*head_dim); scores: n * n_heads * score_stride floats (score_stride >= pos0
   + n); qg: n * n_heads * head_dim floats (the queries regrouped by KV group; unused when n = 1);
   part: qora_att_part_floats(pos0 + n, n, n_heads, head_dim) floats. */
static void qora_attention_tiles(const qora_kernels* K, const float* q, const void* kc, const void* vc, int kv_type,
                                 int pos0, int n, int n_heads, int n_kv_heads, int head_dim, size_t kv_stride,
                                 float* scores, size_t score_stride, float* qg, float* out, float* part,
                                 int n_threads) {
    const int group = n_heads / n_kv_heads, nq = n * group, nc = qora_att_chunks(pos0 + n);
    /* groups per work item: decode takes whole cache rows (all groups) where that leaves two items a
       thread, half rows and so on down to one group, since an item that reads each row's slice of one
       group is a strided stream the hardware prefetchers follow poorly; a prefill tile reads each row
       for many queries, so its items stay one group (more of them for the threads) */
    int gpi = 1;
    if (n == 1)
        for (int d = n_kv_heads; d > 1; d--)
            if (n_kv_heads % d == 0 && (long long)nc * (n_kv_heads / d) >= 2LL * n_threads) {
                gpi = d;
                break;
            }
    const int ipc = n_kv_heads / gpi, items = nc * ipc; /* items per chunk, in all */
    const size_t q_dim = (size_t)n_heads * head_dim, vs = (size_t)n * n_heads; /* vs: query vectors */
    const size_t per = vs * (head_dim + 2); /* a chunk's part: V sums, then maxes, then sums, by vector */
    /* vector (g, t, j) = token t's head g * group + j, at (g * n + t) * group + j */
    const float* Q = q;
    if (n > 1) {
        for (int t = 0; t < n; t++)
            for (int g = 0; g < n_kv_heads; g++)
                memcpy(qg + (size_t)(g * n + t) * group * head_dim, q + t * q_dim + (size_t)g * group * head_dim,
                       (size_t)group * head_dim * sizeof(float));
        Q = qg;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(n_threads) \
    if ((long long)(pos0 + n) * n * n_heads * head_dim >= QORA_PARALLEL_MIN_WORK / 4)
#endif
    {
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
        for (int it = 0; it < items; it++) {
            const int c = it / ipc, g = it % ipc * gpi, p0 = c * QORA_ATT_CHUNK;
            const size_t v0 = (size_t)g * nq;
            const float* qv = Q + v0 * head_dim;
            float* sc = scores + v0 * score_stride;
            float *acc = part + (size_t)c * per + v0 * head_dim, *mx = part + (size_t)c * per + vs * head_dim + v0;
            float* sum = mx + vs;
            if (pos0 + 1 - p0 >= QORA_ATT_CHUNK) { /* every query sees the whole chunk: one tile */
                qora_attend_chunk(K, qv, kc, vc, kv_type, p0, QORA_ATT_CHUNK, g, nq, gpi, head_dim, kv_stride, sc,
                                  score_stride, acc, mx, sum);
                continue;
            }
            for (int t = 0; t < n; t++) { /* the diagonal: each query up to its own position (gpi > 1: n = 1) */
                int len = pos0 + t + 1 - p0;
                if (len <= 0) continue;
                if (len > QORA_ATT_CHUNK) len = QORA_ATT_CHUNK;
                const size_t v = (size_t)t * group;
                qora_attend_chunk(K, qv + v * head_dim, kc, vc, kv_type, p0, len, g, group, gpi, head_dim, kv_stride,
                                  sc + v * score_stride, score_stride, acc + v * head_dim, mx + v, sum + v);
            }
        }
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int i = 0; i < n * n_heads; i++) {
            const int t = i / n_heads, h = i % n_heads;
            const size_t v = (size_t)((h / group) * n + t) * group + h % group;
            float* o = out + t * q_dim + (size_t)h * head_dim;
            memcpy(o, part + v * head_dim, (size_t)head_dim * sizeof(float));
            float M = part[vs * head_dim + v], S = part[vs * (head_dim + 1) + v];
            for (int c = 1; c < qora_att_chunks(pos0 + t + 1); c++) {
                const float* P = part + (size_t)c * per;
                qora_attend_fold(K, head_dim, P + v * head_dim, P[vs * head_dim + v], P[vs * (head_dim + 1) + v], &M,
                                 &S, o);
            }
            qora_attend_finish(head_dim, S, o);
        }
    }
    (void)n_threads;
}

/* qora_attention_tiles with its scratch allocated here (the kernel tests' entry; the forward pass
   uses the state's): n queries whose own positions are the cache's last n rows (n_pos in all).
   Without memory the output is NaN. */
static void qora_attention(const qora_kernels* K, const float* q, const void* kc, const void* vc, int kv_type,
                           int n_pos, int n, int n_heads, int n_kv_heads, int head_dim, size_t kv_stride,
                           float* scores, size_t score_stride, float* out, int n_threads) {
    float* part = malloc(qora_att_part_floats(n_pos, n, n_heads, head_dim) * sizeof(float));
    float* qg = malloc((size_t)n * n_heads * head_dim * sizeof(float));
    if (!part || !qg) {
        for (size_t i = 0; i < (size_t)n * n_heads * head_dim; i++) out[i] = NAN;
    } else {
        qora_attention_tiles(K, q, kc, vc, kv_type, n_pos - n, n, n_heads, n_kv_heads, head_dim, kv_stride, scores,
                             score_stride, qg, out, part, n_threads);
    }
    free(part);
    free(qg);
}

/* ------------------------------------------------------------ forward pass */

/* x[t] += y[t] for n rows of dim */
static inline void qora_residual(float* x, const float* y, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] += y[i];
}

/* A layer up to its attention, for n rows of s->x: attention norm, then the q, k, v projections
   (activations quantized once for the three) into s->q, s->k, s->v. */
static void qora_layer_qkv(const qora_kernels* K, const qora_config* c, const qora_layer* L, qora_state* s, int n,
                           int nt) {
    const int D = c->dim, q_dim = c->n_heads * c->head_dim, kv_dim = c->n_kv_heads * c->head_dim;
    const size_t lq = s->xq_stride;
    block_q8* xq = c->act_f32 ? NULL : s->xq;
    for (int t = 0; t < n; t++) K->rmsnorm(s->xb + (size_t)t * D, s->x + (size_t)t * D, L->attn_norm, D, c->norm_eps);
    qora_prepare_acts(K, qora_act_needs(L->wq.dtype) | qora_act_needs(L->wk.dtype) | qora_act_needs(L->wv.dtype), s->xb,
                      D, xq, s->xs, lq, n, D, nt);
    qora_matmul(K, &L->wq, s->xb, D, xq, s->xs, lq, n, s->q, q_dim, nt);
    qora_matmul(K, &L->wk, s->xb, D, xq, s->xs, lq, n, s->k, kv_dim, nt);
    qora_matmul(K, &L->wv, s->xb, D, xq, s->xs, lq, n, s->v, kv_dim, nt);
}

/* Row t at position pos: RoPE on its q and k (not on NoPE layers), then its k and v into the
   cache rows kdst, vdst as cfg.kv_type stores them (f32 copied, f16 rounded, Q8_0 quantized by
   the activation quantizer, the same bits on every path). */
static void qora_rope_store(const qora_config* c, const qora_layer* L, const float* inv_freq, const qora_kernels* K,
                            qora_state* s, int t, int pos, void* kdst, void* vdst) {
    const int q_dim = c->n_heads * c->head_dim, kv_dim = c->n_kv_heads * c->head_dim;
    float *k = s->k + (size_t)t * kv_dim, *v = s->v + (size_t)t * kv_dim;
    if (L->use_rope) {
        qora_rope(s->q + (size_t)t * q_dim, c->n_heads, c->head_dim, pos, inv_freq, c->rope_scale);
        qora_rope(k, c->n_kv_heads, c->head_dim, pos, inv_freq, c->rope_scale);
    }
    if (c->kv_type == QORA_F16) {
        K->to_f16(k, (uint16_t*)kdst, kv_dim);
        K->to_f16(v, (uint16_t*)vdst, kv_dim);
    } else if (c->kv_type == QORA_Q8) {
        K->quantize_q8(k, (block_q8*)kdst, kv_dim);
        K->quantize_q8(v, (block_q8*)vdst, kv_dim);
    } else {
        memcpy(kdst, k, (size_t)kv_dim * sizeof(float));
        memcpy(vdst, v, (size_t)kv_dim * sizeof(float));
    }
}

/* A layer after its attention, for the n rows of s->att (the attention output) and s->x (the
   residual stream): output projection and residual, ffn norm, fused gate+up
   hb = silu(gate . x) * (up . x), down projection and residual. qora_chunk and qora_batch_pass
   share it, so a row computes the same operations in either. */
static void qora_layer_tail(const qora_kernels* K, const qora_config* c, const qora_layer* L, qora_state* s, int n,
                            int nt) {
    const int D = c->dim, q_dim = c->n_heads * c->head_dim;
    const size_t lq = s->xq_stride;
    block_q8* xq = c->act_f32 ? NULL : s->xq; /* NULL: float activations (qora_matmul) */

    qora_prepare_inputs(K, L->wo.dtype, s->att, q_dim, xq, s->xs, lq, n, q_dim, nt);
    qora_matmul(K, &L->wo, s->att, q_dim, xq, s->xs, lq, n, s->xb2, D, nt);
    qora_residual(s->x, s->xb2, (size_t)n * D);

    for (int t = 0; t < n; t++) K->rmsnorm(s->xb + (size_t)t * D, s->x + (size_t)t * D, L->ffn_norm, D, c->norm_eps);
    qora_prepare_acts(K, qora_act_needs(L->w_gate.dtype) | qora_act_needs(L->w_up.dtype), s->xb, D, xq, s->xs, lq, n,
                      D, nt);
    qora_swiglu(K, &L->w_gate, &L->w_up, s->xb, D, xq, s->xs, lq, n, s->hb, c->hidden_dim, nt);

    qora_prepare_inputs(K, L->w_down.dtype, s->hb, c->hidden_dim, xq, s->xs, lq, n, c->hidden_dim, nt);
    qora_matmul(K, &L->w_down, s->hb, c->hidden_dim, xq, s->xs, lq, n, s->xb2, D, nt);
    qora_residual(s->x, s->xb2, (size_t)n * D);
}

/* n <= QORA_CHUNK tokens at positions pos0.. through every layer. Logits:
   all n rows (all_logits), only the last row, or none (logits == NULL). */
static void qora_chunk(qora_model* m, const int32_t* tokens, int n, int pos0, float* logits, int all_logits) {
    const qora_config* c = &m->cfg;
    const qora_kernels* K = m->K;
    qora_state* s = &m->s;
    const int nt = m->n_threads;
    const int D = c->dim, kv_dim = c->n_kv_heads * c->head_dim;
    const size_t lq = s->xq_stride, T = (size_t)c->max_seq_len;
    block_q8* xq = c->act_f32 ? NULL : s->xq; /* NULL: float activations (qora_matmul) */

    /* token embeddings */
    for (int t = 0; t < n; t++) qora_dequant_row(&m->w.tok_embeddings, tokens[t], s->x + (size_t)t * D);

    for (int l = 0; l < c->n_layers; l++) {
        const qora_layer* L = &m->w.layers[l];
        const size_t row_bytes = qora_kv_row_bytes(c);
        char* key_cache = (char*)s->key_cache + (size_t)l * T * row_bytes; /* (max_seq_len) rows */
        char* value_cache = (char*)s->value_cache + (size_t)l * T * row_bytes;

        qora_layer_qkv(K, c, L, s, n, nt);
        for (int t = 0; t < n; t++)
            qora_rope_store(c, L, m->w.inv_freq, K, s, t, pos0 + t, key_cache + (size_t)(pos0 + t) * row_bytes,
                            value_cache + (size_t)(pos0 + t) * row_bytes);

        /* causal grouped-query attention: token t sees positions 0..pos0+t */
        qora_attention_tiles(K, s->q, key_cache, value_cache, c->kv_type, pos0, n, c->n_heads, c->n_kv_heads,
                             c->head_dim, (size_t)kv_dim, s->scores, T, s->qg, s->att, s->att_part, nt);

        qora_layer_tail(K, c, L, s, n, nt);
    }

    if (!logits) return; /* prefill chunks whose logits nobody reads skip the LM head */

    /* final norm and LM head, for every row or just the last */
    const int first = all_logits ? 0 : n - 1, rows = n - first;
    for (int t = first; t < n; t++)
        K->rmsnorm(s->xb + (size_t)(t - first) * D, s->x + (size_t)t * D, m->w.norm, D, c->norm_eps);
    qora_prepare_inputs(K, m->w.output.dtype, s->xb, D, xq, s->xs, lq, rows, D, nt);
    qora_matmul(K, &m->w.output, s->xb, D, xq, s->xs, lq, rows, logits, (size_t)c->vocab_size, nt);
}

/* n tokens at positions start_pos.. ; logits: (n, vocab) if all_logits else (vocab,)
   for the last token, or NULL for none. Every argument that came from Python is
   checked again here. */
static int qora_forward(qora_model* m, const int32_t* tokens, int n, int start_pos, float* logits, int all_logits) {
    if (!m || !m->w.layers || !m->s.x || !tokens || n < 1 || start_pos < 0) return QORA_ERR_ARGS;
    if (!m->K || m->n_threads < 1 || !m->w.norm || !m->w.inv_freq || !m->w.tok_embeddings.data ||
        !m->w.output.data)
        return QORA_ERR_ARGS;
    if ((long long)start_pos + n > m->cfg.max_seq_len) return QORA_ERR_CONTEXT;
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= m->cfg.vocab_size) return QORA_ERR_TOKEN;
    for (int i = 0; i < n; i += QORA_CHUNK) {
        const int len = n - i < QORA_CHUNK ? n - i : QORA_CHUNK;
        const int last = i + len == n;
        float* out = NULL;
        if (logits && all_logits) out = logits + (size_t)i * m->cfg.vocab_size;
        else if (logits && last) out = logits;
        qora_chunk(m, tokens + i, len, start_pos + i, out, all_logits);
    }
    return QORA_OK;
}

/* ------------------------------------------------ several sequences in one pass (serving) */

/* Run state of batched steps: passes of up to `rows` token rows, and `n_slots` KV caches of
   cfg.max_seq_len positions side by side, one per sequence: (n_slots, n_layers, max_seq_len, kv_dim). */
typedef struct {
    qora_config cfg; /* the model's, with max_seq_len = one slot's context */
    qora_state s;
    int rows, n_slots;
} qora_batch;

static void qora_batch_free(qora_batch* b) {
    qora_state_free(&b->s);
    b->rows = b->n_slots = 0;
}

static int qora_batch_init(qora_batch* b, const qora_config* c, int ctx, int rows, int n_slots) {
    if (!b) return QORA_ERR_ARGS;
    memset(b, 0, sizeof *b);
    if (!c || ctx < 1 || rows < 1 || n_slots < 1) return QORA_ERR_ARGS;
    b->cfg = *c;
    b->cfg.max_seq_len = ctx;
    const int rc = qora_state_alloc(&b->s, &b->cfg, (size_t)rows, (size_t)n_slots);
    if (rc != QORA_OK) return rc;
    b->rows = rows;
    b->n_slots = n_slots;
    return QORA_OK;
}

/* Bytes of one slot's cache in one layer, and in all layers. */
static inline size_t qora_batch_layer_bytes(const qora_batch* b) {
    return (size_t)b->cfg.max_seq_len * qora_kv_row_bytes(&b->cfg);
}

/* n <= b->rows rows: row t is token tokens[t] of the sequence in slot slots[t], at position pos[t].
   The same operations per row as qora_chunk (weights are read once for all rows; each row attends
   to its own slot's positions 0..pos[t], all of this pass's K/V written first, so rows of one
   sequence at consecutive positions are a prefill chunk). Logits of rows want[i] - row0
   (i < n_want) go to logits[i]. */
static void qora_batch_pass(qora_model* m, qora_batch* b, const int32_t* tokens, const int32_t* slots,
                            const int32_t* pos, int n, float* logits, const int32_t* want, int n_want, int row0) {
    const qora_config* c = &b->cfg;
    const qora_kernels* K = m->K;
    qora_state* s = &b->s;
    const int nt = m->n_threads;
    const int D = c->dim, q_dim = c->n_heads * c->head_dim, kv_dim = c->n_kv_heads * c->head_dim;
    const size_t lq = s->xq_stride, T = (size_t)c->max_seq_len, row_bytes = qora_kv_row_bytes(c);
    block_q8* xq = c->act_f32 ? NULL : s->xq; /* NULL: float activations (qora_matmul) */
    const size_t layer_bytes = qora_batch_layer_bytes(b), slot_bytes = (size_t)c->n_layers * layer_bytes;
    const int group = c->n_heads / c->n_kv_heads, pairs = n * c->n_kv_heads;
    const size_t tmp = (size_t)group * (c->head_dim + 4);
    long long work = 0; /* attention's multiply-adds, for the threads' on/off as in qora_chunk */
    for (int t = 0; t < n; t++) work += (long long)(pos[t] + 1) * c->n_heads * c->head_dim;

    for (int t = 0; t < n; t++) qora_dequant_row(&m->w.tok_embeddings, tokens[t], s->x + (size_t)t * D);

    for (int l = 0; l < c->n_layers; l++) {
        const qora_layer* L = &m->w.layers[l];
        char* key_base = (char*)s->key_cache + (size_t)l * layer_bytes;
        char* value_base = (char*)s->value_cache + (size_t)l * layer_bytes;

        qora_layer_qkv(K, c, L, s, n, nt);
        for (int t = 0; t < n; t++) {
            const size_t at = (size_t)slots[t] * slot_bytes + (size_t)pos[t] * row_bytes;
            qora_rope_store(c, L, m->w.inv_freq, K, s, t, pos[t], key_base + at, value_base + at);
        }

        /* every row's query heads, group by group, over its own slot (qora_attend_group: the same
           operations as the decode split, for any thread count) */
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (work >= QORA_PARALLEL_MIN_WORK / 4)
#endif
        for (int p = 0; p < pairs; p++) {
            const int t = p / c->n_kv_heads, g = p % c->n_kv_heads;
            const size_t at = (size_t)slots[t] * slot_bytes;
            qora_attend_group(K, s->q + (size_t)t * q_dim, key_base + at, value_base + at, c->kv_type, pos[t] + 1, g,
                              group, c->head_dim, (size_t)kv_dim, s->scores + (size_t)t * c->n_heads * T, T,
                              s->att + (size_t)t * q_dim, s->att_part + (size_t)p * tmp);
        }

        qora_layer_tail(K, c, L, s, n, nt);
    }

    if (n_want < 1) return;
    for (int i = 0; i < n_want; i++)
        K->rmsnorm(s->xb + (size_t)i * D, s->x + (size_t)(want[i] - row0) * D, m->w.norm, D, c->norm_eps);
    qora_prepare_inputs(K, m->w.output.dtype, s->xb, D, xq, s->xs, lq, n_want, D, nt);
    qora_matmul(K, &m->w.output, s->xb, D, xq, s->xs, lq, n_want, logits, (size_t)c->vocab_size, nt);
}

/* A batched step over n rows (any number: passes of b->rows). logits: (n_want, vocab) for the rows
   want[] (strictly increasing), or NULL when n_want is 0. A sequence's rows must come in position
   order; every argument is checked again here. */
static int qora_forward_batch(qora_model* m, qora_batch* b, const int32_t* tokens, const int32_t* slots,
                              const int32_t* pos, int n, float* logits, const int32_t* want, int n_want) {
    if (!m || !m->w.layers || !m->K || m->n_threads < 1 || !b || !b->s.x || !tokens || !slots || !pos || n < 1 ||
        n_want < 0 || n_want > n || (n_want && (!logits || !want)))
        return QORA_ERR_ARGS;
    if (b->cfg.dim != m->cfg.dim || b->cfg.n_layers != m->cfg.n_layers || b->cfg.vocab_size != m->cfg.vocab_size)
        return QORA_ERR_ARGS;
    for (int i = 0; i < n; i++) {
        if (tokens[i] < 0 || tokens[i] >= m->cfg.vocab_size) return QORA_ERR_TOKEN;
        if (slots[i] < 0 || slots[i] >= b->n_slots) return QORA_ERR_ARGS;
        if (pos[i] < 0 || pos[i] >= b->cfg.max_seq_len) return QORA_ERR_CONTEXT;
    }
    for (int i = 0; i < n_want; i++)
        if (want[i] < 0 || want[i] >= n || (i && want[i] <= want[i - 1])) return QORA_ERR_ARGS;
    int w0 = 0;
    for (int i = 0; i < n; i += b->rows) {
        const int len = n - i < b->rows ? n - i : b->rows;
        int w1 = w0;
        while (w1 < n_want && want[w1] < i + len) w1++;
        qora_batch_pass(m, b, tokens + i, slots + i, pos + i, len, logits ? logits + (size_t)w0 * m->cfg.vocab_size : NULL,
                        want + w0, w1 - w0, i);
        w0 = w1;
    }
    return QORA_OK;
}

/* Copies positions 0..n-1 of slot src's cache to slot dst (a cached prefix for a new sequence). */
static int qora_batch_copy(qora_batch* b, int src, int dst, int n) {
    if (!b || !b->s.key_cache || src < 0 || dst < 0 || src >= b->n_slots || dst >= b->n_slots || n < 0 ||
        n > b->cfg.max_seq_len)
        return QORA_ERR_ARGS;
    if (src == dst || n == 0) return QORA_OK;
    const size_t layer_bytes = qora_batch_layer_bytes(b), slot_bytes = (size_t)b->cfg.n_layers * layer_bytes;
    const size_t row_bytes = layer_bytes / (size_t)b->cfg.max_seq_len;
    for (int l = 0; l < b->cfg.n_layers; l++) {
        const size_t s0 = (size_t)src * slot_bytes + (size_t)l * layer_bytes, d0 = (size_t)dst * slot_bytes + (size_t)l * layer_bytes;
        memcpy((char*)b->s.key_cache + d0, (char*)b->s.key_cache + s0, (size_t)n * row_bytes);
        memcpy((char*)b->s.value_cache + d0, (char*)b->s.value_cache + s0, (size_t)n * row_bytes);
    }
    return QORA_OK;
}

#endif /* QORA_FORWARD_H */
