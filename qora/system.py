"""What this machine offers: physical cores, memory, and the generation limits that follow from it.

Threads (default_threads): QORA_THREADS, else OMP_NUM_THREADS, else the physical cores this process
may run on (its CPU affinity, and its cgroup CPU quota, as in a container with --cpus). An explicit
thread count (`qora.load(threads=N)`, `--threads N`) is always honoured as given. The rule against
oversubscription: qora never starts more threads than the cores it was given, and a caller that runs
several engines side by side (worker processes, a thread pool) passes each its share as threads=N,
or sets OMP_NUM_THREADS in the workers, as joblib/loky and other pools already do.

The limits table is LIMITS_TABLE below. It is keyed on *available* memory (what the process can use now without
pushing the system into swap), not installed memory: the KV cache and the activations are what grow
with the limits, and they must fit beside whatever else is running.
"""

from __future__ import annotations

import contextlib
import math
import os

from qora.errors import QoraError

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


# Linux topology and cgroup roots (module attributes so tests can point them at a fake tree).
SYSFS_CPU = "/sys/devices/system/cpu"
CGROUP_ROOT = "/sys/fs/cgroup"
PROC_SELF_CGROUP = "/proc/self/cgroup"


def allowed_cpus() -> set[int] | None:
    """The logical CPUs this process may run on (its affinity mask); None where the OS does not say."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return None


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _cores_of(cpus) -> int | None:
    """Distinct physical cores (package, core id) among logical CPUs `cpus`, from sysfs; None if unknown."""
    cores = set()
    for c in cpus:
        topo = f"{SYSFS_CPU}/cpu{c}/topology"
        core, pkg = _read(f"{topo}/core_id"), _read(f"{topo}/physical_package_id")
        if core is None or pkg is None:
            return None
        cores.add((pkg, core))
    return len(cores) or None


def cgroup_cpu_limit() -> float | None:
    """CPUs' worth of time the process's cgroup may use (quota / period; e.g. docker --cpus=2), the
    tightest along its cgroup path; None without a limit or off Linux."""
    text = _read(PROC_SELF_CGROUP)
    if not text:
        return None
    limits = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # cgroup v2: cpu.max = "QUOTA PERIOD" or "max PERIOD", in every ancestor
            d = CGROUP_ROOT + path.rstrip("/")
            while True:
                fields = (_read(f"{d}/cpu.max") or "").split()
                if len(fields) == 2 and fields[0] != "max":
                    limits.append((fields[0], fields[1]))
                if len(d) <= len(CGROUP_ROOT):  # the root done (every step is shorter: this ends)
                    break
                d = d.rsplit("/", 1)[0]
        elif "cpu" in controllers.split(","):  # cgroup v1: cpu.cfs_quota_us (-1: none) / cpu.cfs_period_us
            for d in (f"{CGROUP_ROOT}/{controllers}{path}", f"{CGROUP_ROOT}/cpu{path}", f"{CGROUP_ROOT}/{controllers}"):
                quota, period = _read(f"{d}/cpu.cfs_quota_us"), _read(f"{d}/cpu.cfs_period_us")
                if quota and period:
                    limits.append((quota, period))
                    break
    cpus = []
    for quota, period in limits:
        try:
            q, p = int(quota), int(period)
        except ValueError:
            continue
        if q > 0 and p > 0:
            cpus.append(q / p)
    return min(cpus) if cpus else None


def usable_cores() -> int:
    """Physical cores this process may use: those of its allowed CPUs (hyper-threads not counted),
    capped by its cgroup CPU quota (rounded up); at least 1."""
    cpus = allowed_cpus()
    if cpus:
        n = _cores_of(cpus) or min(len(cpus), physical_cores())
    else:
        n = physical_cores()
    quota = cgroup_cpu_limit()
    if quota:
        n = min(n, math.ceil(quota))
    return max(1, n)


def default_threads() -> int:
    """Threads when the caller names none: QORA_THREADS, else OMP_NUM_THREADS (its first level), else
    usable_cores(). A QORA_THREADS that is not a positive integer is an error; a malformed
    OMP_NUM_THREADS (another library's variable too) is ignored."""
    raw = os.environ.get("QORA_THREADS", "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise QoraError(f"QORA_THREADS={raw!r} is not a positive integer")
        return int(raw)
    omp = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    return usable_cores()


# How long an OpenMP thread spins before it sleeps, waiting for the next parallel region: a decode step runs
# about 7 regions per layer (250 for a 36-layer model), a few microseconds apart. On an idle machine
# GCC's long default spin (300,000 rounds) keeps the team awake across a step: on a 16-core Xeon
# (bench/NOTES.md) the 3B model decoded tg32 at 57.1 tok/s with it against 44.1 with a 1,000-round spin
# (pp512 359 vs 298). On a machine whose CPUs other work already keeps busy, the long spin burns the
# time slices the other threads need: on a busy 2-core AMD EPYC, 2 threads of decode products read
# weights at 6-14% of the read bandwidth by default, 9-10% at 100,000, 38-41% at 10,000 and 61-68% at
# 1,000 (libgomp's own value for an oversubscribed machine). So the short spin only where other work
# keeps the CPUs busy at import; OMP_WAIT_POLICY or GOMP_SPINCOUNT set by the user win. Busy is measured
# over a moment (CPU time in use), not by the 1-minute load average: that lags, and after a benchmark
# or a build had just used every core it called an idle 16-core machine busy (pp512 262 instead of
# ~360 tok/s, bench/NOTES.md).
OMP_SPINCOUNT = "1000"
# what openmp_environment chose for this process (shown by `qora --version` and cpu_info)
openmp_wait = "libgomp default (core not imported yet)"


def cpu_busy_share(interval: float = 0.05) -> float | None:
    """Share (0..1) of all logical CPUs' time in use during `interval` seconds; None if unknown."""
    try:
        import psutil

        return psutil.cpu_percent(interval=interval) / 100.0
    except Exception:
        pass
    try:
        return min(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
    except (AttributeError, OSError):
        return None


def machine_busy(share: float | None = None) -> bool:
    """Whether other work already keeps this machine's CPUs busy: fewer CPUs free right now than three
    quarters of the threads qora would start by default."""
    share = cpu_busy_share() if share is None else share
    if share is None:
        return False
    free = (1.0 - share) * (os.cpu_count() or 1)
    return free < 0.75 * usable_cores()


@contextlib.contextmanager
def openmp_environment(environ=None, busy=None):
    """Around the first import of the compiled core (libgomp reads its settings once, when it is
    loaded): GOMP_SPINCOUNT=OMP_SPINCOUNT on a busy machine (machine_busy) unless the user set
    OMP_WAIT_POLICY or GOMP_SPINCOUNT; the environment is put back afterwards, so child processes (a
    llama.cpp peer) see the user's. The choice is kept in `openmp_wait`."""
    global openmp_wait
    environ = os.environ if environ is None else environ
    user = [f"{k}={environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in environ]
    if user:
        openmp_wait = "as set: " + " ".join(user)
        yield
        return
    share = None
    if busy is None:  # measured once: machine_busy(None) would measure again
        share = cpu_busy_share()
        busy = share is not None and machine_busy(share)
    in_use = f"{share:.0%} of the CPUs in use at import" if share is not None else "busy"
    if not busy:
        openmp_wait = "libgomp default spin" + (f" ({in_use})" if share is not None else "")
        yield
        return
    openmp_wait = f"short spin, GOMP_SPINCOUNT={OMP_SPINCOUNT} ({in_use})"
    environ["GOMP_SPINCOUNT"] = OMP_SPINCOUNT
    try:
        yield
    finally:
        environ.pop("GOMP_SPINCOUNT", None)


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


def _ram(psutil_field: str, meminfo_key: str, sysconf_pages: str) -> int:
    """RAM in bytes from psutil, else /proc/meminfo, else sysconf (0 when none can be read)."""
    try:
        import psutil

        return int(getattr(psutil.virtual_memory(), psutil_field))
    except Exception:
        pass
    value = _meminfo_bytes(meminfo_key)
    if value is None:
        try:
            value = os.sysconf("SC_PAGE_SIZE") * os.sysconf(sysconf_pages)
        except (ValueError, OSError, AttributeError):
            value = 0
    return int(value)


def total_ram() -> int:
    """Installed RAM in bytes (0 when it cannot be read)."""
    return _ram("total", "MemTotal", "SC_PHYS_PAGES")


def available_ram() -> int:
    """RAM in bytes that can be used now without swapping (0 when it cannot be read)."""
    return _ram("available", "MemAvailable", "SC_AVPHYS_PAGES")


def default_limits(ram_bytes: int | None = None) -> tuple[int, int]:
    """(max_tokens, think_budget) for this much available RAM (default: measured now), per LIMITS_TABLE.

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
