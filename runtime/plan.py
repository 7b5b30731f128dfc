"""The rate to run: the least-pruned offered rate whose predicted footprint on the chosen backend
fits the memory there is (or a budget), within the quality floor; or the rate asked for."""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from .. import ElastiqError
from ..checkpoint import Checkpoint
from . import backends
from .floor import DEFAULT_MAX_KL, check_floor, quality_note, within_floor
from ..machine import free_memory, return_freed_memory
from .memory import SAFETY_MARGIN, Footprint


@dataclass(frozen=True)
class RatePlan:
    """The rate to load, every offered rate's predicted footprint, and why that rate."""

    rate: float
    footprints: list[Footprint]
    reason: str


def process_baseline() -> int:
    """This process's resident memory now, without what the heap kept from earlier work: what a
    rate's footprint is added to."""
    return_freed_memory()
    return psutil.Process().memory_info().rss


@torch.inference_mode()
def page_in_kernels(dtype: torch.dtype, int4: bool) -> None:
    """Run each kind of operation the torch runtime's forward pass runs, on tiny tensors, so that
    the code it pages in (torch's and oneDNN's kernels: 15-20 MB here, a tenth of a 4M-parameter
    model's process) is part of the baseline rather than missing from every footprint."""
    x, w = torch.randn(2, 8, 64, dtype=dtype), torch.randn(64, 64, dtype=dtype)
    y = torch.nn.functional.silu(torch.nn.functional.linear(x, w))
    torch.nn.functional.rms_norm(y, (64,)).float().softmax(-1).exp().cumsum(-1)
    torch.nn.functional.scaled_dot_product_attention(x[None], x[None], x[None])
    torch.nn.functional.conv1d(x.transpose(1, 2), torch.randn(64, 1, 4, dtype=dtype), groups=64)
    torch.bmm(x, x.transpose(1, 2))
    if int4:
        packed = torch._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (64, 64), dtype=torch.int32), 1)
        torch._weight_int4pack_mm_for_cpu(x[0].to(torch.bfloat16), packed, 32,
                                          torch.ones(2, 64, 2, dtype=torch.bfloat16))


def plan_rate(ckpt: Checkpoint, rate: float | None, ctx: int, dtype: torch.dtype, int4: bool,
              memory_budget: int | None = None, device: str | torch.device = "cpu",
              margin: float = SAFETY_MARGIN, backend: str = "torch", baseline: int | None = None,
              max_kl: float = DEFAULT_MAX_KL) -> RatePlan:
    """Pick the rate to run: ``rate`` when given (it must be offered), else the least-pruned rate
    whose predicted footprint fits ``memory_budget`` (bytes for the whole process) or, without one,
    this process's current memory plus ``margin`` of the free memory. Either way the rate must be
    within the quality floor ``max_kl`` (``floor``). ``backend`` is the runtime that
    will hold the rate: torch, or llama.cpp / onnxruntime on an export (``backends``), whose package
    is imported first so that it is part of the baseline. ``baseline`` is the process's memory
    before loading, measured here unless given."""
    runtime = backends.backend(backend)
    runtime.require()
    if baseline is None:
        if backend == "torch" and torch.device(device).type == "cpu":
            page_in_kernels(dtype, int4)
        baseline = process_baseline()
    footprints = [runtime.footprint(ckpt, r, ctx, baseline, dtype=dtype, int4=int4, device=device)
                  for r in ckpt.rates]
    if rate is not None:
        check_floor(ckpt, rate, max_kl)
        chosen = next(f for f in footprints if abs(f.rate - rate) < 1e-9)
        return RatePlan(chosen.rate, footprints, f"rate {rate} as asked (predicted {chosen.total / 2**20:.0f} MiB; "
                                                 f"{quality_note(ckpt, rate)})")
    if memory_budget is not None:
        budget, source = memory_budget, f"--memory-budget {memory_budget / 2**20:.0f} MiB"
    else:
        free = free_memory(device)
        budget = baseline + int(free.bytes * margin)
        source = (f"{free.bytes / 2**20:.0f} MiB free ({free.source}) x margin {margin} + "
                  f"{baseline / 2**20:.0f} MiB this process holds")
    fitting = [f for f in sorted(footprints, key=lambda f: f.rate) if f.total <= budget]
    if not fitting:
        table = ", ".join(f"rate {f.rate}: {f.total / 2**20:.0f} MiB" for f in footprints)
        raise ElastiqError(f"no offered rate fits the budget of {budget / 2**20:.0f} MiB ({source}); the rates need "
                           f"{table}. Free memory, shorten --ctx, or pass --rate / --memory-budget")
    good = [f for f in fitting if within_floor(ckpt, f.rate, max_kl)]
    if not good:
        below = "; ".join(f"rate {f.rate} ({quality_note(ckpt, f.rate)})" for f in fitting)
        raise ElastiqError(f"the rates that fit the budget of {budget / 2**20:.0f} MiB ({source}) are below the "
                           f"quality floor of {max_kl} nats of KL to the dense model: {below}. Free memory, shorten "
                           "--ctx, or pass --max-kl inf to accept a lower-quality rate")
    chosen = good[0]
    reason = f"rate {chosen.rate}: the least-pruned rate whose predicted {chosen.total / 2**20:.0f} MiB fits " \
             f"the budget of {budget / 2**20:.0f} MiB ({source}); {quality_note(ckpt, chosen.rate)}"
    if chosen is not min(footprints, key=lambda f: f.rate):
        skipped = [f for f in footprints if f.rate < chosen.rate]
        reason += "; " + ", ".join(f"rate {f.rate} needs {f.total / 2**20:.0f} MiB" for f in skipped)
    return RatePlan(chosen.rate, footprints, reason)
