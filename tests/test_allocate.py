"""Allocation: every rate met within a point, widths on their granularity, influence steers pruning."""

from __future__ import annotations

import pytest

from elastiq import ElastiqError
from elastiq.checkpoint import MLP, QK, VO, Group
from elastiq.compressor.allocate import allocate, check_rates, layer_ratios

# Four blocks shaped like SmolLM2's (hidden 576, 9 heads, 3 KV heads, head 64, MLP 1536).
UNIT = {MLP: 3 * 576, QK: 3 * (2 * 3 + 2) * 576, VO: 3 * (1 + 3) * 576}
LAYERS = [[Group(MLP, i, 1536, 32, ()), Group(QK, i, 32, 1, ()), Group(VO, i, 64, 32, ())] for i in range(4)]
UNITS = {g.name: UNIT[g.kind] for layer in LAYERS for g in layer}
TOTAL = sum(g.width * UNITS[g.name] for layer in LAYERS for g in layer)


def removed(spec) -> float:
    return sum((g.width - spec.widths[g.name]) * UNITS[g.name] for layer in LAYERS for g in layer) / TOTAL


@pytest.mark.parametrize("influence", [None, [0.5, 0.1, 0.05, 0.2]])
def test_rates_are_met_on_the_granularity(influence):
    specs = allocate(LAYERS, UNITS, [0.15, 0.25, 0.35], influence)
    assert [s.rate for s in specs] == [0.0, 0.15, 0.25, 0.35]
    assert all(w == g.width for layer in LAYERS for g in layer for w in [specs[0].widths[g.name]])
    for spec in specs[1:]:
        assert removed(spec) == pytest.approx(spec.rate, abs=0.01)
        for layer in LAYERS:
            for g in layer:
                w = spec.widths[g.name]
                assert 0 < w <= g.width and (w == g.width or w % g.granularity == 0)


def test_less_influential_blocks_lose_more():
    spec = allocate(LAYERS, UNITS, [0.25], [0.5, 0.1, 0.05, 0.2])[1]
    kept = [sum(spec.widths[g.name] * UNITS[g.name] for g in layer) for layer in LAYERS]
    assert kept[2] < kept[1] < kept[3] < kept[0]


def test_uniform_cuts_every_block_alike():
    spec = allocate(LAYERS, UNITS, [0.25])[1]
    assert len({spec.widths[f"layers.{i}.mlp"] for i in range(4)}) == 1


def test_layer_ratios_average_the_rate_and_respect_the_cap():
    ratios = layer_ratios([0.9, 0.01, 0.01, 0.01], [1, 1, 1, 1], 0.8)
    assert max(ratios) <= 0.9 + 1e-9 and sum(ratios) / 4 == pytest.approx(0.8)


def test_rate_outside_range():
    with pytest.raises(ElastiqError, match=r"rate 0.9 is outside \[0, 0.9\)"):
        check_rates([0.5, 0.9])


def test_rates_too_close_for_the_granularity():
    coarse = [[Group(MLP, 0, 64, 32, ())]]
    with pytest.raises(ElastiqError, match="cannot be met at this model's granularity"):
        allocate(coarse, {"layers.0.mlp": 1}, [0.25])
    fine = [[Group(QK, 0, 100, 1, ())]]  # 0.25 and 0.252 both keep 75 pairs
    with pytest.raises(ElastiqError, match="rates 0.25 and 0.252 give the same widths"):
        allocate(fine, {"layers.0.qk": 1}, [0.25, 0.252])
