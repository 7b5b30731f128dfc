"""GPTQ on the GGUF Q4_0 (or Q8_0) grid, visiting a matrix's input columns in a chosen order of whole blocks.

GPTQ quantizes one input column at a time and spreads its error, weighted by the inverse
Hessian H = X^T X of the layer's inputs, over the columns not yet quantized. The order decides
where that compensation lands. The sorted model keeps a prefix of every pruned input axis at
every rate. The forward order (the default) quantizes that prefix first, so every rate's columns
compensate each other and their errors flow into the tail that only larger rates keep. Visiting
the least important columns first instead lets the tail's errors flow into the prefix, as the
original design proposed (docs/architecture.md); but at a pruned rate that tail is gone, and the
prefix keeps corrections for errors that no longer exist. Measured on SmolLM2
(benchmarks/results/quantization.md), it is never better than forward and up to 0.04 nats worse.
Each block of 32 columns gets its fp16 scale when its first column is reached, from the weights
as updated so far, so orders are made of whole blocks.
"""

from __future__ import annotations

import torch

from .. import ElastiqError
from ..quants import (BLOCK, FORMATS, Quantized, pack, q4_0_codes, q4_0_scales, q8_0_codes, q8_0_round, q8_0_scales,
                      round_to_grid)

ORDERS = ("forward", "least-important-first")  # for input axes that pruning cuts; the first is the default


def sorted_axis_order(in_features: int, heads: int = 1, least_important_first: bool = True) -> torch.Tensor:
    """Column order of whole 32-blocks for an input axis that pruning cuts: ``heads`` runs of a
    sorted axis (index 0 most important), as the down projection (one run) or the attention output (one per query head).
    Least important first: rank blocks from last to first, every head's block of a rank before
    the next rank; otherwise the forward order."""
    if in_features % (heads * BLOCK):
        raise ElastiqError(f"an input axis of {in_features} is not {heads} head(s) of whole {BLOCK}-blocks")
    columns = torch.arange(in_features)
    if not least_important_first:
        return columns
    return columns.view(heads, -1, BLOCK).flip(1).flip(-1).transpose(0, 1).flatten()


def act_order(hessian: torch.Tensor) -> torch.Tensor:
    """Column order of whole 32-blocks for an input axis every rate keeps (the hidden axis): the
    blocks with the most input energy (diag H) first, so others can absorb their error (GPTQ's
    act-order, at block granularity)."""
    blocks = torch.arange(hessian.shape[0], device=hessian.device).view(-1, BLOCK)
    energy = hessian.diagonal().view(-1, BLOCK).sum(-1)
    return blocks[energy.argsort(descending=True, stable=True)].flatten()


# Each format's grid: fp16 block scales of weights, and the dequantized value of a column on it.
GRIDS = {"q4_0": (q4_0_scales, lambda w, d: d.float() * (round_to_grid(w, d) - 8)),
         "q8_0": (q8_0_scales, lambda w, d: d.float() * q8_0_round(w, d))}


def gptq(weight: torch.Tensor, hessian: torch.Tensor, order: torch.Tensor, damp: float = 0.01,
         batch: int = 128, fmt: str = "q4_0") -> Quantized:
    """Quantize ``weight`` [out, in] to ``fmt`` ("q4_0" or "q8_0") given ``hessian`` [in, in] (sum of
    x x^T over calibration inputs), visiting columns in ``order``, on ``weight``'s device."""
    if fmt not in GRIDS:
        raise ElastiqError(f"GPTQ quantizes to {' or '.join(GRIDS)}, not {fmt!r}")
    block_scales_of, on_grid = GRIDS[fmt]
    n = weight.shape[1]
    if hessian.shape != (n, n) or sorted(order.tolist()) != list(range(n)):
        raise ElastiqError(f"GPTQ needs a [{n}, {n}] Hessian and a permutation of the {n} input columns")
    if n % BLOCK or batch % BLOCK or not torch.equal(order.view(-1, BLOCK) // BLOCK,
                                                      (order.view(-1, BLOCK)[:, :1] // BLOCK).expand(-1, BLOCK)):
        raise ElastiqError(f"GPTQ's column order must visit whole {BLOCK}-column blocks one after another")
    order = order.to(weight.device)
    w = weight.float()[:, order].clone()
    h = hessian.double().to(weight.device)[order][:, order].clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * h.diagonal().mean() * torch.eye(n, dtype=h.dtype, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()

    quantized = torch.zeros_like(w)
    scales = torch.zeros(w.shape[0], n // BLOCK, dtype=torch.float16, device=w.device)
    for i1 in range(0, n, batch):
        i2 = min(i1 + batch, n)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(w.shape[0], i2 - i1, device=w.device), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if (i1 + i) % BLOCK == 0:
                d = block_scales_of(w1[:, i:i + BLOCK])[:, 0]
                scales[:, (i1 + i) // BLOCK] = d
            q = on_grid(w1[:, i], d)
            quantized[:, i1 + i] = q
            err = (w1[:, i] - q) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    natural = quantized[:, order.argsort()]
    block_scales = torch.empty_like(scales)
    block_scales[:, order.view(-1, BLOCK)[:, 0] // BLOCK] = scales
    codes = pack(q4_0_codes(natural, block_scales)) if fmt == "q4_0" else q8_0_codes(natural, block_scales)
    return FORMATS[fmt](codes, block_scales)
