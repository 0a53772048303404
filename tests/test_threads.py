"""Default thread count (qora.system): QORA_THREADS > OMP_NUM_THREADS > the physical cores this
process may use (affinity, sysfs topology, cgroup quota); an explicit count is honoured as given."""

from __future__ import annotations

from pathlib import Path

import pytest

from qora import system
from qora.errors import QoraError


def fake_topology(root: Path, cpus: dict[int, tuple[int, int]]) -> str:
    """sysfs cpuN/topology/{physical_package_id, core_id} for {cpu: (package, core)}."""
    for cpu, (pkg, core) in cpus.items():
        topo = root / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text(f"{pkg}\n")
        (topo / "core_id").write_text(f"{core}\n")
    return str(root)


# 4 cores x 2 hyper-threads: cpu i and cpu i+4 are siblings on core i
SMT_BOX = {i: (0, i % 4) for i in range(8)}


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A fake 8-CPU, 4-core Linux box with no cgroup limit and no thread variables set."""
    monkeypatch.delenv("QORA_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(system, "SYSFS_CPU", fake_topology(tmp_path / "cpu", SMT_BOX))
    monkeypatch.setattr(system, "CGROUP_ROOT", str(tmp_path / "cgroup"))
    monkeypatch.setattr(system, "PROC_SELF_CGROUP", str(tmp_path / "proc-self-cgroup"))
    monkeypatch.setattr(system, "physical_cores", lambda: 4)

    def set_affinity(cpus):
        monkeypatch.setattr(system, "allowed_cpus", lambda: None if cpus is None else set(cpus))

    set_affinity(range(8))
    return set_affinity


def cgroup(tmp_path: Path, proc_line: str, files: dict[str, str]):
    (tmp_path / "proc-self-cgroup").write_text(proc_line + "\n")
    for rel, text in files.items():
        f = tmp_path / "cgroup" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text + "\n")


def test_physical_cores_not_hyperthreads(machine):
    assert system.usable_cores() == 4 and system.default_threads() == 4


@pytest.mark.parametrize(
    "cpus, expected",
    [
        ([0, 4], 1),  # two hyper-threads of one core
        ([0, 1], 2),  # two cores
        ([0, 1, 2, 4, 5], 3),
        ([3], 1),
    ],
)
def test_affinity_limits_the_cores(machine, cpus, expected):
    machine(cpus)
    assert system.usable_cores() == expected and system.default_threads() == expected


def test_without_topology_the_affinity_caps_physical_cores(machine, monkeypatch, tmp_path):
    monkeypatch.setattr(system, "SYSFS_CPU", str(tmp_path / "nothing"))
    machine([0, 1, 2, 3, 4, 5])
    assert system.usable_cores() == 4  # physical_cores(), fewer than the 6 allowed CPUs
    machine([5, 6])
    assert system.usable_cores() == 2
    machine(None)  # an OS without affinity masks
    assert system.usable_cores() == 4


def test_cgroup_v2_quota(machine, tmp_path):
    cgroup(tmp_path, "0::/box/job", {"box/job/cpu.max": "max 100000", "box/cpu.max": "150000 100000"})
    assert system.cgroup_cpu_limit() == 1.5
    assert system.usable_cores() == 2  # a quota of 1.5 CPUs still runs 2 threads part of the time


def test_cgroup_v2_unlimited_and_v1_quota(machine, tmp_path):
    cgroup(tmp_path, "0::/", {"cpu.max": "max 100000"})
    assert system.cgroup_cpu_limit() is None and system.usable_cores() == 4
    cgroup(tmp_path, "4:cpu,cpuacct:/docker/x", {"cpu,cpuacct/docker/x/cpu.cfs_quota_us": "100000"})
    (tmp_path / "cgroup" / "cpu,cpuacct/docker/x/cpu.cfs_period_us").write_text("100000\n")
    assert system.cgroup_cpu_limit() == 1.0 and system.usable_cores() == 1
    (tmp_path / "cgroup" / "cpu,cpuacct/docker/x/cpu.cfs_quota_us").write_text("-1\n")
    assert system.cgroup_cpu_limit() is None and system.usable_cores() == 4


def test_environment_overrides(machine, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3,2")  # nested levels: the first one is ours
    assert system.default_threads() == 3
    monkeypatch.setenv("QORA_THREADS", "6")  # qora's own variable wins, even past the core count
    assert system.default_threads() == 6
    monkeypatch.delenv("QORA_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")  # another library's variable: ignored when malformed
    assert system.default_threads() == 4


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_bad_qora_threads_is_an_error(machine, monkeypatch, value):
    monkeypatch.setenv("QORA_THREADS", value)
    with pytest.raises(QoraError, match="QORA_THREADS"):
        system.default_threads()


def test_one_definition():
    from qora.engine import cpu

    assert cpu.default_threads is system.default_threads and cpu.physical_cores is system.physical_cores


def test_engine_uses_the_default_and_honours_an_explicit_count(machine, monkeypatch, tmp_path):
    import qora
    from qora.convert import convert

    path = convert(Path(__file__).parent / "fixtures" / "tiny-llama", tmp_path / "m.qora", quant="q8", progress=False)
    machine([1])
    with qora.load(path, device="cpu", max_seq_len=16) as m:
        assert m.engine.n_threads == 1
    monkeypatch.setenv("QORA_THREADS", "3")
    with qora.load(path, device="cpu", max_seq_len=16) as m:
        assert m.engine.n_threads == 3
    with qora.load(path, threads=2, device="cpu", max_seq_len=16) as m:  # the caller's count wins
        assert m.engine.n_threads == 2
        assert m.forward([1, 2, 3]).shape == (3, m.config["vocab_size"])


def test_openmp_short_spin_only_on_a_busy_machine(monkeypatch):
    """GOMP_SPINCOUNT goes in around the core's import only where other load fills the CPUs, never over
    the user's own OpenMP wait settings, and comes out again afterwards; the choice is recorded."""
    from qora.system import OMP_SPINCOUNT, openmp_environment

    monkeypatch.setattr(system, "openmp_wait", system.openmp_wait)  # restored after the test
    env = {}
    with openmp_environment(env, busy=True):
        assert env == {"GOMP_SPINCOUNT": OMP_SPINCOUNT}
    assert env == {}
    assert system.openmp_wait.startswith(f"short spin, GOMP_SPINCOUNT={OMP_SPINCOUNT}")
    with openmp_environment(env, busy=False):
        assert env == {}
    assert system.openmp_wait.startswith("libgomp default spin")
    for user in ({"OMP_WAIT_POLICY": "active"}, {"GOMP_SPINCOUNT": "5"}):
        env = dict(user)
        with openmp_environment(env, busy=True):
            assert env == user
        assert env == user
        assert system.openmp_wait == "as set: " + " ".join(f"{k}={v}" for k, v in user.items())


def test_machine_busy_counts_the_cpus_in_use_now(monkeypatch):
    """Busy = fewer CPUs free at this moment than 3/4 of the default thread count (not the 1-minute load
    average, which still counts a benchmark that has just finished)."""
    monkeypatch.setattr(system.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(system, "usable_cores", lambda: 16)
    assert not system.machine_busy(0.02)  # idle after a build or a peer's benchmark
    assert not system.machine_busy(0.2)
    assert system.machine_busy(0.5)  # 8 CPUs taken by other work
    monkeypatch.setattr(system.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(system, "usable_cores", lambda: 2)
    assert system.machine_busy(0.5)  # one of two cores busy: two threads would contend
    assert not system.machine_busy(0.1)
    share = system.cpu_busy_share(0.01)
    assert share is None or 0.0 <= share <= 1.0
