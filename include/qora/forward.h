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
typedef struct {
    float* x;        /* (dim,) residual stream */
    float* xb;       /* (dim,) normed input of a sublayer */
    float* xb2;      /* (dim,) sublayer output */
    float* q;        /* (n_heads*head_dim,) */
    float* k;        /* (n_kv_heads*head_dim,) */
    float* v;        /* (n_kv_heads*head_dim,) */
    float* att;      /* (n_heads*head_dim,) attention output */
    float* hb;       /* (hidden_dim,) silu(gate) * up */
    block_q8* xq;    /* (max(dim, n_heads*head_dim, hidden_dim)/32,) activation as Q8 */
    float* scores;   /* (n_heads, max_seq_len) attention weights */
    float* key_cache;   /* (n_layers, max_seq_len, n_kv_heads*head_dim) */
    float* value_cache; /* (n_layers, max_seq_len, n_kv_heads*head_dim) */
} qora_state;

typedef struct {
    qora_config cfg;
    qora_weights w;
    qora_state s;
    const qora_kernels* K;
    int n_threads;
} qora_model;

enum { QORA_OK = 0, QORA_ERR_ARGS = -1, QORA_ERR_TOKEN = -2, QORA_ERR_CONTEXT = -3, QORA_ERR_NOMEM = -4 };

static void qora_state_free(qora_state* s) {
    free(s->x); free(s->xb); free(s->xb2); free(s->q); free(s->k); free(s->v); free(s->att); free(s->hb);
    free(s->xq); free(s->scores); free(s->key_cache); free(s->value_cache);
    memset(s, 0, sizeof *s);
}

/* All buffers are allocated once here: a step allocates nothing. */
static int qora_state_init(qora_state* s, const qora_config* c) {
    memset(s, 0, sizeof *s);
    const size_t q_dim = (size_t)c->n_heads * c->head_dim, kv_dim = (size_t)c->n_kv_heads * c->head_dim;
    size_t widest = (size_t)c->dim;
    if (q_dim > widest) widest = q_dim;
    if ((size_t)c->hidden_dim > widest) widest = (size_t)c->hidden_dim;
    const size_t cache = (size_t)c->n_layers * (size_t)c->max_seq_len * kv_dim;
    s->x = calloc(c->dim, sizeof(float));
    s->xb = calloc(c->dim, sizeof(float));
    s->xb2 = calloc(c->dim, sizeof(float));
    s->q = calloc(q_dim, sizeof(float));
    s->k = calloc(kv_dim, sizeof(float));
    s->v = calloc(kv_dim, sizeof(float));
    s->att = calloc(q_dim, sizeof(float));
    s->hb = calloc(c->hidden_dim, sizeof(float));
    s->xq = calloc(widest / QK + 1, sizeof(block_q8));
    s->scores = calloc((size_t)c->n_heads * c->max_seq_len, sizeof(float));
    s->key_cache = calloc(cache, sizeof(float)); /* pages are touched only as the context fills */
    s->value_cache = calloc(cache, sizeof(float));
    if (!s->x || !s->xb || !s->xb2 || !s->q || !s->k || !s->v || !s->att || !s->hb || !s->xq || !s->scores ||
        !s->key_cache || !s->value_cache) {
        qora_state_free(s);
        return QORA_ERR_NOMEM;
    }
    return QORA_OK;
}

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

/* Causal GQA attention for one query position over n_pos cached positions.
   The query heads sharing a KV head are handled together so each K/V row is
   read once. kc/vc: (n_pos, kv_stride) rows; scores: (n_heads, score_stride). */
static void qora_attention(const qora_kernels* K, const float* q, const float* kc, const float* vc, int n_pos,
                           int n_heads, int n_kv_heads, int head_dim, size_t kv_stride, float* scores,
                           size_t score_stride, float* out, int n_threads) {
    const int group = n_heads / n_kv_heads;
    const float scale = 1.0f / sqrtf((float)head_dim);
#ifdef _OPENMP
#pragma omp parallel for num_threads(n_threads) schedule(static) \
    if ((long long)n_pos * n_heads * head_dim >= QORA_PARALLEL_MIN_WORK / 4)
#endif
    for (int g = 0; g < n_kv_heads; g++) {
        /* scores = q . k * head_dim^-0.5 */
        for (int t = 0; t < n_pos; t++) {
            const float* kt = kc + (size_t)t * kv_stride + (size_t)g * head_dim;
            for (int h = g * group; h < (g + 1) * group; h++)
                scores[h * score_stride + t] = K->dot_f32(head_dim, q + (size_t)h * head_dim, kt) * scale;
        }
        /* softmax over positions */
        for (int h = g * group; h < (g + 1) * group; h++) {
            float* sc = scores + h * score_stride;
            float mx = sc[0];
            for (int t = 1; t < n_pos; t++) mx = sc[t] > mx ? sc[t] : mx;
            float sum = 0.0f;
            for (int t = 0; t < n_pos; t++) { sc[t] = expf(sc[t] - mx); sum += sc[t]; }
            const float inv = 1.0f / sum;
            for (int t = 0; t < n_pos; t++) sc[t] *= inv;
            memset(out + (size_t)h * head_dim, 0, (size_t)head_dim * sizeof(float));
        }
        /* out = weights . v */
        for (int t = 0; t < n_pos; t++) {
            const float* vt = vc + (size_t)t * kv_stride + (size_t)g * head_dim;
            for (int h = g * group; h < (g + 1) * group; h++)
                K->axpy(head_dim, scores[h * score_stride + t], vt, out + (size_t)h * head_dim);
        }
    }
    (void)n_threads;
}

/* ------------------------------------------------------------ forward pass */

/* One token at position pos through every layer; logits (vocab,) if non-NULL. */
static void qora_step(qora_model* m, int token, int pos, float* logits) {
    const qora_config* c = &m->cfg;
    const qora_kernels* K = m->K;
    qora_state* s = &m->s;
    const int nt = m->n_threads;
    const int kv_dim = c->n_kv_heads * c->head_dim;

    /* token embedding */
    qora_dequant_row(&m->w.tok_embeddings, token, s->x);

    for (int l = 0; l < c->n_layers; l++) {
        const qora_layer* L = &m->w.layers[l];
        float* k_cache = s->key_cache + ((size_t)l * c->max_seq_len + pos) * kv_dim;
        float* v_cache = s->value_cache + ((size_t)l * c->max_seq_len + pos) * kv_dim;

        /* attention norm */
        K->rmsnorm(s->xb, s->x, L->attn_norm, c->dim, c->norm_eps);

        /* q, k, v projections (activation quantized once for the three) */
        if (qora_is_quantized(L->wq.dtype) || qora_is_quantized(L->wk.dtype) || qora_is_quantized(L->wv.dtype))
            K->quantize_q8(s->xb, s->xq, c->dim);
        qora_matvec(K, &L->wq, s->xb, s->xq, s->q, nt);
        qora_matvec(K, &L->wk, s->xb, s->xq, s->k, nt);
        qora_matvec(K, &L->wv, s->xb, s->xq, s->v, nt);

        /* RoPE on q and k, except on NoPE layers */
        if (L->use_rope) {
            qora_rope(s->q, c->n_heads, c->head_dim, pos, m->w.inv_freq, c->rope_scale);
            qora_rope(s->k, c->n_kv_heads, c->head_dim, pos, m->w.inv_freq, c->rope_scale);
        }

        /* append k, v to the cache */
        memcpy(k_cache, s->k, (size_t)kv_dim * sizeof(float));
        memcpy(v_cache, s->v, (size_t)kv_dim * sizeof(float));

        /* grouped-query attention over positions 0..pos */
        qora_attention(K, s->q, s->key_cache + (size_t)l * c->max_seq_len * kv_dim,
                       s->value_cache + (size_t)l * c->max_seq_len * kv_dim, pos + 1, c->n_heads, c->n_kv_heads,
                       c->head_dim, (size_t)kv_dim, s->scores, (size_t)c->max_seq_len, s->att, nt);

        /* output projection and residual */
        qora_prepare_input(K, L->wo.dtype, s->att, s->xq, c->n_heads * c->head_dim);
        qora_matvec(K, &L->wo, s->att, s->xq, s->xb2, nt);
        for (int i = 0; i < c->dim; i++) s->x[i] += s->xb2[i];

        /* ffn norm */
        K->rmsnorm(s->xb, s->x, L->ffn_norm, c->dim, c->norm_eps);

        /* fused gate+up: hb = silu(gate . x) * (up . x) */
        if (qora_is_quantized(L->w_gate.dtype) || qora_is_quantized(L->w_up.dtype))
            K->quantize_q8(s->xb, s->xq, c->dim);
        qora_swiglu(K, &L->w_gate, &L->w_up, s->xb, s->xq, s->hb, nt);

        /* down projection and residual */
        qora_prepare_input(K, L->w_down.dtype, s->hb, s->xq, c->hidden_dim);
        qora_matvec(K, &L->w_down, s->hb, s->xq, s->xb2, nt);
        for (int i = 0; i < c->dim; i++) s->x[i] += s->xb2[i];
    }

    if (!logits) return; /* prefill tokens whose logits nobody reads skip the LM head */

    /* final norm and LM head */
    K->rmsnorm(s->xb, s->x, m->w.norm, c->dim, c->norm_eps);
    qora_prepare_input(K, m->w.output.dtype, s->xb, s->xq, c->dim);
    qora_matvec(K, &m->w.output, s->xb, s->xq, logits, nt);
}

/* n tokens at positions start_pos.. ; logits: (n, vocab) if all_logits else (vocab,).
   Every argument that came from Python is checked again here. */
static int qora_forward(qora_model* m, const int32_t* tokens, int n, int start_pos, float* logits, int all_logits) {
    if (!m || !m->w.layers || !m->s.x || !tokens || !logits || n < 1 || start_pos < 0) return QORA_ERR_ARGS;
    if ((long long)start_pos + n > m->cfg.max_seq_len) return QORA_ERR_CONTEXT;
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= m->cfg.vocab_size) return QORA_ERR_TOKEN;
    for (int i = 0; i < n; i++) {
        float* out = all_logits ? logits + (size_t)i * m->cfg.vocab_size : (i == n - 1 ? logits : NULL);
        qora_step(m, tokens[i], start_pos + i, out);
    }
    return QORA_OK;
}

#endif /* QORA_FORWARD_H */
