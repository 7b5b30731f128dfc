"""GPTQ on the Q4_0 and Q8_0 grids: exact reduction to RTN, lower output error than RTN, orders of whole blocks."""

from __future__ import annotations

import pytest
import torch

from elastiq import ElastiqError
from elastiq.compressor.gptq import act_order, gptq, sorted_axis_order
from elastiq.quants import Q8Tensor, dequantize, quantize_q8_0, quantize_rtn


def _problem(out: int = 48, n: int = 128, samples: int = 1024, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) / n ** 0.5 + torch.eye(n)
    x = torch.randn(samples, n, generator=g) @ mix  # correlated inputs, as real activations are
    x[:, 5] *= 20  # one outlier channel
    return torch.randn(out, n, generator=g) * 0.05, x


def test_identity_hessian_gives_round_to_nearest():
    w, _ = _problem()
    t = gptq(w, torch.eye(128), sorted_axis_order(128))
    rtn_packed, rtn_scales = quantize_rtn(w)
    assert torch.equal(t.codes, rtn_packed) and torch.equal(t.scales, rtn_scales)
    t8, rtn8 = gptq(w, torch.eye(128), sorted_axis_order(128), fmt="q8_0"), quantize_q8_0(w)
    assert isinstance(t8, Q8Tensor) and torch.equal(t8.codes, rtn8.codes) and torch.equal(t8.scales, rtn8.scales)


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0"])
@pytest.mark.parametrize("order", ["forward", "act"])
def test_gptq_beats_rtn_on_the_output(order, fmt):
    w, x = _problem()
    h = x.T.double() @ x.double()
    columns = sorted_axis_order(128, least_important_first=False) if order == "forward" else act_order(h)
    q = gptq(w, h, columns, fmt=fmt).dequantize()
    rtn = dequantize(*quantize_rtn(w)) if fmt == "q4_0" else quantize_q8_0(w).dequantize()
    gptq_err = (x @ (w - q).T).square().sum()
    rtn_err = (x @ (w - rtn).T).square().sum()
    assert gptq_err < 0.5 * rtn_err  # measured: about 0.3
    if fmt == "q8_0":  # and 8 bits are far closer than 4
        assert gptq_err < 0.01 * (x @ (w - gptq(w, h, columns).dequantize()).T).square().sum()


def test_least_important_first_order_for_heads():
    order = sorted_axis_order(2 * 64, heads=2)  # two heads of rank 64: blocks (head, rank block)
    assert order[:32].tolist() == list(range(63, 31, -1))  # head 0, ranks 63..32
    assert order[32:64].tolist() == list(range(127, 95, -1))  # head 1, ranks 63..32
    assert order[64:96].tolist() == list(range(31, -1, -1))  # then rank block 0 of head 0
    assert sorted(order.tolist()) == list(range(128))


def test_act_order_visits_high_energy_blocks_first():
    h = torch.diag(torch.tensor([3.0] * 32 + [1.0] * 32 + [2.0] * 32))
    assert [int(c) // 32 for c in act_order(h)[::32]] == [0, 2, 1]


def test_orders_must_be_whole_blocks():
    w, x = _problem()
    with pytest.raises(ElastiqError, match="whole 32-column blocks"):
        gptq(w, torch.eye(128), torch.arange(128).roll(1))
    with pytest.raises(ElastiqError, match="q4_0 or q8_0, not 'q2_k'"):
        gptq(w, torch.eye(128), torch.arange(128), fmt="q2_k")
    with pytest.raises(ElastiqError, match="not 3 head"):
        sorted_axis_order(128, heads=3)
