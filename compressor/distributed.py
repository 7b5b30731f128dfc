"""Compression across processes, on torch.distributed.

Launched with ``torchrun`` (or ``accelerate launch``), every rank draws the same calibration
windows and runs its share of them: chunk c of the windows belongs to rank c mod world size.
Chunks are run in rounds (round k holds chunks kW .. kW + W - 1), and after each round every rank
receives every rank's per-chunk statistics and adds them in chunk order: the same float64 sums, in
the same order, as one process makes, so the checkpoint is the single-process one bit for bit (the
per-chunk statistics themselves depend only on the chunk). Rank 0 sorts, allocates and writes;
the others only run their chunks. Recovery is data-parallel: each rank takes its share of every
step's batch, and the LoRA gradients are averaged before the step (``average_gradients``).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

# A rank waits this long for the others (recovery and quantization run on rank 0 alone): well
# beyond any stage, where the default of 30 minutes is not.
TIMEOUT = timedelta(hours=48)


def world() -> tuple[int, int]:
    """This process's rank and the number of ranks: (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_environment() -> bool:
    """Join the process group a launcher describes (``WORLD_SIZE`` of 2 or more in the
    environment, as torchrun sets it), over gloo: statistics travel as CPU tensors. True when this
    process is one of several ranks."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=TIMEOUT)
    return True


def agree(value):
    """Rank 0's ``value``, on every rank (what the others pass is ignored)."""
    if world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def synchronize() -> None:
    """Wait until every rank is here."""
    if world()[1] > 1:
        dist.barrier()


def average_gradients(params: list[torch.Tensor]) -> None:
    """Average the gradients of ``params`` over the ranks, in one all-reduce (data parallelism:
    every rank then takes the same optimizer step and the weights stay the same everywhere)."""
    size = world()[1]
    grads = [p.grad for p in params if p.grad is not None]
    if size == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def my_chunks(count: int) -> list[int]:
    """The indices of the ``count`` calibration chunks this rank runs."""
    rank, size = world()
    return list(range(rank, count, size))


def rounds(count: int) -> int:
    """How many rounds ``count`` chunks take over all ranks."""
    return -(-count // world()[1])


def round_chunk(k: int, count: int) -> int | None:
    """The chunk this rank runs in round ``k`` (None when the last round has none for it)."""
    rank, size = world()
    c = k * size + rank
    return c if c < count else None


def gather_round(mine: dict[str, torch.Tensor] | None) -> list[dict[str, torch.Tensor]]:
    """Every rank's statistics of one round's chunk, in chunk order (ranks without a chunk in
    the round are left out). ``mine`` is this rank's: tensors by name; ranks may differ only in
    the sizes of a tensor's axes (a last, smaller chunk)."""
    rank, size = world()
    if size == 1:
        return [mine] if mine is not None else []
    described = [None] * size
    dist.all_gather_object(described, None if mine is None else {k: (tuple(v.shape), v.dtype) for k, v in mine.items()})
    present = [d for d in described if d is not None]
    out: list[dict[str, torch.Tensor] | None] = [None if d is None else {} for d in described]
    for key in sorted(present[0]):
        shapes = [d[key][0] for d in present]
        widest = tuple(max(s[i] for s in shapes) for i in range(len(shapes[0])))
        dtype = present[0][key][1]
        send = torch.zeros(widest, dtype=dtype)
        if mine is not None:
            if tuple(mine[key].shape) == widest:
                send = mine[key].contiguous()
            else:
                send[tuple(slice(0, n) for n in mine[key].shape)] = mine[key]
        received = [torch.empty(widest, dtype=dtype) for _ in range(size)]
        dist.all_gather(received, send)
        for r, d in enumerate(described):
            if d is not None:
                out[r][key] = received[r][tuple(slice(0, n) for n in d[key][0])]
    return [o for o in out if o is not None]
