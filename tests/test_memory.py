"""tessera.memory: how much memory the process may still take, the machine's bounded by a container's limit."""

from pathlib import Path

import pytest

from tessera import memory

GiB = 1 << 30


def _meminfo(directory: Path, available_gib: int, total_gib: int) -> Path:
    path = directory / "meminfo"
    path.write_text(f"MemTotal:       {total_gib * GiB // 1024} kB\nMemFree:        1 kB\n"
                    f"MemAvailable:   {available_gib * GiB // 1024} kB\n")
    return path


def _cgroup(directory: Path, version: int, limit: str, usage: int, inactive_file: int):
    directory.mkdir()
    key = "inactive_file" if version == 2 else "total_inactive_file"
    files = [directory / name for name in ("limit", "usage", "stat")]
    files[0].write_text(limit + "\n")
    files[1].write_text(f"{usage}\n")
    files[2].write_text(f"anon 123\n{key} {inactive_file}\nactive_file 7\n")
    return (*files, key)


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A 64 GiB machine with 50 GiB available, and no cgroup memory files."""
    monkeypatch.setattr(memory, "MEMINFO", _meminfo(tmp_path, 50, 64))
    monkeypatch.setattr(memory, "CGROUP_FILES", ((tmp_path / "none", tmp_path / "none", tmp_path / "none", "x"),))
    return tmp_path


def test_the_machine_without_a_container_limit(machine):
    assert memory.available_memory() == (50 * GiB, 64 * GiB)


@pytest.mark.parametrize("version", [2, 1])
def test_a_container_limit_bounds_both_figures(machine, monkeypatch, version):
    # 16 GiB limit, 10 GiB charged of which 3 GiB are file pages the kernel can drop: 9 GiB left, not the host's 50
    files = _cgroup(machine / f"v{version}", version, str(16 * GiB), 10 * GiB, 3 * GiB)
    monkeypatch.setattr(memory, "CGROUP_FILES", (files,))
    assert memory.available_memory() == (9 * GiB, 16 * GiB)


@pytest.mark.parametrize("limit", ["max", str((1 << 63) - 4096)])  # v2's and v1's way of saying "no limit"
def test_an_unlimited_cgroup_leaves_the_machine_figures(machine, monkeypatch, limit):
    monkeypatch.setattr(memory, "CGROUP_FILES", (_cgroup(machine / "cg", 2, limit, 10 * GiB, 0),))
    assert memory.available_memory() == (50 * GiB, 64 * GiB)


def test_unreadable_files_mean_unknown(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "MEMINFO", tmp_path / "missing")
    monkeypatch.setattr(memory, "CGROUP_FILES", ((tmp_path / "none", tmp_path / "none", tmp_path / "none", "x"),))
    assert memory.available_memory() is None


def test_this_machine_reports_sensible_figures():
    figures = memory.available_memory()
    if figures is None:
        pytest.skip("neither /proc/meminfo nor a cgroup here")
    available, total = figures
    assert 0 < available <= total
