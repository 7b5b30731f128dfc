"""Compression across processes, on torch.distributed.

Launched with ``torchrun`` (or ``accelerate launch``), every rank draws the same calibration
windows and runs its share of them: chunk c of the windows belongs to rank c mod world size.
Chunks are run in rounds (round k holds chunks kW .. kW + W - 1), and after each round the
running total of the statistics goes round the ranks, each adding its chunk (``reduce_round``):
the same float64 sums, in the same order, as one process makes, so the statistics are the
single-process ones bit for bit (the per-chunk statistics themselves depend only on the chunk),
and so is the checkpoint, as rank 0 sorts on the one process's number of threads
(``one_process_threads``: LAPACK's eigen-decompositions depend on it). Rank 0 sorts, allocates
and writes; the others only run their chunks. Recovery is data-parallel: each rank takes its
share of every step's batch, and the LoRA gradients are averaged before the step
(``average_gradients``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from contextlib import contextmanager
from datetime import timedelta
from functools import cache
from typing import Iterator

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


# torch's intra-op thread count in a new process; ``-c`` would put the working folder first on the
# path, where a folder of the same name as a package imported by torch would shadow it
_THREADS_PROBE = "import sys; sys.path[:] = [p for p in sys.path if p]; import torch; print(torch.get_num_threads())"


@cache
def one_process_thread_count() -> int:
    """The intra-op thread count torch takes by default in a one-process run started from this
    process's environment, less the ``OMP_NUM_THREADS=1`` that torchrun gives each rank.

    torch's default (``at::init_num_threads``) is, on builds with MKL and OpenMP (x86 Linux
    wheels), ``mkl_get_max_threads()``: the physical cores in the CPU affinity, or
    ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` where set, but never more than those cores; other
    builds count the physical cores (cpuinfo). Inside a rank that variable is already read, so
    the count is asked of a new Python process with the rank's environment (affinity, cgroup,
    ``MKL_NUM_THREADS``) but without it: torch itself answers, on any build, in about 2 s, once.
    torchrun sets ``OMP_NUM_THREADS=1`` only where it is unset, so any other value is the user's
    and stays; a user's own 1 cannot be told from torchrun's and is dropped too. Where the child
    fails, the present count stands (with a warning)."""
    env = dict(os.environ)
    if env.get("OMP_NUM_THREADS") == "1":
        del env["OMP_NUM_THREADS"]
    try:
        done = subprocess.run([sys.executable, "-c", _THREADS_PROBE], env=env, capture_output=True, text=True,
                              timeout=300, check=True)
        return int(done.stdout.split()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as err:
        warnings.warn(f"elastiq: could not learn a one-process run's thread count ({err}); rank 0 sorts on "
                      f"{torch.get_num_threads()}, and the checkpoint may differ from a one-process run's in the "
                      "last bits")
        return torch.get_num_threads()


@contextmanager
def one_process_threads() -> Iterator[None]:
    """Run the body on the thread count a one-process run would use (``one_process_thread_count``),
    then go back to the rank's own; outside a run of several ranks, nothing changes.

    For rank 0's sorting. torchrun runs each rank on one thread (``OMP_NUM_THREADS=1``, so that
    the ranks' calibration chunks do not fight over the cores), and LAPACK's eigen-decompositions,
    SVDs and Cholesky factors give other bits on another number of threads: sorted on one thread,
    a 1B model's V/O weights (and at times even a 64-wide test model's) differ from a one-process
    run's in the last bits, though the statistics are the same. On the one process's count (set
    by ``torch.set_num_threads``, which gives the bits of torch's default count), the checkpoint
    is that run's, bit for bit. It is faster too: while rank 0 sorts, the other ranks run their
    next block's first chunk, then wait for it."""
    count, before = (one_process_thread_count(), torch.get_num_threads()) if world()[1] > 1 else (0, 0)
    if count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


PIECE = 2 ** 26  # elements per message: a float64 Gram matrix of a 70B model's MLP is 6 GiB


def add_chunk(total: dict, stats: dict[str, torch.Tensor], concatenated: frozenset[str]) -> None:
    """Add one chunk's ``stats`` to the running ``total``: summed, or appended to a list for the
    names in ``concatenated``."""
    for key, value in stats.items():
        if key in concatenated:
            total.setdefault(key, []).append(value)
        elif key in total:
            total[key] += value
        else:
            total[key] = value  # the chunk's own tensor: its producer makes a new one for the next chunk


def reduce_round(mine: dict[str, torch.Tensor] | None, total: dict, present: int,
                 concatenated: frozenset[str] = frozenset()) -> None:
    """Add a round's chunk statistics to rank 0's running ``total`` in chunk order, along a ring:
    rank 0 adds its chunk and passes the total to rank 1, which adds its own and passes it on,
    and the last rank with a chunk in the round (``present`` of them) gives it back to rank 0.
    Every rank holds the total and its own chunk, two sets of statistics, however many ranks
    there are; the additions are the ones one process makes, in its order. ``total`` is filled
    on rank 0 only."""
    rank, size = world()
    if rank == 0:
        if mine is not None:
            add_chunk(total, mine, concatenated)
        if present > 1:
            _send(total, 1)
            total.clear()  # it travels round the ring and comes back whole
            total.update(_recv(present - 1))
    elif rank < present:
        carried = _recv(rank - 1)
        add_chunk(carried, mine, concatenated)
        _send(carried, (rank + 1) % present)


def _send(total: dict, dst: int) -> None:
    """Send statistics (tensors, and lists of them) to rank ``dst``: their shapes and dtypes first."""
    tensors = {k: (v if isinstance(v, list) else [v]) for k, v in total.items()}
    described = {k: ([(tuple(t.shape), t.dtype) for t in v], isinstance(total[k], list)) for k, v in tensors.items()}
    dist.send_object_list([described], dst=dst)
    for key in sorted(tensors):
        for t in tensors[key]:
            for piece in t.contiguous().view(-1).split(PIECE):
                dist.send(piece.contiguous(), dst=dst)


def _recv(src: int) -> dict:
    """Receive statistics that ``_send`` sent from rank ``src``."""
    box = [None]
    dist.recv_object_list(box, src=src)
    out = {}
    for key in sorted(box[0]):
        shapes, listed = box[0][key]
        received = []
        for shape, dtype in shapes:
            t = torch.empty(shape, dtype=dtype)
            for piece in t.view(-1).split(PIECE):
                dist.recv(piece, src=src)
            received.append(t)
        out[key] = received if listed else received[0]
    return out


def shard_mesh(device: torch.device):
    """The ranks as one FSDP mesh on ``device`` (every rank must ask, together)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world()[1],))


def shard_model(model: torch.nn.Module, blocks: list[torch.nn.Module], mesh) -> None:
    """Shard ``model``'s parameters over the ranks of ``mesh`` (``shard_mesh``) with FSDP
    (``fully_shard``, one unit a block and the rest at the top), onto the mesh's device: this rank
    then keeps 1/W of every parameter, and gathers one block's whole while it computes it.
    Gradients are reduced (averaged) by FSDP. Nothing passes between the ranks here, so they may
    shard one after another."""
    from torch.distributed.fsdp import fully_shard

    for param in model.parameters():  # FSDP shards contiguous tensors only (a checkpoint's may be views)
        if not param.is_contiguous():
            param.data = param.data.contiguous()
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def whole(t: torch.Tensor) -> torch.Tensor:
    """A sharded parameter gathered whole (on every rank: every rank must ask, in one order), or
    ``t`` itself where it is not sharded."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def like(t: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value``, a whole tensor, laid out as ``t`` is: this rank's shard where ``t`` is sharded."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    return distribute_tensor(value.to(t.device), t.device_mesh, t.placements) if isinstance(t, DTensor) else value
