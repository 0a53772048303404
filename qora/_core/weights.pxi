# Shared by _cpu.pyx and _vulkan.pyx (included as text, right after their imports): the model
# structs of include/qora/forward.h declared once, and the config and weight pointers over the
# caller's arrays, every size checked before a pointer goes to C. The caller keeps `refs` alive as
# long as C reads the pointers.

cdef extern from "qora/forward.h" nogil:
    int QORA_F32, QORA_F16, QORA_Q8, QORA_Q4, QORA_Q4_1, QORA_Q5_0, QORA_Q5_1, QORA_Q4_K, QORA_Q5_K, QORA_Q6_K
    int QORA_BF16
    int QK, QK_K
    size_t qora_row_bytes(int dtype, int cols)

    ctypedef struct block_q4:
        pass
    ctypedef struct block_q8:
        pass
    ctypedef struct block_q4_1:
        pass
    ctypedef struct block_q5_0:
        pass
    ctypedef struct block_q5_1:
        pass
    ctypedef struct block_q4_K:
        pass
    ctypedef struct block_q5_K:
        pass
    ctypedef struct block_q6_K:
        pass
    ctypedef struct block_q8K:
        pass

    ctypedef struct block_q4x8:
        pass

    ctypedef struct qora_tensor:
        int32_t dtype
        int32_t rows
        int32_t cols
        size_t row_bytes
        const void* data
        const block_q4x8* packed
        const void* kpacked

    ctypedef struct qora_config:
        int n_layers, dim, n_heads, n_kv_heads, head_dim, hidden_dim, vocab_size, max_seq_len
        float norm_eps, rope_scale
        int kv_type
        int act_f32

    ctypedef struct qora_layer:
        const float* attn_norm
        qora_tensor wq, wk, wv, wo
        const float* ffn_norm
        qora_tensor w_gate, w_up, w_down
        int use_rope

    ctypedef struct qora_weights:
        qora_tensor tok_embeddings
        qora_tensor output
        const float* norm
        const float* inv_freq
        qora_layer* layers

from qora.dtypes import WEIGHT_TYPES as _WEIGHT_TYPES

DTYPES = {name: t.c_id for name, t in _WEIGHT_TYPES.items()}  # name -> enum qora_dtype


def c_weight_types():
    """The C side of the weight-type table, as compiled (tests/test_dtypes.py compares it with
    qora/dtypes.py): the enum values, QK, QK_K and the block struct sizes (by the table's names)."""
    return {
        "enum": {"QORA_F32": QORA_F32, "QORA_F16": QORA_F16, "QORA_Q8": QORA_Q8, "QORA_Q4": QORA_Q4,
                 "QORA_Q4_1": QORA_Q4_1, "QORA_Q5_0": QORA_Q5_0, "QORA_Q5_1": QORA_Q5_1, "QORA_Q4_K": QORA_Q4_K,
                 "QORA_Q5_K": QORA_Q5_K, "QORA_Q6_K": QORA_Q6_K, "QORA_BF16": QORA_BF16},
        "QK": QK,
        "QK_K": QK_K,
        "sizeof": {"block_q8": sizeof(block_q8), "block_q4": sizeof(block_q4), "block_q4_1": sizeof(block_q4_1),
                   "block_q5_0": sizeof(block_q5_0), "block_q5_1": sizeof(block_q5_1),
                   "block_q4_k": sizeof(block_q4_K), "block_q5_k": sizeof(block_q5_K),
                   "block_q6_k": sizeof(block_q6_K)},
        "sizeof_q8k": sizeof(block_q8K),
    }


def c_row_bytes(int dtype, int cols):
    """qora_row_bytes as compiled: bytes of one row of `cols` elements of enum value `dtype`."""
    return qora_row_bytes(dtype, cols)


cdef qora_tensor _tensor(str dtype, int rows, int cols, const uint8_t[::1] data, str what) except *:
    """A qora_tensor over `data`, after checking its size matches dtype x shape."""
    cdef qora_tensor t
    memset(&t, 0, sizeof(qora_tensor))
    if dtype not in DTYPES:
        raise ValueError(f"{what}: unknown dtype {dtype!r}")
    t.dtype = DTYPES[dtype]
    if rows <= 0 or cols <= 0:
        raise ValueError(f"{what}: bad shape ({rows}, {cols})")
    block = _WEIGHT_TYPES[dtype].block
    if cols % block != 0:
        raise ValueError(f"{what}: {dtype} needs a column count that is a multiple of {block}, got {cols}")
    t.rows = rows
    t.cols = cols
    t.row_bytes = qora_row_bytes(t.dtype, cols)
    if data.shape[0] == 0 or <size_t>data.shape[0] != t.row_bytes * <size_t>rows:
        raise ValueError(f"{what}: {data.shape[0]} bytes, expected {t.row_bytes * rows} for {dtype} ({rows}, {cols})")
    t.data = &data[0]
    return t


cdef qora_tensor _weight_mat(dict tensors, str name, int rows, int cols, list refs) except *:
    dtype, shape, arr = tensors[name]
    if tuple(shape) != (rows, cols):
        raise ValueError(f"{name}: shape {tuple(shape)}, expected {(rows, cols)}")
    a = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    refs.append(a)
    return _tensor(dtype, rows, cols, a, name)


cdef const float* _weight_vec(dict tensors, str name, int n, list refs) except NULL:
    dtype, shape, arr = tensors[name]
    if dtype != "f32" or tuple(shape) != (n,):
        raise ValueError(f"{name}: expected f32 ({n},), got {dtype} {tuple(shape)}")
    a = np.ascontiguousarray(arr, dtype=np.float32)
    refs.append(a)
    return <const float*><size_t>a.ctypes.data


cdef int _fill_config(qora_config* c, dict cfg, int max_seq_len, float rope_scale) except -1:
    """cfg: the normalized config of a .qora file."""
    c.n_layers = cfg["n_layers"]
    c.dim = cfg["dim"]
    c.n_heads = cfg["n_heads"]
    c.n_kv_heads = cfg["n_kv_heads"]
    c.head_dim = cfg["head_dim"]
    c.hidden_dim = cfg["hidden_dim"]
    c.vocab_size = cfg["vocab_size"]
    c.max_seq_len = max_seq_len
    c.norm_eps = cfg["norm_eps"]
    c.rope_scale = rope_scale
    if min(c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.hidden_dim, c.vocab_size) <= 0 \
            or c.n_heads % c.n_kv_heads or c.head_dim % 2 or max_seq_len < 1:
        raise ValueError("inconsistent model config")
    if len(cfg["rope_layers"]) != c.n_layers:
        raise ValueError("rope_layers must have n_layers entries")
    return 0


cdef int _fill_weights(qora_weights* w, qora_layer* layers, const qora_config* c, dict cfg, dict tensors, inv_freq,
                       list refs) except -1:
    """Point w (and its c.n_layers layers) at the tensors: name -> (dtype, shape, array) as stored."""
    cdef int i
    cdef qora_layer* L
    w.layers = layers
    q_dim = <Py_ssize_t>c.n_heads * c.head_dim  # no int wrap-around; > INT_MAX fails in _tensor
    kv_dim = <Py_ssize_t>c.n_kv_heads * c.head_dim
    D, H, V = c.dim, c.hidden_dim, c.vocab_size
    w.tok_embeddings = _weight_mat(tensors, "tok_embeddings", V, D, refs)
    w.output = _weight_mat(tensors, "output" if "output" in tensors else "tok_embeddings", V, D, refs)
    w.norm = _weight_vec(tensors, "norm", D, refs)
    inv = np.ascontiguousarray(inv_freq, dtype=np.float32)
    if inv.shape != (c.head_dim // 2,):
        raise ValueError("inv_freq must have head_dim/2 values")
    refs.append(inv)
    w.inv_freq = <const float*><size_t>inv.ctypes.data
    rope_layers = cfg["rope_layers"]
    for i in range(c.n_layers):
        p = f"layers.{i}."
        L = &layers[i]
        L.attn_norm = _weight_vec(tensors, p + "attn_norm", D, refs)
        L.ffn_norm = _weight_vec(tensors, p + "ffn_norm", D, refs)
        L.wq = _weight_mat(tensors, p + "wq", q_dim, D, refs)
        L.wk = _weight_mat(tensors, p + "wk", kv_dim, D, refs)
        L.wv = _weight_mat(tensors, p + "wv", kv_dim, D, refs)
        L.wo = _weight_mat(tensors, p + "wo", D, q_dim, refs)
        L.w_gate = _weight_mat(tensors, p + "w_gate", H, D, refs)
        L.w_up = _weight_mat(tensors, p + "w_up", H, D, refs)
        L.w_down = _weight_mat(tensors, p + "w_down", D, H, refs)
        L.use_rope = 1 if rope_layers[i] else 0
    return 0
