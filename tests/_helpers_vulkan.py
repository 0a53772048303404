"""The Vulkan device the GPU tests run on (test_vulkan.py, test_vulkan_attention.py): DEVICE, the
`needs_gpu` mark, and the Vulkan context behind the `ctx` fixture of conftest.py. CI uses lavapipe."""

from __future__ import annotations

import functools
import struct

import numpy as np
import pytest

from qora._core import _vulkan
from qora.engine import vulkan
from qora.errors import QoraError


def _device():
    try:
        return vulkan.choose_device(_vulkan.list_devices(), required=True)
    except (_vulkan.VulkanError, QoraError):
        return None


DEVICE = _device()
needs_gpu = pytest.mark.skipif(DEVICE is None, reason="no usable Vulkan device (CI installs lavapipe)")


@functools.cache
def context():
    """One Vulkan context on DEVICE for the whole session (skips the test without a device)."""
    if DEVICE is None:
        pytest.skip("no usable Vulkan device")
    return vulkan._context(_vulkan, None, DEVICE["index"])[0]


def run_matmul(ctx, kernel, mode, w, x, xs, rows, cols, tile, rng):
    """A prefill product kernel (matmul.comp, matmul_coop.comp: `tile` tokens and rows per workgroup) over
    the token rows of x, writing at output column 2 of a wider Y (rows + 5) that starts out random, so
    stores and adds past the edges show; returns (Y after, Y before)."""
    n_tok = x.shape[0]
    ldy = rows + 5
    y0 = rng.standard_normal((n_tok, ldy)).astype(np.float32)
    y = y0.copy()
    push = struct.pack("<6I", rows, cols, n_tok, x.shape[1], ldy, 2)
    ctx.run_kernel(kernel, [0, mode], [w, x.copy(), xs, y], push, (rows + tile - 1) // tile, (n_tok + tile - 1) // tile)
    return y, y0


def matmul_want(y0, ref, add: bool):
    """What run_matmul's Y must hold: Y before, with ref (n_tok, rows) stored or added at column 2."""
    want = y0.astype(np.float64)
    rows = ref.shape[1]
    want[:, 2 : 2 + rows] = (want[:, 2 : 2 + rows] if add else 0) + ref
    return want
