"""The weight types, in one table: what .qora headers, the converter, the quantizers, the CLI
choices and the compiled core (qora/_core/weights.pxi) know about each one.

The C side (enum qora_dtype, the block structs and qora_row_bytes in include/qora/common.h) must
agree with it; tests/test_dtypes.py checks that against the built extension. A new type starts
here (see ARCHITECTURE.md, "Where to add a weight type").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WeightType:
    name: str  # as written in .qora headers and on the command line
    c_id: int  # its value in enum qora_dtype
    block: int  # elements per block (1: a plain float type)
    block_bytes: int  # bytes per block
    gguf: str  # the GGUF type with the very same bytes (copied, not re-encoded, on conversion)
    numpy: np.dtype | None = None  # element type of a float type's stored array (None: uint8 blocks)
    scales: tuple[int, ...] = ()  # byte offsets of a block's f16 scales (the finiteness checks read them)
    writable: bool = True  # `qora convert --quant` can write it (quant.py has its quantizer)
    vulkan: bool = True  # the Vulkan backend has kernels for it (else that engine refuses the model)

    @property
    def quantized(self) -> bool:
        return self.block > 1

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block


QK = 32  # elements per block of the 32-element types (q4, q8, q4_1, q5_0, q5_1)
QK_K = 256  # elements per super-block of the K types (q4_k, q5_k, q6_k)

# In the C enum's order (new types go at the end: enum values are stored nowhere, but the C side,
# the Vulkan shaders' DTYPE numbers and this table must agree). Every quantized type is its GGUF
# twin bit for bit (q4 = Q4_0, q8 = Q8_0, q4_k = Q4_K, ...), so GGUF tensors are used as stored.
# bf16 is kept as its raw 16-bit patterns (NumPy has no bfloat16).
WEIGHT_TYPES = {
    t.name: t
    for t in (
        WeightType("f32", 0, 1, 4, "F32", np.dtype("<f4")),
        WeightType("f16", 1, 1, 2, "F16", np.dtype("<f2")),
        WeightType("q8", 2, QK, 2 + QK, "Q8_0", scales=(0,)),
        WeightType("q4", 3, QK, 2 + QK // 2, "Q4_0", scales=(0,)),
        WeightType("q4_1", 4, QK, 4 + QK // 2, "Q4_1", scales=(0, 2)),
        WeightType("q5_0", 5, QK, 6 + QK // 2, "Q5_0", scales=(0,)),
        WeightType("q5_1", 6, QK, 8 + QK // 2, "Q5_1", scales=(0, 2)),
        WeightType("q4_k", 7, QK_K, 4 + 12 + QK_K // 2, "Q4_K", scales=(0, 2)),
        WeightType("q5_k", 8, QK_K, 4 + 12 + QK_K // 8 + QK_K // 2, "Q5_K", scales=(0, 2), writable=False),
        WeightType("q6_k", 9, QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2, "Q6_K", scales=(208,)),
        WeightType("bf16", 10, 1, 2, "BF16", np.dtype("<u2"), writable=False),
    )
}

NAMES = tuple(WEIGHT_TYPES)  # "f32", "f16", "q8", "q4", "q4_1", ...
# the user-facing order (--quant choices: the types convert can write): smallest first
CHOICES = tuple(sorted((n for n in NAMES if WEIGHT_TYPES[n].writable), key=lambda n: WEIGHT_TYPES[n].bits_per_weight))
DEFAULT = "q4"
QUANTIZED = tuple(n for n, t in WEIGHT_TYPES.items() if t.quantized)
VULKAN = tuple(n for n, t in WEIGHT_TYPES.items() if t.vulkan)  # the types the Vulkan backend runs
BY_GGUF = {t.gguf: t for t in WEIGHT_TYPES.values()}  # GGUF type name -> its qora twin
