"""The weight-type table (qora/dtypes.py) against the C engine as compiled, and the Python modules
that read it."""

import pytest

from qora import convert, dtypes, quant
from qora._core import _cpu, _vulkan
from qora.dtypes import QK, WEIGHT_TYPES


@pytest.mark.parametrize("ext", [_cpu, _vulkan], ids=["cpu", "vulkan"])
def test_c_enum_and_block_layouts_match_the_table(ext):
    c = ext.c_weight_types()
    assert c["QK"] == QK
    assert c["enum"] == {f"QORA_{n.upper()}": t.c_id for n, t in WEIGHT_TYPES.items()}
    assert c["sizeof"] == {f"block_{n}": t.block_bytes for n, t in WEIGHT_TYPES.items() if t.quantized}
    assert ext.DTYPES == {n: t.c_id for n, t in WEIGHT_TYPES.items()}
    for t in WEIGHT_TYPES.values():
        for cols in (t.block, 2 * QK, 4096):
            assert ext.c_row_bytes(t.c_id, cols) == cols // t.block * t.block_bytes, (t.name, cols)


def test_c_ids_are_the_enum_order():
    assert [t.c_id for t in WEIGHT_TYPES.values()] == list(range(len(WEIGHT_TYPES)))


def test_python_sizes_follow_the_table():
    for n, t in WEIGHT_TYPES.items():
        assert quant.row_bytes(n, 4 * QK) == 4 * QK // t.block * t.block_bytes
        if t.quantized:
            assert quant.BLOCK_BYTES[n] == t.block_bytes and t.block == QK
        else:
            assert quant.FLOAT_DTYPES[n].itemsize == t.block_bytes
    assert quant.DTYPES == convert.QUANTS == dtypes.NAMES
    assert set(dtypes.CHOICES) == set(dtypes.NAMES) and dtypes.CHOICES[0] == dtypes.DEFAULT == "q4"


def test_gguf_types_have_the_same_bytes():
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    for t in WEIGHT_TYPES.values():
        assert GGML_QUANT_SIZES[GGMLQuantizationType[t.gguf]] == (t.block, t.block_bytes), t.name
