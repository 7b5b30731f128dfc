"""How many CPU threads a run uses: as many as the cores this process may use.

The count is the least of the CPUs the process may run on (its affinity, as ``taskset`` or a
container's cpuset sets it; ``os.cpu_count()`` where the OS has no affinity) and the CPU quota of
its cgroup (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, rounded up to whole
cores). A container limited to 2 CPUs on a 64-core host then runs 2 threads, not 64 that the
kernel throttles in turn. torch's count is the run's (``set_threads``); the export backends take
theirs from it (``backends.exported.ExportEngine``: llama.cpp's ``n_threads``, onnxruntime's
``intra_op_num_threads``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .. import ElastiqError


def usable_cores(cgroup_root: Path = Path("/sys/fs/cgroup"),
                 proc_cgroup: Path = Path("/proc/self/cgroup")) -> tuple[int, str]:
    """(cores this process may use, where that number comes from): the least of its CPU affinity
    and its cgroup's CPU quota (v2 and v1; the process's cgroup and each one above it, so a
    parent's quota counts too, and the root's files where the process's path is not mounted)."""
    try:
        best = (len(os.sched_getaffinity(0)), "CPU affinity")
    except AttributeError:  # no affinity on this OS (macOS, Windows)
        best = (os.cpu_count() or 1, "os.cpu_count()")
    for quota in _cgroup_quotas(cgroup_root, proc_cgroup):
        if quota[0] < best[0]:
            best = quota
    return best


def _cgroup_quotas(root: Path, proc_cgroup: Path) -> list[tuple[int, str]]:
    """(whole cores, source) of every CPU quota set on the process's cgroups (v2, v1), none unset."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    quotas = []
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and controllers == "":
            bases, version = [root], "v2"
        elif "cpu" in controllers.split(","):  # mounted as cpu,cpuacct, most often linked as cpu
            bases, version = list(dict.fromkeys([root / "cpu", root / controllers])), "v1"
        else:
            continue
        parts = Path(path.lstrip("/")).parts
        for base in bases:
            for depth in range(len(parts), -1, -1):
                folder = base.joinpath(*parts[:depth])
                quota = _v2_quota(folder) if version == "v2" else _v1_quota(folder)
                if quota is not None:
                    quotas.append(quota)
    return quotas


def _v2_quota(folder: Path) -> tuple[int, str] | None:
    """Cores allowed by ``cpu.max`` ("QUOTA PERIOD" in microseconds, or "max PERIOD": no quota)."""
    try:
        quota, period = (folder / "cpu.max").read_text().split()
        if quota == "max":
            return None
        return _cores(int(quota), int(period), f"cgroup v2 CPU quota {quota}/{period} ({folder / 'cpu.max'})")
    except (OSError, ValueError):
        return None


def _v1_quota(folder: Path) -> tuple[int, str] | None:
    """Cores allowed by ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (a quota of -1: none)."""
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota < 0 else _cores(quota, period, f"cgroup v1 CPU quota {quota}/{period} "
                                                         f"({folder / 'cpu.cfs_quota_us'})")


def _cores(quota: int, period: int, source: str) -> tuple[int, str] | None:
    """A quota of ``quota`` µs per ``period`` µs as whole cores (rounded up, at least 1)."""
    return (max(math.ceil(quota / period), 1), source) if period > 0 else None


def set_threads(count: int) -> None:
    """Run torch on ``count`` intra-op threads; the export backends then use as many."""
    if count < 1:
        raise ElastiqError(f"a thread count is 1 or more, got {count}")
    torch.set_num_threads(count)
