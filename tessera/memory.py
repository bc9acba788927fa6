"""How much memory this process may still take: the machine's, bounded by its container's limit.

Used before tessera makes optional copies (the blocked weights for decoding, see tessera/linear.py): they must
never push a model out of memory. In a container, /proc/meminfo describes the host, so a memory limit (cgroup v2
or v1) bounds both figures; file pages the kernel can drop (`inactive_file`, a safetensors checkpoint that was just
read) count as available there, as `docker stats` counts them.
"""

from __future__ import annotations

from pathlib import Path

MEMINFO = Path("/proc/meminfo")
CGROUP_FILES = (  # (limit, usage, stat, the stat's reclaimable-file-pages key): cgroup v2, then v1
    (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current"), Path("/sys/fs/cgroup/memory.stat"),
     "inactive_file"),
    (Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"), Path("/sys/fs/cgroup/memory/memory.usage_in_bytes"),
     Path("/sys/fs/cgroup/memory/memory.stat"), "total_inactive_file"),
)
UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a number near 2^63


def available_memory() -> tuple[int, int] | None:
    """(available, total) bytes for this process, or None where neither can be read (not Linux)."""
    machine = _meminfo()
    container = _cgroup()
    if machine is None:
        return container
    if container is None:
        return machine
    return min(machine[0], container[0]), min(machine[1], container[1])


def _meminfo() -> tuple[int, int] | None:
    """MemAvailable (free memory plus what the page cache can give back) and MemTotal."""
    try:
        fields = dict(line.split(":", 1) for line in MEMINFO.read_text().splitlines() if ":" in line)
        return int(fields["MemAvailable"].split()[0]) * 1024, int(fields["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def _cgroup() -> tuple[int, int] | None:
    """(limit − usage + reclaimable file pages, limit) under a container's memory limit; None without one."""
    for limit_file, usage_file, stat_file, reclaimable_key in CGROUP_FILES:
        try:
            limit_text = limit_file.read_text().strip()
        except OSError:
            continue
        try:
            if limit_text == "max" or int(limit_text) >= UNLIMITED:
                return None
            limit, usage = int(limit_text), int(usage_file.read_text())
            stat = dict(line.split() for line in stat_file.read_text().splitlines() if len(line.split()) == 2)
            reclaimable = int(stat.get(reclaimable_key, 0))
        except (OSError, ValueError):
            return None
        return max(limit - usage + reclaimable, 0), limit
    return None
