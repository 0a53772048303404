/* qora — the C side of tests/test_arm.py: runs the engine's kernels and forward pass, as compiled for
   aarch64 (cross-compiled, run under qemu-aarch64), on inputs the test wrote, and writes the outputs back
   for the test to compare with NumPy references and with the x86 build bit for bit.

   harness --features           the ISA paths this CPU (qemu's -cpu) supports, one name per line
   harness --tables             QORA_ISA_COUNT, then "slot name isa" of each compiled kernel table
   harness ISA DIR CASES        runs each line of DIR/CASES on the path named ISA:
     matmul NAME DTYPE ROWS COLS NT REPACK ACTF32 THREADS   NAME.w (raw rows), NAME.x (NT x COLS f32) -> NAME.ISA.out
     swiglu NAME DTYPE ROWS COLS NT REPACK ACTF32 THREADS   NAME.wg, NAME.wu, NAME.x -> NAME.ISA.out (NT x ROWS)
     quantize NAME N                                        NAME.x -> NAME.ISA.out (Q8_0 blocks)
     rmsnorm NAME N EPS                                     NAME.x, NAME.w -> NAME.ISA.out
     softmax NAME N                                         NAME.x -> NAME.ISA.out (N values, max, sum)
     tof16 NAME N                                           NAME.x -> NAME.ISA.out (f16)
     attention NAME NH NKV HD NPOS NQ THREADS KV           NAME.q, NAME.k, NAME.v (KV: f16 or q8) -> NAME.ISA.out
     model NAME THREADS                                     NAME.cfg, NAME.tensors, NAME.tokens -> NAME.ISA.out
   Any failure exits non-zero with a message on stderr. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "qora/qora.h"

static const char* dir;
static const char* isa_name;

static void die(const char* what, const char* name) {
    fprintf(stderr, "harness: %s %s\n", what, name);
    exit(2);
}

static void* slurp(const char* name, const char* ext, size_t want) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s.%s", dir, name, ext);
    FILE* f = fopen(path, "rb");
    if (!f) die("cannot open", path);
    void* buf = malloc(want ? want : 1);
    if (!buf || fread(buf, 1, want, f) != want) die("short file", path);
    fclose(f);
    return buf;
}

static void spill(const char* name, const void* data, size_t bytes) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s.%s.out", dir, name, isa_name);
    FILE* f = fopen(path, "wb");
    if (!f || fwrite(data, 1, bytes, f) != bytes || fclose(f) != 0) die("cannot write", path);
}

static int dtype_id(const char* s) {
    static const char* names[] = {"f32", "f16", "q8", "q4", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k", "bf16"};
    for (int i = 0; i < QORA_DTYPE_COUNT; i++)
        if (!strcmp(s, names[i])) return i;
    die("unknown dtype", s);
    return -1;
}

static qora_tensor tensor(int dtype, int rows, int cols, const void* data, int repack) {
    qora_tensor t = {dtype, rows, cols, qora_row_bytes(dtype, cols), data, NULL};
    if (repack && dtype == QORA_Q4 && rows >= 8) { /* as _cpu.pyx's _repack */
        block_q4x8* p = qora_alloc_weights((size_t)(rows / 8) * (cols / QK) * sizeof(block_q4x8));
        if (!p) die("out of memory", "repack");
        qora_repack_q4x8(data, t.row_bytes, rows, cols, p, 1);
        t.packed = p;
    }
    return t;
}

/* matmul / swiglu as _cpu.pyx's Matrix.matmul and swiglu_prepared run them */
static void run_product(const qora_kernels* K, int swiglu, const char* name, int dtype, int rows, int cols, int nt,
                        int repack, int act_f32, int threads) {
    const size_t wbytes = (size_t)rows * qora_row_bytes(dtype, cols);
    void* wg = slurp(name, swiglu ? "wg" : "w", wbytes);
    void* wu = swiglu ? slurp(name, "wu", wbytes) : NULL;
    float* x = slurp(name, "x", (size_t)nt * cols * sizeof(float));
    const size_t lq = qora_xq_stride(cols);
    block_q8* xq = act_f32 ? NULL : calloc((size_t)nt * lq, sizeof(block_q8));
    qora_xblock* xs = calloc((size_t)nt * lq, sizeof(qora_xblock));
    float* y = calloc((size_t)nt * rows, sizeof(float));
    qora_tensor g = tensor(dtype, rows, cols, wg, repack), u = tensor(dtype, rows, cols, wu ? wu : wg, repack);
    qora_prepare_inputs(K, dtype, x, cols, xq, xs, lq, nt, cols, threads);
    if (swiglu) qora_swiglu(K, &g, &u, x, cols, xq, xs, lq, nt, y, rows, threads);
    else qora_matmul(K, &g, x, cols, xq, xs, lq, nt, y, rows, threads);
    spill(name, y, (size_t)nt * rows * sizeof(float));
    qora_free_weights((void*)g.packed);
    qora_free_weights((void*)u.packed);
    free(wg); free(wu); free(x); free(xq); free(xs); free(y);
}

static void run_attention(const qora_kernels* K, const char* name, int nh, int nkv, int hd, int n_pos, int nq,
                          int threads, int kv_type) {
    const size_t width = (size_t)nkv * hd, row = qora_row_bytes(kv_type, (int)width);
    float* q = slurp(name, "q", (size_t)nq * nh * hd * sizeof(float));
    void* kc = slurp(name, "k", (size_t)n_pos * row);
    void* vc = slurp(name, "v", (size_t)n_pos * row);
    float* scores = calloc((size_t)nq * nh * n_pos, sizeof(float));
    float* out = calloc((size_t)nq * nh * hd, sizeof(float));
    qora_attention(K, q, kc, vc, kv_type, n_pos, nq, nh, nkv, hd, width, scores, n_pos, out, threads);
    spill(name, out, (size_t)nq * nh * hd * sizeof(float));
    free(q); free(kc); free(vc); free(scores); free(out);
}

/* A whole model as _cpu.pyx's CpuModel builds it: NAME.cfg holds the config numbers, then one line per
   layer's use_rope; NAME.tensors one line per tensor (qora name, dtype, rows, cols: each NAME.<qora
   name> file its stored bytes); the logits of a prefill of the first PREFILL tokens (every position)
   and then of each later token decoded one at a time go to NAME.ISA.out. */
static const float* vec(const char* name, const char* t, int n) { return slurp(name, t, (size_t)n * sizeof(float)); }

static qora_tensor mat(const char* name, const char* t, int rows, int cols, int repack, FILE* index) {
    char tn[256], dt[16];
    int r, c;
    rewind(index);
    while (fscanf(index, "%255s %15s %d %d", tn, dt, &r, &c) == 4)
        if (!strcmp(tn, t)) {
            if (r != rows || c != cols) die("shape mismatch", t);
            const int d = dtype_id(dt);
            return tensor(d, rows, cols, slurp(name, t, (size_t)rows * qora_row_bytes(d, cols)), repack);
        }
    die("missing tensor", t);
    return tensor(0, 0, 0, NULL, 0);
}

static void run_model(const qora_kernels* K, const char* name, int threads) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s.cfg", dir, name);
    FILE* cf = fopen(path, "r");
    snprintf(path, sizeof path, "%s/%s.tensors", dir, name);
    FILE* index = fopen(path, "r");
    if (!cf || !index) die("cannot open model files of", name);
    qora_model m;
    memset(&m, 0, sizeof m);
    qora_config* c = &m.cfg;
    int repack, n_tokens, prefill, tied;
    if (fscanf(cf, "%d %d %d %d %d %d %d %d %f %f %d %d %d %d %d %d", &c->n_layers, &c->dim, &c->n_heads,
               &c->n_kv_heads, &c->head_dim, &c->hidden_dim, &c->vocab_size, &c->max_seq_len, &c->norm_eps,
               &c->rope_scale, &c->kv_type, &c->act_f32, &repack, &n_tokens, &prefill, &tied) != 16)
        die("bad config", name);
    const int D = c->dim, H = c->hidden_dim, V = c->vocab_size, qd = c->n_heads * c->head_dim,
              kvd = c->n_kv_heads * c->head_dim;
    qora_layer* layers = calloc(c->n_layers, sizeof(qora_layer));
    m.w.layers = layers;
    m.w.tok_embeddings = mat(name, "tok_embeddings", V, D, 0, index);
    m.w.output = mat(name, tied ? "tok_embeddings" : "output", V, D, repack && !c->act_f32, index);
    m.w.norm = vec(name, "norm", D);
    m.w.inv_freq = vec(name, "inv_freq", c->head_dim / 2);
    const int pack = repack && !c->act_f32; /* as CpuModel: float activations never read the interleaved copy */
    for (int i = 0; i < c->n_layers; i++) {
        char t[64];
        qora_layer* L = &layers[i];
        if (fscanf(cf, "%d", &L->use_rope) != 1) die("bad rope_layers in", name);
#define QORA_T(field) (snprintf(t, sizeof t, "layers.%d." field, i), t)
        L->attn_norm = vec(name, QORA_T("attn_norm"), D);
        L->ffn_norm = vec(name, QORA_T("ffn_norm"), D);
        L->wq = mat(name, QORA_T("wq"), qd, D, pack, index);
        L->wk = mat(name, QORA_T("wk"), kvd, D, pack, index);
        L->wv = mat(name, QORA_T("wv"), kvd, D, pack, index);
        L->wo = mat(name, QORA_T("wo"), D, qd, pack, index);
        L->w_gate = mat(name, QORA_T("w_gate"), H, D, pack, index);
        L->w_up = mat(name, QORA_T("w_up"), H, D, pack, index);
        L->w_down = mat(name, QORA_T("w_down"), D, H, pack, index);
#undef QORA_T
    }
    fclose(cf);
    fclose(index);
    int32_t* tokens = slurp(name, "tokens", (size_t)n_tokens * sizeof(int32_t));
    m.K = K;
    m.n_threads = threads;
    if (qora_state_init(&m.s, c) != QORA_OK) die("cannot allocate the state of", name);
    float* logits = calloc((size_t)n_tokens * V, sizeof(float));
    if (qora_forward(&m, tokens, prefill, 0, logits, 1) != QORA_OK) die("prefill failed in", name);
    for (int p = prefill; p < n_tokens; p++)
        if (qora_forward(&m, tokens + p, 1, p, logits + (size_t)p * V, 0) != QORA_OK) die("decode failed in", name);
    spill(name, logits, (size_t)n_tokens * V * sizeof(float));
    qora_state_free(&m.s); /* the weights are left to the process's end */
    free(logits);
    free(tokens);
}

static void run_case(const qora_kernels* K, char* line) {
    char op[32], name[256], dt[16];
    int a, b, c, d, e, f, g;
    float x;
    if (sscanf(line, "%31s %255s", op, name) != 2) return;
    if (!strcmp(op, "matmul") || !strcmp(op, "swiglu")) {
        if (sscanf(line, "%*s %*s %15s %d %d %d %d %d %d", dt, &a, &b, &c, &d, &e, &f) != 7) die("bad case", line);
        run_product(K, op[0] == 's', name, dtype_id(dt), a, b, c, d, e, f);
    } else if (!strcmp(op, "quantize")) {
        if (sscanf(line, "%*s %*s %d", &a) != 1) die("bad case", line);
        float* v = slurp(name, "x", (size_t)a * sizeof(float));
        block_q8* q = calloc(a / QK, sizeof(block_q8));
        K->quantize_q8(v, q, a);
        spill(name, q, (size_t)(a / QK) * sizeof(block_q8));
        free(v); free(q);
    } else if (!strcmp(op, "rmsnorm")) {
        if (sscanf(line, "%*s %*s %d %f", &a, &x) != 2) die("bad case", line);
        float *v = slurp(name, "x", (size_t)a * 4), *w = slurp(name, "w", (size_t)a * 4), *o = calloc(a, 4);
        K->rmsnorm(o, v, w, a, x);
        spill(name, o, (size_t)a * 4);
        free(v); free(w); free(o);
    } else if (!strcmp(op, "softmax")) {
        if (sscanf(line, "%*s %*s %d", &a) != 1) die("bad case", line);
        float* v = realloc(slurp(name, "x", (size_t)a * 4), (size_t)(a + 2) * 4);
        v[a + 1] = K->softmax_unnorm(v, a, &v[a]);
        spill(name, v, (size_t)(a + 2) * 4);
        free(v);
    } else if (!strcmp(op, "tof16")) {
        if (sscanf(line, "%*s %*s %d", &a) != 1) die("bad case", line);
        float* v = slurp(name, "x", (size_t)a * 4);
        uint16_t* h = calloc(a, 2);
        K->to_f16(v, h, a);
        spill(name, h, (size_t)a * 2);
        free(v); free(h);
    } else if (!strcmp(op, "attention")) {
        if (sscanf(line, "%*s %*s %d %d %d %d %d %d %15s", &a, &b, &c, &d, &e, &f, dt) != 7) die("bad case", line);
        run_attention(K, name, a, b, c, d, e, f, dtype_id(dt));
    } else if (!strcmp(op, "model")) {
        if (sscanf(line, "%*s %*s %d", &g) != 1) die("bad case", line);
        run_model(K, name, g);
    } else {
        die("unknown op", op);
    }
}

int main(int argc, char** argv) {
    const qora_cpu_features f = qora_detect_cpu();
    if (argc == 2 && !strcmp(argv[1], "--tables")) { /* the enum's size, then each compiled table's slot */
        printf("%d\n", QORA_ISA_COUNT);
        for (int i = 0; i < QORA_ISA_COUNT; i++)
            if (qora_kernel_table(i)) printf("%d %s %d\n", i, qora_kernel_table(i)->name, qora_kernel_table(i)->isa);
        return 0;
    }
    if (argc == 2 && !strcmp(argv[1], "--features")) {
        for (int i = 0; i < QORA_ISA_COUNT; i++)
            if (qora_cpu_supports(&f, i) && qora_kernel_table(i)) printf("%s\n", qora_kernel_table(i)->name);
        return 0;
    }
    if (argc != 4) die("usage:", "harness --features | harness ISA DIR CASES");
    isa_name = argv[1];
    dir = argv[2];
    const qora_kernels* K = NULL;
    for (int i = 0; i < QORA_ISA_COUNT; i++)
        if (qora_kernel_table(i) && !strcmp(qora_kernel_table(i)->name, isa_name)) {
            if (!qora_cpu_supports(&f, i)) die("this CPU cannot run", isa_name);
            K = qora_kernel_table(i);
        }
    if (!K) die("no kernel table named", isa_name);
    char path[4096], line[1024];
    snprintf(path, sizeof path, "%s/%s", dir, argv[3]);
    FILE* cases = fopen(path, "r");
    if (!cases) die("cannot open", path);
    while (fgets(line, sizeof line, cases)) run_case(K, line);
    fclose(cases);
    return 0;
}
