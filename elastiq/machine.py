"""What the machine has: free memory, and handing freed memory back to it.

Free memory is the least of: what the OS says is available (psutil), what the process's cgroup
still allows (cgroup v2 ``memory.max`` - ``memory.current``, or v1 ``memory.limit_in_bytes`` -
``memory.usage_in_bytes``, its inactive file cache counted as free, since the kernel reclaims it
first), and on a GPU what CUDA reports free. The runtime's planner and governor and the
compressor's (``compressor.needs``) read it; both hand freed buffers back after each load or block.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

_UNLIMITED_V1 = 1 << 62  # cgroup v1 reports "no limit" as a number near 2**63
MMAP_THRESHOLD = 1 << 20  # allocations from this size get their own mapping, returned to the OS on free


def return_freed_memory() -> None:
    """Make freed memory leave the process (glibc; a no-op elsewhere). Loading and switching make
    many short-lived buffers of a few MB; glibc's default raises its mmap threshold as they are
    freed and then keeps such buffers in its heap, which held ~2x the weights in resident memory.
    A fixed threshold of 1 MiB maps each large buffer on its own, and ``malloc_trim`` releases
    what the heap still holds."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)


@functools.cache
def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@dataclass(frozen=True)
class FreeMemory:
    """Bytes free for the runtime and which measurement bounded them."""

    bytes: int
    source: str


def free_memory(device: torch.device | str = "cpu", cgroup_root: Path = Path("/sys/fs/cgroup"),
                proc_cgroup: Path = Path("/proc/self/cgroup")) -> FreeMemory:
    """Free memory on ``device``: CUDA's free bytes on a GPU; else the smaller of psutil's
    available memory and the room left under the process's cgroup limit, if one is set."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return FreeMemory(free, f"torch.cuda.mem_get_info on {torch.cuda.get_device_name(device)}")
    best = FreeMemory(psutil.virtual_memory().available, "psutil available memory")
    room = _cgroup_room(cgroup_root, proc_cgroup)
    if room is not None and room.bytes < best.bytes:
        best = room
    return best


def _cgroup_room(root: Path, proc_cgroup: Path) -> FreeMemory | None:
    """Limit minus usage of the process's memory cgroup (v2, else v1), or None without a limit."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        path = path.lstrip("/")
        if hierarchy == "0" and controllers == "":
            files = [(root / path / "memory.max", root / path / "memory.current"),
                     (root / "memory.max", root / "memory.current")]
            version = "v2"
        elif "memory" in controllers.split(","):
            base = root / "memory"
            files = [(base / path / "memory.limit_in_bytes", base / path / "memory.usage_in_bytes"),
                     (base / "memory.limit_in_bytes", base / "memory.usage_in_bytes")]
            version = "v1"
        else:
            continue
        for limit_file, usage_file in files:
            try:
                limit_text, usage = limit_file.read_text().strip(), int(usage_file.read_text())
            except (OSError, ValueError):
                continue
            if limit_text == "max" or int(limit_text) >= _UNLIMITED_V1:
                return None
            limit = int(limit_text)
            usage -= min(_inactive_file(limit_file.with_name("memory.stat"), version), usage)
            return FreeMemory(max(limit - usage, 0), f"cgroup {version} limit {limit / 2**20:.0f} MiB minus "
                                                     f"{usage / 2**20:.0f} MiB in use ({limit_file})")
    return None


def _inactive_file(stat: Path, version: str) -> int:
    """Bytes of the cgroup's file cache that the kernel reclaims first (``inactive_file`` in its
    ``memory.stat``; v1's hierarchical ``total_inactive_file``), which its usage counts but a new
    allocation can take: the cgroup's reading of the weights file is not memory the model lacks.
    The same working set as the kubelet's; 0 when the file is missing."""
    key = "total_inactive_file" if version == "v1" else "inactive_file"
    try:
        for line in stat.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0
