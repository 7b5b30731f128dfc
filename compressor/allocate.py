"""Allocation: the kept width of every group at every offered rate.

A rate is the fraction of prunable parameters removed. With ``influence`` allocation, block i is
pruned in proportion to exp(-z_i / temperature), z_i its block influence 1 - cos(input, output)
standardized over blocks, so blocks that change their input least lose most; the proportions are
parameter-weighted so that the total removed is the rate; within a block each group is cut by
the block's ratio times its kind's weight (``DEFAULT_KIND_WEIGHTS``: V/O kept whole, rotary pairs
at half the ratio, all rescaled so that the rate is met), rounded to its granularity, and the
rounding is balanced over each kind of group (the largest-remainder rule), so that a coarse group
(a head dimension of 64 that moves in halves) is cut in the most pruned blocks and kept in the
others in the proportion the rate asks, instead of in all blocks or in none. ``uniform`` cuts
every block alike, each group to the width nearest its kind's ratio, where the rate can be met
so; where it cannot (a Mamba2's P of 64 moves in halves), its rounding is balanced as above.
What rounding leaves is then taken up one step of each block's finest group (a rotary pair, a
state) at a time, across blocks in influence order.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from .. import ElastiqError
from ..checkpoint import Checkpoint, Group, RateSpec
from ..manifest import KINDS, QK, VO

ALLOCATIONS = ("influence", "uniform")
MAX_RATE = 0.9
TOLERANCE = 0.01  # achieved rate within one percentage point of the requested one
# Each kind's share of the pruning, relative to the MLP channels' (kinds not named: 1). Measured on
# SmolLM2-135M and Qwen2.5-Coder-1.5B (benchmarks/results/allocation_kinds.md,
# kind_weights_qwen2.5-coder-1.5b.md): per parameter removed, a V/O rank costs several times the KL
# of an MLP channel or a rotary pair, so V/O is kept whole and the rotary pairs take half their
# block's ratio.
DEFAULT_KIND_WEIGHTS = {QK: 0.5, VO: 0.0}


def default_kind_weights() -> dict[str, float]:
    """A fresh copy of ``DEFAULT_KIND_WEIGHTS`` (read when called, so that one name sets the default)."""
    return dict(DEFAULT_KIND_WEIGHTS)


def parse_kind_weights(text: str) -> dict[str, float]:
    """``--kind-weights``' form: comma-separated KIND=WEIGHT, or ``none`` for every kind at 1."""
    if text.strip() == "none":
        return {}
    weights = {}
    for item in (i.strip() for i in text.split(",") if i.strip()):
        kind, _, value = item.partition("=")
        try:
            weights[kind.strip()] = float(value)
        except ValueError:
            raise ElastiqError(f"kind weights are comma-separated KIND=WEIGHT like qk=0.5,vo=0, got {item!r}") from None
    return weights


def check_kind_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """``weights`` as a plain dict, each a known kind of group with a finite weight >= 0."""
    for kind, weight in weights.items():
        if kind not in KINDS:
            raise ElastiqError(f"unknown kind of group {kind!r} in the kind weights; known: {', '.join(KINDS)}")
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            raise ElastiqError(f"the weight of {kind} must be a finite number >= 0 (0: never pruned), got {weight!r}")
    return {k: float(w) for k, w in weights.items()}


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


def _nearest(g: Group, kept: float) -> int:
    """The allowed width of ``g`` nearest ``kept`` (its full width, or a multiple of its granularity)."""
    if g.width <= g.granularity:
        return g.width
    return int(min(g.width, max(_min_width(g), round(kept / g.granularity) * g.granularity)))


def _ceil(g: Group, kept: float) -> int:
    """The allowed width of ``g`` at or above ``kept`` (its full width, or a multiple of its granularity)."""
    if g.width <= g.granularity:
        return g.width
    return int(min(g.width, max(_min_width(g), math.ceil(kept / g.granularity - 1e-9) * g.granularity)))


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


def group_ratios(layers: Sequence[Sequence[Group]], unit: Mapping[str, int], block_ratios: Sequence[float],
                 rate: float, kind_weights: Mapping[str, float] | None = None) -> dict[str, float]:
    """Each group's prune ratio: its block's ratio times its kind's weight (1 for a kind not named),
    all scaled by one factor so that the parameters removed are ``rate`` of the total, each capped
    at 0.9. A kind of weight 0 is not pruned; without weights every group takes its block's ratio."""
    weights = {g.name: (kind_weights or {}).get(g.kind, 1.0) * block_ratios[i]
               for i, layer in enumerate(layers) for g in layer}
    params = {g.name: g.width * unit[g.name] for layer in layers for g in layer}
    target = rate * sum(params.values())

    def removed(scale: float) -> float:
        return sum(min(MAX_RATE, scale * weights[n]) * params[n] for n in params)

    if not kind_weights:
        return {n: min(MAX_RATE, w) for n, w in weights.items()}
    if removed(1e6) < target:
        raise ElastiqError(f"rate {rate} cannot be met with kind weights {dict(kind_weights)}: the kinds they "
                           f"leave prunable hold too few parameters")
    low, high = 0.0, 1.0
    while removed(high) < target:
        high *= 2
    for _ in range(60):  # bisection: removed() is continuous and non-decreasing in the scale
        mid = (low + high) / 2
        low, high = (mid, high) if removed(mid) < target else (low, mid)
    return {n: min(MAX_RATE, high * w) for n, w in weights.items()}


def allocate(layers: Sequence[Sequence[Group]], unit: Mapping[str, int], rates: Sequence[float],
             influence: Sequence[float] | None = None, temperature: float = 2.0,
             kind_weights: Mapping[str, float] | None = None) -> list[RateSpec]:
    """Widths for every rate (rate 0 included); ``influence`` None means uniform allocation;
    ``kind_weights`` scales each kind of group's share of the pruning (``group_ratios``)."""
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
        blocks = layer_ratios(scores, layer_params, rate, temperature) if influence is not None \
            else [rate] * len(layers)
        ratios = group_ratios(layers, unit, blocks, rate, kind_weights)
        candidates = [lambda: _round_by_kind(layers, unit, ratios, rate * total)]
        if influence is None:  # every block alike first: one width per kind (then one llama.cpp width)
            candidates.insert(0, lambda: {g.name: _nearest(g, (1 - ratios[g.name]) * g.width) for g in groups})
        for candidate in candidates:
            widths = candidate()
            _take_up_rounding(layers, unit, widths, rate * total, by_influence)
            achieved = sum((g.width - widths[g.name]) * unit[g.name] for g in groups) / total
            if abs(achieved - rate) <= TOLERANCE:
                break
        else:
            raise ElastiqError(f"rate {rate} cannot be met at this model's granularity (closest: {achieved:.3f})")
        key = tuple(widths.values())
        if key in seen:
            raise ElastiqError(f"rates {seen[key]} and {rate} give the same widths at this model's granularity; "
                               "offer rates further apart")
        seen[key] = rate
        specs.append(RateSpec(rate, widths))
    return specs


def allocate_checkpoint(ckpt: Checkpoint, rates: Sequence[float],
                        kind_weights: Mapping[str, float] | None = None) -> list[RateSpec]:
    """Widths for ``rates`` (rate 0 included) over ``ckpt``'s groups, by the allocation, block
    influence and kind weights its compression recorded (``kind_weights`` given: those instead):
    what compressing it again with these rates would offer."""
    layers = sorted({g.layer for g in ckpt.groups})
    by_layer = [[g for g in ckpt.groups if g.layer == i] for i in layers]
    unit = checkpoint_units(ckpt)
    record = ckpt.source.record
    compression = record.get("compression", {})
    influence = record.get("block_influence") if compression.get("allocation", "influence") == "influence" else None
    weights = compression.get("kind_weights") if kind_weights is None else check_kind_weights(kind_weights)
    return allocate(by_layer, unit, rates, influence, compression.get("temperature", 2.0), weights)


def checkpoint_units(ckpt: Checkpoint) -> dict[str, int]:
    """Parameters one unit of each of ``ckpt``'s groups holds (``unit_params`` from its shapes)."""
    shapes = ckpt.full_shapes()
    return {g.name: sum(math.prod(shapes[n]) for n, role in g.members if role != "pairs") // g.width
            for g in ckpt.groups}


def pruned_shares(ckpt: Checkpoint, widths: Mapping[str, int]) -> dict[str, float]:
    """The share of each kind's parameters that ``widths`` (a rate's) removes from ``ckpt``'s groups."""
    unit, removed, total = checkpoint_units(ckpt), {}, {}
    for g in ckpt.groups:
        removed[g.kind] = removed.get(g.kind, 0) + (g.width - widths[g.name]) * unit[g.name]
        total[g.kind] = total.get(g.kind, 0) + g.width * unit[g.name]
    return {k: removed[k] / total[k] for k in total}


def _round_by_kind(layers: Sequence[Sequence[Group]], unit: Mapping[str, int], ratios: Mapping[str, float],
                   target: float) -> dict[str, int]:
    """Each group cut by its ratio (``group_ratios``), rounded to its granularity so that every kind
    of group loses, over all blocks, about the parameters its ratios ask of it: each group is first
    cut to the granule at or above its wanted width, then the groups that fell furthest short (in
    granules; the most pruned blocks, where widths are equal) are cut one granule more while that
    brings the kind's total nearer (the largest-remainder rule), unless the cut would overshoot
    ``target`` (parameters removed in all) by more than the blocks' finest groups can give back."""
    widths, short, by_kind = {}, {}, {}
    for layer in layers:
        for g in layer:
            wanted = ratios[g.name] * g.width
            widths[g.name] = _ceil(g, g.width - wanted)
            short[g.name] = wanted - (g.width - widths[g.name])  # units still wanted removed, >= 0
            by_kind.setdefault(g.kind, []).append(g)
    finest = [g for g in (_finest(layer, unit) for layer in layers) if g is not None]
    removed = sum((g.width - widths[g.name]) * unit[g.name] for layer in layers for g in layer)
    for groups in by_kind.values():
        remaining = sum(short[g.name] * unit[g.name] for g in groups)
        for g in sorted(groups, key=lambda g: -short[g.name] / g.granularity):
            step = g.granularity * unit[g.name]
            if remaining < step / 2:
                break
            give_back = sum((f.width - widths[f.name]) * unit[f.name] for f in finest if f is not g)
            if widths[g.name] - g.granularity < _min_width(g) or removed + step - target > give_back:
                continue
            widths[g.name] -= g.granularity
            remaining -= step
            removed += step
    return widths


def _finest(layer: Sequence[Group], unit: Mapping[str, int]) -> Group | None:
    """The group of a block that moves the fewest parameters per step (rotary pairs, states)."""
    return min(layer, key=lambda g: g.granularity * unit[g.name], default=None)


def _take_up_rounding(layers: Sequence[Sequence[Group]], unit: Mapping[str, int], widths: dict[str, int],
                      target: float, by_influence: Sequence[int]) -> None:
    """Move each block's finest group (rotary pairs where a family offers them) one step of its
    granularity at a time until the removed parameters are nearest ``target``: removing from the
    least influential blocks first, adding back to the most influential."""
    finest = [_finest(layer, unit) for layer in layers]
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
