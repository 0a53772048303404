"""The weight-type table (qora/dtypes.py) against the C engine as compiled, and the Python modules
that read it."""

import numpy as np
import pytest

from qora import convert, dtypes, quant
from qora._core import _cpu, _vulkan
from qora.dtypes import QK, QK_K, WEIGHT_TYPES


@pytest.mark.parametrize("ext", [_cpu, _vulkan], ids=["cpu", "vulkan"])
def test_c_enum_and_block_layouts_match_the_table(ext):
    c = ext.c_weight_types()
    assert c["QK"] == QK and c["QK_K"] == QK_K
    assert c["enum"] == {f"QORA_{n.upper()}": t.c_id for n, t in WEIGHT_TYPES.items()}
    assert c["sizeof"] == {f"block_{n}": t.block_bytes for n, t in WEIGHT_TYPES.items() if t.quantized}
    assert c["sizeof_q8k"] == 4 + QK_K + 2 * QK_K // 16  # llama.cpp's block_q8_K
    assert ext.DTYPES == {n: t.c_id for n, t in WEIGHT_TYPES.items()}
    for t in WEIGHT_TYPES.values():
        for cols in (t.block, 2 * QK_K, 4096, 11008 // t.block * t.block):
            assert ext.c_row_bytes(t.c_id, cols) == cols // t.block * t.block_bytes, (t.name, cols)


def test_c_ids_are_the_enum_order():
    assert [t.c_id for t in WEIGHT_TYPES.values()] == list(range(len(WEIGHT_TYPES)))


def test_python_sizes_follow_the_table():
    for n, t in WEIGHT_TYPES.items():
        assert quant.row_bytes(n, 4 * QK_K) == 4 * QK_K // t.block * t.block_bytes
        if t.quantized:
            assert quant.BLOCK_BYTES[n] == t.block_bytes and t.block in (QK, QK_K)
            with pytest.raises(ValueError, match=f"multiple of {t.block}"):
                quant.row_bytes(n, t.block + QK // 2)
        else:
            assert quant.FLOAT_DTYPES[n].itemsize == t.block_bytes
    assert quant.DTYPES == convert.QUANTS == dtypes.NAMES
    assert set(dtypes.CHOICES) == {n for n, t in WEIGHT_TYPES.items() if t.writable} == set(quant.WRITABLE)
    assert dtypes.CHOICES[0] == dtypes.DEFAULT == "q4"
    for n in set(dtypes.NAMES) - set(dtypes.CHOICES):
        with pytest.raises(ValueError, match="no quantizer"):
            quant.quantize(np.zeros((1, 256), np.float32), n)


def test_types_added_after_the_first_four_keep_their_enum_values():
    """.qora files and the Vulkan shaders' DTYPE numbers were made with the first four."""
    assert [(t.name, t.c_id) for t in list(WEIGHT_TYPES.values())[:4]] == [("f32", 0), ("f16", 1), ("q8", 2), ("q4", 3)]
    assert dtypes.BY_GGUF["Q4_K"].name == "q4_k" and dtypes.BY_GGUF["Q8_0"].name == "q8"


def test_scale_offsets_are_the_blocks_f16_scales():
    """format.first_nonfinite reads these bytes: each must be an f16 scale of the GGUF block."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    for t in WEIGHT_TYPES.values():
        if not t.quantized:
            continue
        for off in t.scales:
            blk = np.zeros(t.block_bytes, np.uint8)
            blk[off : off + 2] = np.array([np.inf], "<f2").view(np.uint8)
            with np.errstate(all="ignore"):
                vals = dequantize(blk, GGMLQuantizationType[t.gguf])
            assert not np.isfinite(vals).all(), (t.name, off)


def test_gguf_types_have_the_same_bytes():
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    for t in WEIGHT_TYPES.values():
        assert GGML_QUANT_SIZES[GGMLQuantizationType[t.gguf]] == (t.block, t.block_bytes), t.name
