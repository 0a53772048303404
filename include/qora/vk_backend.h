/* qora — the Vulkan backend's C API (implementation: qora/_core/qora_vk.c).

   The Vulkan loader is opened at run time (dlopen / LoadLibrary): nothing links against it, so
   the extension imports on a machine without any Vulkan stack and every call then reports
   QVK_ERR_LOADER. Policy (which device, when to fall back to the CPU) lives in qora/vulkan.py;
   this layer reports facts and error codes, with a one-line message in `err`.

   Lifetimes: a context (instance + device + pipelines) outlives the models made on it. A model
   holds the weights in device-local memory, the KV cache, scratch buffers and two command
   buffers: the decode step (one token, recorded once) and the prefill step (re-recorded per
   call; its shape depends on the token count). */
#ifndef QORA_VK_BACKEND_H
#define QORA_VK_BACKEND_H

#include <stddef.h>
#include <stdint.h>
#include "forward.h" /* qora_config, qora_weights, qora_tensor */

enum {
    QVK_OK = 0,
    QVK_ERR_LOADER = -10,      /* no Vulkan loader library */
    QVK_ERR_NO_DEVICE = -11,   /* no driver / no physical device / index out of range */
    QVK_ERR_FEATURE = -12,     /* the device lacks something qora needs */
    QVK_ERR_OOM = -13,         /* device (or host-visible) memory exhausted */
    QVK_ERR_DEVICE_LOST = -14, /* the device stopped answering; the model cannot be used again */
    QVK_ERR_VK = -15,          /* any other Vulkan failure */
    QVK_ERR_ARGS = -16,        /* bad arguments (checked again here whatever the caller did) */
    QVK_ERR_UNSUPPORTED = -17, /* a model shape or type this backend does not run */
};

typedef struct {
    char name[256];
    int type;                 /* VkPhysicalDeviceType: 0 other, 1 integrated, 2 discrete, 3 virtual, 4 cpu */
    uint32_t vendor_id, device_id, api_version, driver_version;
    uint64_t vram_bytes;      /* the largest device-local heap */
    uint64_t vram_budget;     /* what the driver says we may use now (VK_EXT_memory_budget), else vram_bytes */
    uint32_t subgroup_size;
    uint32_t max_storage_buffer_range;
    uint64_t max_allocation;
    uint32_t max_shared_memory;
    int int_dot;              /* packed 4x8-bit integer dot products in shaders (enabled when offered) */
    int int_dot_fast;         /* ... and the driver says they are accelerated */
    int coopmat;              /* KHR cooperative matrices f16 16x16x16 -> f32: the tensor-core prefill can run */
    int subgroup_shuffle;     /* subgroup shuffles in compute shaders (the second decode attention kernel) */
    int usable;               /* 1 if qora can run on it, else why_not says why */
    char why_not[160];
} qvk_device_info;

/* ------------------------------------------------------------ devices, context */
int qvk_list_devices(const char* loader, qvk_device_info* out, int cap, int* n, char* err, size_t errlen);

typedef struct qvk_ctx qvk_ctx;
int qvk_ctx_create(const char* loader, int device_index, qvk_ctx** out, char* err, size_t errlen);
void qvk_ctx_destroy(qvk_ctx* c);
const qvk_device_info* qvk_ctx_info(const qvk_ctx* c);
/* test hook: every device-local allocation fails as if the device were out of memory */
void qvk_ctx_set_fail_alloc(qvk_ctx* c, int fail);

/* ------------------------------------------------------------ single kernels (tests, benchmarks)
   Runs shader `name` once: bufs[i] (i < QVK_MAX_BINDINGS) is copied to a buffer bound at binding i (data NULL:
   a dummy buffer is bound) and copied back afterwards. spec[i] is specialization constant i. */
#define QVK_MAX_BINDINGS 12
typedef struct {
    void* data;
    size_t bytes;
} qvk_hostbuf;
int qvk_run_kernel(qvk_ctx* c, const char* name, const uint32_t* spec, int n_spec, const qvk_hostbuf* bufs,
                   const void* push, size_t push_bytes, uint32_t gx, uint32_t gy, uint32_t gz, char* err,
                   size_t errlen);

/* Device layout of a weight matrix (see shaders/common.glsl): bytes, and packing from the
   file's row-major blocks. */
size_t qvk_packed_bytes(int dtype, int rows, int cols);
int qvk_pack(int dtype, int rows, int cols, const void* src, void* dst);

/* ------------------------------------------------------------ the model */
typedef struct {
    int max_seq_len; /* KV cache positions */
    int batch;       /* prefill tokens per submission (0: default) */
    int logit_rows;  /* rows of logits one submission can return (0: default) */
    int mv_threads;  /* decode mat-vec workgroup size (0: default) */
    int mv_rows;     /* decode mat-vec rows per workgroup, all products (0: per-product defaults) */
    int kv_type;     /* KV cache: QORA_F32, QORA_F16 or QORA_Q8 (qora_dtype values), as the CPU engine's */
    int att_splits;  /* decode attention: chunks of the context per head group at most (0: default) */
    int att_short;   /* decode attention: fewest positions per chunk, so one pass up to this many (< 0: default) */
    int att_kernel;  /* decode attention: 1 attn_decode.comp, 2 attn_decode2.comp where the device can (0: default) */
    int att_threads; /* attn_decode2: threads per workgroup, a power of two 32..256 (0: default) */
    int gu_rows;     /* decode gate|up rows per workgroup (0: default) */
    int int_dot;     /* decode Q4/Q8 dots: 1 packed integer dot product (if the device has it), 0 emulated,
                        -1 the former where the driver says it is accelerated */
    int profile;     /* time every dispatch with GPU timestamps (qvk_model_profile; prefill labels "pp:...") */
    int f32_act;     /* Q4/Q8 products with float activations (the "f32" precision; else Q8 ones, integer sums) */
    int coopmat;     /* prefill products on cooperative matrices, where the device has them: 1 for the products big
                        enough to pay (default), 2 all, 0 none */
    int coop_min_tiles; /* "big enough": at least this many 128 x 128 output tiles (0: QVK_COOP_MIN_TILES) */
    int chunk_rows;  /* tests: cap the rows per chunk of the embedding / LM head (0: what fits) */
    int fail_after;  /* test hook: forward calls that succeed before a simulated device loss; < 0 never */
} qvk_model_opts;

typedef struct qvk_model qvk_model;

/* Device memory the model would take, without allocating; also rejects unsupported models. */
int qvk_model_estimate(const qvk_ctx* c, const qora_config* cfg, const qora_weights* w, const qvk_model_opts* o,
                       uint64_t* bytes, char* err, size_t errlen);
int qvk_model_create(qvk_ctx* c, const qora_config* cfg, const qora_weights* w, const qvk_model_opts* o,
                     qvk_model** out, char* err, size_t errlen);
/* n tokens at positions start_pos..: logits (n, vocab) if all_logits else (1, vocab) for the
   last. n <= batch, and n <= logit_rows when all_logits. */
int qvk_model_forward(qvk_model* m, const int32_t* tokens, int n, int start_pos, float* logits, int all_logits,
                      char* err, size_t errlen);
/* Sampling where the logits are: one decode step (token at start_pos) whose logits stay on the
   device; out (QVK_SAMPLE_OUT_WORDS) receives sample_topk.comp's result: [count, flags (1: more than
   QVK_SAMPLE_CAP logits tie at the threshold, 2: a NaN), threshold key, total], QVK_SAMPLE_CAP
   (value bits, id) pairs of which `count` are set: every logit >= the threshold, at least `need` of
   them; then the logits of the n_gather ids. qvk_model_read_logits copies the last step's whole row
   back (logits of a sampling step, when the host needs all of them after all). */
#define QVK_SAMPLE_CAP 1024
#define QVK_SAMPLE_MAX_GATHER 512
#define QVK_SAMPLE_OUT_WORDS (4 + 2 * QVK_SAMPLE_CAP + QVK_SAMPLE_MAX_GATHER)
int qvk_model_forward_topk(qvk_model* m, int32_t token, int start_pos, int need, const int32_t* gather, int n_gather,
                           uint32_t* out, char* err, size_t errlen);
int qvk_model_read_logits(qvk_model* m, float* logits, char* err, size_t errlen);
int qvk_model_batch(const qvk_model* m);
int qvk_model_logit_rows(const qvk_model* m);
/* Decode profile (opts.profile): up to cap entries of (kernel name, total GPU ns, calls) summed over
   the decode steps so far, plus the GPU time of whole steps (first to last timestamp) in *step_ns
   and their count in *steps. Returns the number of entries (0 when not profiling). */
typedef struct {
    char name[24];
    double ns;
    long calls;
} qvk_profile_entry;
int qvk_model_profile(const qvk_model* m, qvk_profile_entry* out, int cap, double* step_ns, long* steps);
/* GPU time of all profiled prefill submissions and their count */
void qvk_model_prefill_profile(const qvk_model* m, double* ns, long* runs);
void qvk_model_destroy(qvk_model* m);

/* Batched steps over several sequences (the server's continuous batching). open_batch allocates
   n_slots KV caches of ctx positions (apart from the cache the steps above use; opening again
   replaces them) and passes of up to `ents` entries; batch_bytes is what that takes, without
   allocating. forward_batch runs n_rows token rows (at most qvk_model_batch) in one submission:
   ents holds n_ent (slot, start, count) triples whose counts add up to n_rows, the tokens in the
   same order; each row is stored at its own slot and position and attends over its slot's first
   start + its index + 1 positions; logits (n_ent, vocab) receives each entry's last row.
   copy_slot copies positions 0..n_pos-1 of slot src's cache to slot dst. */
int qvk_model_batch_bytes(const qvk_model* m, int n_slots, int ctx, int ents, uint64_t* bytes, char* err, size_t n);
int qvk_model_open_batch(qvk_model* m, int n_slots, int ctx, int ents, char* err, size_t n);
int qvk_model_slots(const qvk_model* m);
int qvk_model_forward_batch(qvk_model* m, const int32_t* tokens, int n_rows, const int32_t* ents, int n_ent,
                            float* logits, char* err, size_t n);
int qvk_model_copy_slot(qvk_model* m, int src, int dst, int n_pos, char* err, size_t n);
/* A step of up to `rows` decode rows (one token per entry) runs each row as the single-sequence decode
   step over its slot (where the device can bind a slot's rows on their own); 0: the batched path for
   every step (tests, A/B). */
void qvk_model_set_slot_decode(qvk_model* m, int rows);

#endif /* QORA_VK_BACKEND_H */
