"""How much memory this process may still take: the machine's, bounded by the memory limits of its cgroups.

Used before tessera makes optional copies (the blocked weights for decoding, see tessera/linear.py): they must
never push a model out of memory. /proc/meminfo describes the whole machine, so the limits of the process's own
cgroup and of every cgroup above it (a container's `--memory`, a systemd service's `MemoryMax=`) bound both figures.
File pages the kernel can drop (`inactive_file`: a safetensors checkpoint that was just read) count as available,
as `docker stats` counts them. Anything that cannot be read counts as no limit.
"""

from __future__ import annotations

from pathlib import Path

MEMINFO = Path("/proc/meminfo")
PROC_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")
UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a number near 2^63

Figures = tuple[int, int]  # (available, total) bytes


def available_memory() -> Figures | None:
    """(available, total) bytes for this process, or None where nothing can be read (not Linux)."""
    figures = [f for f in (_meminfo(), *_cgroup_limits()) if f is not None]
    if not figures:
        return None
    return min(available for available, _ in figures), min(total for _, total in figures)


def _meminfo() -> Figures | None:
    """MemAvailable (free memory plus what the page cache can give back) and MemTotal."""
    try:
        fields = dict(line.split(":", 1) for line in MEMINFO.read_text().splitlines() if ":" in line)
        return int(fields["MemAvailable"].split()[0]) * 1024, int(fields["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def _own_cgroups() -> dict[str, str]:
    """The process's cgroup paths: {"v2": path} from the "0::path" line, {"v1": path} from the memory controller's."""
    paths = {}
    try:
        lines = PROC_CGROUP.read_text().splitlines()
    except OSError:
        return paths
    for line in lines:
        number, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if number == "0" and controllers == "":
            paths["v2"] = path
        elif "memory" in controllers.split(","):
            paths["v1"] = path
    return paths


def _directories(root: Path, path: str) -> list[Path]:
    """root/path and every directory above it up to root, those that exist; just root when the path is not visible
    from here (inside a cgroup namespace the process's own cgroup is mounted as the root)."""
    here = root / path.strip("/")
    found = [d for d in (here, *here.parents) if d.is_relative_to(root) and _is_dir(d)]
    return found if found and found[0] == here else [root]


def _cgroup_limits() -> list[Figures | None]:
    paths = _own_cgroups()
    v2 = [_v2(d) for d in _directories(CGROUP_ROOT, paths.get("v2", "/"))]
    memory_v1 = CGROUP_ROOT / "memory"
    v1 = [_v1(_directories(memory_v1, paths.get("v1", "/"))[0])] if _is_dir(memory_v1) else []
    return v2 + v1


def _v2(directory: Path) -> Figures | None:
    """One cgroup v2 directory's limit: memory.max (and memory.high, where the kernel starts reclaiming hard)."""
    limits = [text for name in ("memory.max", "memory.high") if (text := _read(directory / name)) not in (None, "max")]
    return _headroom(directory, limits, "memory.current", "inactive_file")


def _v1(directory: Path) -> Figures | None:
    """The cgroup v1 memory controller's limit; memory.stat's hierarchical limit includes every parent's."""
    hierarchical = _stat(directory, "hierarchical_memory_limit") or UNLIMITED
    limits = [_read(directory / "memory.limit_in_bytes"), str(hierarchical)]
    return _headroom(directory, [text for text in limits if text is not None], "memory.usage_in_bytes",
                     "total_inactive_file")


def _headroom(directory: Path, limits: list[str], usage_file: str, reclaimable_key: str) -> Figures | None:
    """(limit − usage + reclaimable file pages, limit) for the tightest of `limits`; None without a real limit or
    without a readable usage."""
    try:
        limit = min(map(int, limits), default=UNLIMITED)
        if limit >= UNLIMITED:
            return None
        usage = int(_read(directory / usage_file) or "")
    except ValueError:
        return None
    return max(limit - usage + _stat(directory, reclaimable_key), 0), limit


def _is_dir(path: Path) -> bool:
    """Path.is_dir, but False where even a stat is denied (a sandbox may deny /sys): Path.is_dir raises then."""
    try:
        return path.is_dir()
    except OSError:
        return False


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _stat(directory: Path, key: str) -> int:
    """One counter of the directory's memory.stat, 0 when it is not there."""
    for line in (_read(directory / "memory.stat") or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0
