"""The Vulkan device the GPU tests run on (test_vulkan.py, test_vulkan_attention.py): DEVICE, the
`needs_gpu` mark, and the Vulkan context behind the `ctx` fixture of conftest.py. CI uses lavapipe."""

from __future__ import annotations

import functools

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
