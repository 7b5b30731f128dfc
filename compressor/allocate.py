"""Allocation: the kept width of every group at every offered rate.

A rate is the fraction of prunable parameters removed. With ``influence`` allocation, block i is
pruned in proportion to exp(-z_i / temperature), z_i its block influence 1 - cos(input, output)
standardized over blocks, so blocks that change their input least lose most; the proportions are
parameter-weighted so that the total removed is the rate. ``uniform`` prunes every block by the
rate. Within a block every group is cut by the block's ratio, rounded to its granularity; the
rounding error is then taken up one rotary pair at a time (the finest step), across blocks in
influence order.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from .. import ElastiqError
from ..checkpoint import Group, RateSpec

ALLOCATIONS = ("influence", "uniform")
MAX_RATE = 0.9
TOLERANCE = 0.01  # achieved rate within one percentage point of the requested one


def check_rates(rates: Sequence[float]) -> list[float]:
    """Sorted unique rates, each in [0, 0.9); rate 0 (the full model) is always offered."""
    for r in rates:
        if not 0 <= r < MAX_RATE:
            raise ElastiqError(f"rate {r} is outside [0, {MAX_RATE}); a rate is the fraction of prunable "
                               "parameters removed")
    return sorted(set(rates) | {0.0})


def unit_params(model: torch.nn.Module, group: Group) -> int:
    """Parameters one unit of ``group`` holds, over all its member tensors."""
    return sum(model.get_parameter(name).numel() for name, role in group.members if role != "pairs") // group.width


def _min_width(g: Group) -> int:
    return min(g.granularity, g.width)


def _round(g: Group, kept: float) -> int:
    if g.width <= g.granularity:
        return g.width
    return int(min(g.width, max(_min_width(g), round(kept / g.granularity) * g.granularity)))


def layer_ratios(influence: Sequence[float], layer_params: Sequence[int], rate: float,
                 temperature: float = 2.0) -> list[float]:
    """Per-block prune ratios averaging ``rate`` over parameters; lower influence, more pruning."""
    x = torch.tensor(influence, dtype=torch.float64)
    z = (x - x.mean()) / x.std() if len(x) > 1 and x.std() > 0 else torch.zeros_like(x)
    w = torch.exp(-z / temperature)
    params = torch.tensor(layer_params, dtype=torch.float64)
    ratios = rate * w * params.sum() / (w * params).sum()
    # A block keeps at least one granule of each group: clip and hand the excess to the others.
    for _ in range(len(x)):
        over = ratios > MAX_RATE
        if not over.any():
            break
        excess = ((ratios[over] - MAX_RATE) * params[over]).sum()
        ratios[over] = MAX_RATE
        free = ~over & (ratios < MAX_RATE)
        ratios[free] += excess * ratios[free] / (ratios[free] * params[free]).sum()
    return ratios.tolist()


def allocate(layers: Sequence[Sequence[Group]], unit: Mapping[str, int], rates: Sequence[float],
             influence: Sequence[float] | None = None, temperature: float = 2.0) -> list[RateSpec]:
    """Widths for every rate (rate 0 included); ``influence`` None means uniform allocation."""
    rates = check_rates(rates)
    groups = [g for layer in layers for g in layer]
    total = sum(g.width * unit[g.name] for g in groups)
    layer_params = [sum(g.width * unit[g.name] for g in layer) for layer in layers]
    scores = influence if influence is not None else [0.0] * len(layers)
    by_influence = sorted(range(len(layers)), key=lambda i: scores[i])
    specs, seen = [], {}
    for rate in rates:
        if rate == 0:
            specs.append(RateSpec(0.0, {g.name: g.width for g in groups}))
            continue
        ratios = layer_ratios(scores, layer_params, rate, temperature) if influence is not None else [rate] * len(layers)
        widths = {g.name: _round(g, (1 - ratios[i]) * g.width) for i, layer in enumerate(layers) for g in layer}
        _take_up_rounding(layers, unit, widths, rate * total, by_influence)
        achieved = sum((g.width - widths[g.name]) * unit[g.name] for g in groups) / total
        if abs(achieved - rate) > TOLERANCE:
            raise ElastiqError(f"rate {rate} cannot be met at this model's granularity (closest: {achieved:.3f})")
        key = tuple(widths.values())
        if key in seen:
            raise ElastiqError(f"rates {seen[key]} and {rate} give the same widths at this model's granularity; "
                               "offer rates further apart")
        seen[key] = rate
        specs.append(RateSpec(rate, widths))
    return specs


def _take_up_rounding(layers: Sequence[Sequence[Group]], unit: Mapping[str, int], widths: dict[str, int],
                      target: float, by_influence: Sequence[int]) -> None:
    """Move each block's finest group (rotary pairs where a family offers them) one step of its
    granularity at a time until the removed parameters are nearest ``target``: removing from the
    least influential blocks first, adding back to the most influential."""
    finest = [min(layer, key=lambda g: g.granularity * unit[g.name], default=None) for layer in layers]
    removed = sum((g.width - widths[g.name]) * unit[g.name] for layer in layers for g in layer)
    while True:
        shrink = removed < target
        order = by_influence if shrink else list(reversed(by_influence))
        moved = False
        for i in order:
            g = finest[i]
            if g is None:
                continue
            step = unit[g.name] * g.granularity
            if not math.fabs(removed + (step if shrink else -step) - target) < math.fabs(removed - target):
                return
            w = widths[g.name] + (-g.granularity if shrink else g.granularity)
            if _min_width(g) <= w <= g.width:
                widths[g.name] = w
                removed += step if shrink else -step
                moved = True
        if not moved:
            return
