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
from .memory import SAFETY_MARGIN, Footprint, free_memory, return_freed_memory


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
