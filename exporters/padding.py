"""Pruned units back at full width, as zeros: for exports whose format has one width per kind of
unit (one MLP width, one head size, one SSM inner and state size) where a rate has one per layer.
Quantized matrices move whole rows or 32-channel blocks of their codes; a zero block of Q4_0 holds
codes of 8 (w = d * (8 - 8) = 0 whatever the scale)."""

from __future__ import annotations

from typing import Mapping

import torch

from .. import ElastiqError
from ..families.base import (FFN_DOWN, FFN_GATE, FFN_UP, SSM_CONV_B, SSM_CONV_C, SSM_CONV_X, SSM_IN_B, SSM_IN_C,
                             SSM_IN_X, SSM_IN_Z, SSM_NORM, SSM_OUT)
from ..modeling.model import ModelArgs, SSMLayerArgs
from ..quants import BLOCK, Q8Tensor, QuantizedTensor

ZERO_CODES = 0x88  # two codes of 8: w = d * (8 - 8) = 0 whatever the scale
Weight = torch.Tensor | QuantizedTensor | Q8Tensor


def scatter_rows(t: Weight, index: torch.Tensor, total: int) -> Weight:
    """``t`` with row j moved to row ``index[j]`` of ``total`` rows; the other rows are zero."""
    if isinstance(t, (QuantizedTensor, Q8Tensor)):
        zero = ZERO_CODES if isinstance(t, QuantizedTensor) else 0
        codes = torch.full((total, *t.codes.shape[1:]), zero, dtype=t.codes.dtype)
        scales = torch.zeros((total, *t.scales.shape[1:]), dtype=t.scales.dtype)
        codes[index], scales[index] = t.codes, t.scales
        return type(t)(codes, scales)
    out = t.new_zeros((total, *t.shape[1:]))
    out[index] = t
    return out


def scatter_columns(t: Weight, index: torch.Tensor, total: int) -> Weight:
    """``t`` with input column j moved to column ``index[j]`` of ``total``; the others zero. A
    quantized matrix moves whole blocks, so ``index`` must map blocks of 32 onto blocks."""
    if not isinstance(t, (QuantizedTensor, Q8Tensor)):
        return scatter_rows(t.T, index, total).T.contiguous()
    blocks = index.view(-1, BLOCK)
    starts = blocks[:, 0]
    if (starts % BLOCK).any() or not torch.equal(blocks, starts[:, None] + torch.arange(BLOCK)):
        raise ElastiqError("a pruned input axis of a quantized matrix must keep whole blocks of 32 channels")
    moved = scatter_rows(type(t)(t.codes.movedim(1, 0), t.scales.T), starts // BLOCK, total // BLOCK)
    return type(t)(moved.codes.movedim(0, 1).contiguous(), moved.scales.T.contiguous())


def head_prefix(num_heads: int, kept: int, head_dim: int) -> torch.Tensor:
    """Full-size channel of each channel of ``num_heads`` heads that keep their first ``kept``."""
    return (torch.arange(num_heads)[:, None] * head_dim + torch.arange(kept)).reshape(-1)


def ssm_widest(weights: Mapping[str, Weight], args: ModelArgs,
               head_dim: int | None = None) -> tuple[dict[str, Weight], int, int]:
    """``weights`` (runtime names, one rate of a model with Mamba2 blocks: Mamba2's, or a hybrid's)
    with every Mamba2 block at the widest such block's channels per head P (or at ``head_dim``,
    where the format fixes the inner size: not below the widest) and states per group N, and those
    (P, N): for llama.cpp's ``mamba2``, ``nemotron_h``, ``granitehybrid`` and ``falcon-h1`` and
    transformers' stock configs, whose inner size and state size are one number each. Other blocks
    are left as they are.

    Zero states are exact: zero B and C rows (and conv1d channels and biases) leave a state never
    written and never read. Zero channels of a mixer gated without a norm (y * silu(z), as most
    Falcon-H1s are) are exact too. With a gated norm they are not quite: it averages y * silu(z) over
    each group's channels, zeros included, so a block widened from P' to P has its norm weight
    scaled by sqrt(P'/P), which restores the mean up to its epsilon (eps * P/P' in place of eps).
    The zeros are stored: a widened block saves no bytes in the file."""
    H, G = args.ssm.num_heads, args.ssm.n_groups
    mixers = {i: layer for i, layer in enumerate(args.layers) if isinstance(layer, SSMLayerArgs)}
    P, N = max(layer.head_dim for layer in mixers.values()), max(layer.state_size for layer in mixers.values())
    if head_dim is not None:
        if head_dim < P:
            raise ElastiqError(f"a Mamba2 block keeps {P} channels per head, more than the {head_dim} asked for")
        P = head_dim
    out = dict(weights)

    def widen(slots: tuple[str, ...], index: torch.Tensor, total: int, layer: int) -> None:
        for slot in slots:
            for kind in ("weight", "bias"):
                if (name := f"layers.{layer}.{slot}.{kind}") in out:
                    out[name] = scatter_rows(out[name], index, total)

    for i, layer in mixers.items():
        if layer.head_dim < P:
            index = head_prefix(H, layer.head_dim, P)
            norm = f"layers.{i}.{SSM_NORM}.weight"
            if norm in out:  # a mixer gated without a norm (Falcon-H1's) widens exactly
                out[norm] = out[norm] * (layer.head_dim / P) ** 0.5
            widen((SSM_IN_Z, SSM_IN_X, SSM_CONV_X, SSM_NORM), index, H * P, i)
            out[f"layers.{i}.{SSM_OUT}.weight"] = scatter_columns(out[f"layers.{i}.{SSM_OUT}.weight"], index, H * P)
        if layer.state_size < N:
            widen((SSM_IN_B, SSM_IN_C, SSM_CONV_B, SSM_CONV_C), head_prefix(G, layer.state_size, N), G * N, i)
    return out, P, N


def widest_mlp(weights: Mapping[str, Weight], widths: list[int], widest: int | None = None) -> dict[str, Weight]:
    """``weights`` (runtime names) with every block's MLP (of ``widths[i]`` channels) widened to the
    widest block's, or to ``widest``, by zero gate/up rows and down columns (silu(0) * 0 adds
    nothing): for an architecture whose MLP width is one number. Blocks without an MLP are left as
    they are. Costs the zero channels' bytes; the model is the same."""
    out, widest = dict(weights), max(widths) if widest is None else widest
    for i, m in enumerate(widths):
        if m < widest and f"layers.{i}.{FFN_DOWN}.weight" in out:
            kept = torch.arange(m)
            for slot in (FFN_GATE, FFN_UP):
                for kind in ("weight", "bias"):
                    if (name := f"layers.{i}.{slot}.{kind}") in out:
                        out[name] = scatter_rows(out[name], kept, widest)
            name = f"layers.{i}.{FFN_DOWN}.weight"
            out[name] = scatter_columns(out[name], kept, widest)
    return out
