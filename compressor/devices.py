"""Where the compressor computes: ``--device cpu``, ``cuda`` (``cuda:N``) or ``auto``.

Every stage runs on one device per process: a block and its calibration activations are moved
there when the block is reached, statistics, Hessians and their factorizations are computed there
in float64 and float32 as on the CPU, and every tensor comes back to the CPU to be written. Under
torchrun each rank takes the GPU of its local rank (``LOCAL_RANK``), one GPU per rank. Random draws
(calibration windows, recovery's batches and rates) stay on the CPU, so a seed draws the same
data on every device; results then differ between devices only by the rounding of their kernels.
"""

from __future__ import annotations

import os
from typing import Mapping, TypeVar

import torch

from .. import ElastiqError

DEVICES = ("auto", "cpu", "cuda")  # and cuda:N
T = TypeVar("T")


def compute_device(name: str = "auto") -> torch.device:
    """The device ``name`` asks for: ``cpu``; ``cuda``, this rank's GPU (``LOCAL_RANK``, 0 outside
    torchrun); ``cuda:N``; or ``auto``, this rank's GPU where CUDA sees one, else the CPU."""
    if name == "cpu":
        return torch.device("cpu")
    index = None
    if name.startswith("cuda:"):
        index = name.removeprefix("cuda:")
        if not index.isdigit():
            raise ElastiqError(f"--device {name!r}: a GPU is named cuda:N, N its index (cuda:0, cuda:1, ...)")
        index = int(index)
    elif name not in DEVICES:
        raise ElastiqError(f"--device {name!r} is not a device the compressor runs on; accepted: "
                           f"{', '.join(DEVICES)} or cuda:N")
    if not torch.cuda.is_available():
        if name == "auto":
            return torch.device("cpu")
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
        raise ElastiqError(f"--device {name}: this process sees no CUDA device (torch {torch.__version__}, {built}); "
                           "compress with --device cpu, or --device auto to use a GPU where there is one")
    count = torch.cuda.device_count()
    if index is None:
        index = int(os.environ.get("LOCAL_RANK", "0"))
    if index >= count:
        raise ElastiqError(f"--device {name}: GPU {index} asked for, this process sees {count} "
                           f"(cuda:0 .. cuda:{count - 1}); under torchrun, launch at most {count} ranks a node")
    return torch.device("cuda", index)


def to_device(tensors: Mapping[str, T], device: torch.device | str) -> dict[str, T]:
    """``tensors`` (tensors, or quantized matrices with a ``to``) on ``device``; tensors that are
    one object (a tied head and its embedding) stay one."""
    moved: dict[int, T] = {}
    out = {}
    for name, t in tensors.items():
        if id(t) not in moved:
            moved[id(t)] = t.to(device)
        out[name] = moved[id(t)]
    return out
