"""Allocation: every rate met within a point, widths on their granularity, influence steers pruning."""

from __future__ import annotations

import pytest

from elastiq import ElastiqError
from elastiq.checkpoint import MLP, QK, SSM_N, SSM_P, VO, Group
from elastiq.compressor.allocate import allocate, check_kind_weights, check_rates, layer_ratios

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
    """One width per kind of group (but the finest, which takes up the rounding): llama.cpp's
    architectures of one MLP width then hold the export."""
    for spec in allocate(LAYERS, UNITS, [0.15, 0.25, 0.35])[1:]:
        for kind in (MLP, VO):
            assert len({spec.widths[f"layers.{i}.{kind}"] for i in range(4)}) == 1, (spec.rate, kind)


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


# Four Mamba2 blocks shaped like the stand-in of benchmarks/ssm_standin.py (hidden 256, 8 heads of
# P = 64 channels, 2 groups of N = 64 states, conv kernel 4): P moves in halves, N one state at a time.
SSM_UNIT = {SSM_P: 8 * (3 * 256 + 4 + 1 + 1), SSM_N: 2 * 2 * (256 + 4 + 1)}
SSM_LAYERS = [[Group(SSM_P, i, 64, 32, ()), Group(SSM_N, i, 64, 1, ())] for i in range(4)]
SSM_UNITS = {g.name: SSM_UNIT[g.kind] for layer in SSM_LAYERS for g in layer}


@pytest.mark.parametrize("influence", [[0.2, 0.2, 0.2, 0.2], [0.5, 0.1, 0.05, 0.2]])
def test_a_coarse_group_is_cut_in_some_blocks_not_in_none(influence):
    """At 15%, halving P in every block would remove too much, and keeping it everywhere would take
    the whole rate from the states: the rate is met with P halved in some blocks and N cut modestly.
    (Uniform allocation keeps every block alike where it meets the rate so, here by taking it from
    the states alone; see the next test.)"""
    total = sum(g.width * SSM_UNITS[g.name] for layer in SSM_LAYERS for g in layer)
    for spec in allocate(SSM_LAYERS, SSM_UNITS, [0.15, 0.25, 0.35], influence)[1:]:
        kept = {kind: [spec.widths[f"layers.{i}.{kind}"] for i in range(4)] for kind in (SSM_P, SSM_N)}
        removed = sum((g.width - spec.widths[g.name]) * SSM_UNITS[g.name] for layer in SSM_LAYERS for g in layer)
        assert removed / total == pytest.approx(spec.rate, abs=0.01)
        assert 32 in kept[SSM_P] and min(kept[SSM_N]) >= 32, (spec.rate, kept)
        if len(set(influence)) > 1:  # the halved blocks are the least influential
            halved = {i for i in range(4) if kept[SSM_P][i] == 32}
            assert halved == set(sorted(range(4), key=lambda i: influence[i])[:len(halved)])


def test_each_kind_loses_its_share_of_the_rate():
    """V/O (64 wide, cut in halves) is cut in about its share of the blocks at every rate, rather than
    in none at 15% and 25% (it used to be rounded per block, to the nearest half)."""
    layers = [[Group(g.kind, 4 * k + g.layer, g.width, g.granularity, ()) for g in layer]
              for k in range(3) for layer in LAYERS]  # 12 blocks of SmolLM2's shapes
    units = {g.name: UNIT[g.kind] for layer in layers for g in layer}
    for spec in allocate(layers, units, [0.15, 0.25, 0.35], [0.3, 0.1, 0.05, 0.2] * 3)[1:]:
        vo_cut = sum(64 - spec.widths[f"layers.{i}.{VO}"] for i in range(12)) / (12 * 64)
        assert vo_cut == pytest.approx(spec.rate, abs=32 / (12 * 64) / 2 + 1e-9)


def test_uniform_balances_only_where_blocks_alike_cannot_meet_the_rate():
    """Mamba2-370M's shapes (32 heads of P = 64, one group of N = 128, hidden 1024): its states hold
    too few parameters to take up a rate that P, moving in halves, cannot meet alike in every block,
    so uniform allocation halves P in some blocks; the stand-in's states can, so there it keeps
    every block's P and takes 15% from the states."""
    unit = {SSM_P: 32 * (3 * 1024 + 4 + 1 + 1), SSM_N: 2 * (1024 + 4 + 1)}
    layers = [[Group(SSM_P, i, 64, 32, ()), Group(SSM_N, i, 128, 1, ())] for i in range(4)]
    units = {g.name: unit[g.kind] for layer in layers for g in layer}
    spec = allocate(layers, units, [0.15])[1]
    assert {spec.widths[f"layers.{i}.{SSM_P}"] for i in range(4)} == {32, 64}
    standin = allocate(SSM_LAYERS, SSM_UNITS, [0.15])[1]
    assert {standin.widths[f"layers.{i}.{SSM_P}"] for i in range(4)} == {64}


@pytest.mark.parametrize("influence", [None, [0.5, 0.1, 0.05, 0.2]])
def test_a_kind_of_weight_zero_is_kept_whole_and_the_rate_still_met(influence):
    for spec in allocate(LAYERS, UNITS, [0.15, 0.25, 0.35], influence, kind_weights={VO: 0.0})[1:]:
        assert removed(spec) == pytest.approx(spec.rate, abs=0.01)
        assert all(spec.widths[f"layers.{i}.{VO}"] == 64 for i in range(4))


def test_kind_weights_set_each_kinds_share_of_the_pruning():
    """Uniform allocation with rotary pairs at half weight: the MLP loses about twice their share."""
    spec = allocate(LAYERS, UNITS, [0.25], kind_weights={QK: 0.5, VO: 0.0})[1]
    mlp = 1 - spec.widths["layers.0.mlp"] / 1536
    qk = 1 - sum(spec.widths[f"layers.{i}.{QK}"] for i in range(4)) / (4 * 32)
    assert removed(spec) == pytest.approx(0.25, abs=0.01)
    assert qk == pytest.approx(mlp / 2, abs=0.05), (mlp, qk)


def test_no_kind_weights_is_every_kind_at_one():
    rates = [0.15, 0.25, 0.35]
    assert allocate(LAYERS, UNITS, rates, [0.5, 0.1, 0.05, 0.2]) == \
        allocate(LAYERS, UNITS, rates, [0.5, 0.1, 0.05, 0.2], kind_weights={MLP: 1.0, QK: 1.0, VO: 1.0})


def test_a_rate_the_prunable_kinds_cannot_hold_is_refused():
    with pytest.raises(ElastiqError, match=r"rate 0.35 cannot be met with kind weights .*too few parameters"):
        allocate(LAYERS, UNITS, [0.35], kind_weights={MLP: 0.0, VO: 0.0})


@pytest.mark.parametrize("weights, message", [
    ({"attn": 1.0}, r"unknown kind of group 'attn' in the kind weights; known: mlp, qk, vo, ssm_p, ssm_n"),
    ({VO: -1.0}, r"the weight of vo must be a finite number >= 0 \(0: never pruned\), got -1.0"),
    ({QK: float("nan")}, r"the weight of qk must be a finite number >= 0"),
])
def test_bad_kind_weights_are_named(weights, message):
    with pytest.raises(ElastiqError, match=message):
        check_kind_weights(weights)
