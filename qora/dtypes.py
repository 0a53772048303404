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

    @property
    def quantized(self) -> bool:
        return self.block > 1

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block


QK = 32  # elements per q4 / q8 block

# In the C enum's order. q4 and q8 are GGUF Q4_0 and Q8_0 bit for bit: an f16 scale, then the payload.
WEIGHT_TYPES = {
    t.name: t
    for t in (
        WeightType("f32", 0, 1, 4, "F32", np.dtype("<f4")),
        WeightType("f16", 1, 1, 2, "F16", np.dtype("<f2")),
        WeightType("q8", 2, QK, 2 + QK, "Q8_0"),
        WeightType("q4", 3, QK, 2 + QK // 2, "Q4_0"),
    )
}

NAMES = tuple(WEIGHT_TYPES)  # "f32", "f16", "q8", "q4"
# the user-facing order (--quant choices): smallest first
CHOICES = tuple(sorted(NAMES, key=lambda n: WEIGHT_TYPES[n].bits_per_weight))
DEFAULT = "q4"
QUANTIZED = tuple(n for n, t in WEIGHT_TYPES.items() if t.quantized)
