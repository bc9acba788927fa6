"""tessera.memory: how much memory the process may still take, the machine's bounded by its cgroups' limits.
Each test builds a fake /proc and /sys/fs/cgroup, as Linux lays them out."""

from pathlib import Path

import pytest

from tessera import memory

GiB = 1 << 30
V1_UNLIMITED = "9223372036854771712"


@pytest.fixture
def system(tmp_path, monkeypatch):
    """A 64 GiB machine with 50 GiB available; no cgroup files until a test writes them."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal:       {64 * GiB // 1024} kB\nMemFree:        1 kB\n"
                       f"MemAvailable:   {50 * GiB // 1024} kB\n")
    monkeypatch.setattr(memory, "MEMINFO", meminfo)
    monkeypatch.setattr(memory, "PROC_CGROUP", tmp_path / "self_cgroup")
    monkeypatch.setattr(memory, "CGROUP_ROOT", tmp_path / "cgroup")
    (tmp_path / "cgroup").mkdir()
    return tmp_path


def _membership(system: Path, v2: str = "/", v1: str | None = None) -> None:
    lines = [f"4:memory:{v1}"] if v1 is not None else []
    (system / "self_cgroup").write_text("\n".join([*lines, "1:cpu:/", f"0::{v2}"]) + "\n")


def _v2(system: Path, path: str, limit: str, usage: int, inactive_file: int = 0, high: str = "max") -> None:
    directory = system / "cgroup" / path.strip("/")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "memory.max").write_text(limit + "\n")
    (directory / "memory.high").write_text(high + "\n")
    (directory / "memory.current").write_text(f"{usage}\n")
    (directory / "memory.stat").write_text(f"anon 123\ninactive_file {inactive_file}\nactive_file 7\n")


def _v1(system: Path, path: str, limit: str, usage: int, hierarchical: str, inactive_file: int = 0) -> None:
    directory = system / "cgroup" / "memory" / path.strip("/")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "memory.limit_in_bytes").write_text(limit + "\n")
    (directory / "memory.usage_in_bytes").write_text(f"{usage}\n")
    (directory / "memory.stat").write_text(f"cache 5\nhierarchical_memory_limit {hierarchical}\n"
                                           f"total_inactive_file {inactive_file}\n")


def test_the_machine_without_a_limit(system):
    _membership(system)
    assert memory.available_memory() == (50 * GiB, 64 * GiB)


def test_a_container_limit_at_the_namespace_root(system):
    # docker --memory 16g: 10 GiB charged, of which 3 GiB are file pages the kernel can drop → 9 GiB left
    _membership(system, "/")
    _v2(system, "/", str(16 * GiB), 10 * GiB, inactive_file=3 * GiB)
    assert memory.available_memory() == (9 * GiB, 16 * GiB)


def test_the_own_cgroup_and_every_parent_bound_it(system):
    # a systemd service (no namespace): its own 20 GiB limit, and its slice's tighter 12 GiB one
    _membership(system, "/system.slice/tessera.service")
    _v2(system, "/system.slice", str(12 * GiB), 8 * GiB)
    _v2(system, "/system.slice/tessera.service", str(20 * GiB), 6 * GiB)
    assert memory.available_memory() == (4 * GiB, 12 * GiB)


def test_memory_high_counts_as_a_limit(system):
    _membership(system)
    _v2(system, "/", "max", 2 * GiB, high=str(6 * GiB))
    assert memory.available_memory() == (4 * GiB, 6 * GiB)


def test_an_own_cgroup_not_visible_here_falls_back_to_the_root(system):
    _membership(system, "/elsewhere/not-mounted")
    _v2(system, "/", str(16 * GiB), 10 * GiB)
    assert memory.available_memory() == (6 * GiB, 16 * GiB)


def test_cgroup_v1_uses_the_hierarchical_limit(system):
    # the process's own group is unlimited, a parent's 8 GiB limit shows in hierarchical_memory_limit
    _membership(system, v1="/process_api/job")
    _v1(system, "/process_api/job", V1_UNLIMITED, 5 * GiB, hierarchical=str(8 * GiB), inactive_file=1 * GiB)
    assert memory.available_memory() == (4 * GiB, 8 * GiB)


def test_cgroup_v1_unlimited_leaves_the_machine_figures(system):
    _membership(system, v1="/process_api/job")
    _v1(system, "/process_api/job", V1_UNLIMITED, 5 * GiB, hierarchical=V1_UNLIMITED)
    assert memory.available_memory() == (50 * GiB, 64 * GiB)


def test_a_limit_above_the_machine_leaves_the_machine_figures(system):
    _membership(system)
    _v2(system, "/", str(128 * GiB), 1 * GiB)
    assert memory.available_memory() == (50 * GiB, 64 * GiB)


def test_a_cgroup_without_its_usage_is_ignored(system):
    _membership(system)
    _v2(system, "/", str(8 * GiB), 1 * GiB)
    (system / "cgroup" / "memory.current").unlink()
    assert memory.available_memory() == (50 * GiB, 64 * GiB)


def test_nothing_readable_means_unknown(system):
    memory.MEMINFO.unlink()
    assert memory.available_memory() is None


def test_this_machine_reports_sensible_figures():
    figures = memory.available_memory()
    if figures is None:
        pytest.skip("neither /proc/meminfo nor a cgroup here")
    available, total = figures
    assert 0 < available <= total
