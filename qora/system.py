"""What this machine offers: physical cores, memory, and the generation limits that follow from it.

The limits table is DESIGN §6. It is keyed on *available* memory (what the process can use now without
pushing the system into swap), not installed memory: the KV cache and the activations are what grow
with the limits, and they must fit beside whatever else is running.
"""

from __future__ import annotations

import os

GIB = 1024**3

# (upper bound of available RAM in GiB, max answer tokens, think budget); the last row has no bound.
LIMITS_TABLE: tuple[tuple[float, int, int], ...] = (
    (4.0, 512, 256),
    (8.0, 1024, 1024),
    (12.0, 2048, 2048),
    (float("inf"), 8192, 8192),
)


def physical_cores() -> int:
    """Number of physical CPU cores (hyper-threads not counted); at least 1."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except Exception:  # psutil missing or unable to read the topology (some containers)
        n = None
    if not n:
        n = os.cpu_count() or 1
    return max(1, int(n))


def _meminfo_bytes(key: str) -> int | None:
    """A field of /proc/meminfo in bytes (Linux fallback when psutil is missing)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def total_ram() -> int:
    """Installed RAM in bytes (0 when it cannot be read)."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:
        pass
    value = _meminfo_bytes("MemTotal")
    if value is None:
        try:
            value = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            value = 0
    return int(value)


def available_ram() -> int:
    """RAM in bytes that can be used now without swapping (0 when it cannot be read)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        pass
    value = _meminfo_bytes("MemAvailable")
    if value is None:
        try:
            value = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            value = 0
    return int(value)


def default_limits(ram_bytes: int | None = None) -> tuple[int, int]:
    """(max_tokens, think_budget) for this much available RAM (default: measured now), per DESIGN §6.

    <4 GiB: 512/256, 4-8 GiB: 1024/1024, 8-12 GiB: 2048/2048, more: 8192/8192. An unreadable
    amount (0) gets the smallest row: too short an answer is better than an out-of-memory kill.
    """
    if ram_bytes is None:
        ram_bytes = available_ram()
    gib = ram_bytes / GIB
    for bound, max_tokens, think_budget in LIMITS_TABLE:
        if gib < bound:
            return max_tokens, think_budget
    return LIMITS_TABLE[-1][1], LIMITS_TABLE[-1][2]  # pragma: no cover (the last bound is infinite)
