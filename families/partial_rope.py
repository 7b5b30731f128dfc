"""Partial RoPE laid out as RoPE over the whole head, so that its q/k channels prune as pairs.

A head of d channels whose first R turn (partial RoPE, rotate-half within them: channel i turns
with channel i + R/2 at frequency i) and whose other d - R pass unturned (Bamba's) computes the
same as a head whose d channels all turn rotate-half (channel i with i + d/2, at frequency i)
once its q and k channels are reordered so that the passing channels form pairs of their own,
and those pairs turn at frequency 0 (angle 0: cos 1, sin 0). Intake reorders the source model
this way (``turn_whole_heads``) and gives its rotary embedding the zero frequencies; every stage
after it sees heads with whole-head RoPE: calibration scores the passing pairs beside the turning
ones, sorting orders and prunes them alike, the runtime turns a passing pair at angle 0
(``whole_head_frequencies``), and the exports place each kept pair back where it came from
(``partial_heads_back`` for transformers; llama.cpp's interleaved layout needs no reorder, as pair
p goes to channels 2p and 2p + 1, inside the turning channels exactly when p < R/2).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .base import ATTENTION_KINDS, ATTN_K, ATTN_K_NORM, ATTN_Q, ATTN_Q_NORM, Family, rotated_channels

SLOTS = (ATTN_Q, ATTN_K)  # per-head rows; their norms' weights (per channel of a head) follow the same order


def whole_head_order(head_dim: int, rotated: int) -> torch.Tensor:
    """Channel order [d] of a head laid out for whole-head RoPE: channel c of the new layout is
    channel ``order[c]`` of the partial one (``rotated`` = R turning channels first). New pair
    j < R/2 is the turning pair (j, j + R/2); new pair j >= R/2 is the passing pair
    (R + j - R/2, R + (d - R)/2 + j - R/2)."""
    half, passing = rotated // 2, (head_dim - rotated) // 2
    return torch.cat((torch.arange(half), rotated + torch.arange(passing),
                      half + torch.arange(half), rotated + passing + torch.arange(passing)))


def whole_head_frequencies(inv_freq: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The frequencies [d/2] of every pair of a whole-head layout: ``inv_freq`` [R/2] of the
    turning pairs, then 0 for each passing pair (the same tensor where every channel turns)."""
    if 2 * inv_freq.shape[0] == head_dim:
        return inv_freq
    return torch.cat((inv_freq, inv_freq.new_zeros(head_dim // 2 - inv_freq.shape[0])))


def _head_rows(rows: int, order: torch.Tensor) -> torch.Tensor:
    """Row order of a projection of ``rows`` rows (whole heads of len(order) channels), each head reordered."""
    d = order.shape[0]
    return (torch.arange(rows // d)[:, None] * d + order).reshape(-1)


def _reordered(tensors: Mapping[str, torch.Tensor], config: Mapping, family: Family,
               inverse: bool) -> dict[str, torch.Tensor]:
    """The q/k rows (and biases, and q/k norm weights) of every attention block among ``tensors``
    (``family``'s names, full heads), each head's channels in the order ``whole_head_order`` lays
    them out (or, ``inverse``, back); none where RoPE turns whole heads or there is no attention."""
    kinds = family.layer_kinds(config)
    if not family.rotary or not any(kind in ATTENTION_KINDS for kind in kinds):
        return {}
    rotated, d = rotated_channels(config)
    if rotated == d:
        return {}
    order = whole_head_order(d, rotated)
    order = torch.argsort(order) if inverse else order
    out = {}
    for i, kind in enumerate(kinds):
        if kind not in ATTENTION_KINDS:
            continue
        for slot in SLOTS:
            for param in ("weight", "bias"):
                if (name := family.name_of(i, slot, param)) in tensors:
                    out[name] = tensors[name][_head_rows(tensors[name].shape[0], order)]
        for slot in (ATTN_Q_NORM, ATTN_K_NORM):
            if slot in family.parts and (name := family.name_of(i, slot)) in tensors:
                out[name] = tensors[name][order]
    return out


@torch.no_grad()
def turn_whole_heads(model: nn.Module, family: Family) -> nn.Module:
    """``model`` (a transformers model of ``family``) with partial-RoPE heads laid out for
    whole-head RoPE, in place: q/k rows (and biases, and q/k norm weights) of every attention
    block reordered by ``whole_head_order``, and each rotary embedding's frequencies extended with
    zeros (``whole_head_frequencies``); it computes the same. A model whose RoPE turns whole
    heads, or without attention, is returned as it is."""
    from ..families import config_dict

    config = config_dict(model.config)
    parameters = dict(model.named_parameters())
    moved = _reordered({name: p.data for name, p in parameters.items()}, config, family, inverse=False)
    if not moved:
        return model
    for name, t in moved.items():
        parameters[name].data = t
    rotated, d = rotated_channels(config)
    for module in model.modules():
        for name in ("inv_freq", "original_inv_freq"):
            t = getattr(module, name, None)
            if isinstance(t, torch.Tensor) and 2 * t.shape[-1] == rotated:
                setattr(module, name, whole_head_frequencies(t, d))
    return model


def partial_heads_back(state: Mapping[str, torch.Tensor], config: Mapping, family: Family) -> dict[str, torch.Tensor]:
    """The inverse of ``turn_whole_heads`` on a state dict of ``family``'s names at full head
    size: q/k rows (biases, norm weights) of every attention block back in the partial-RoPE
    layout that transformers' model of ``config`` computes with."""
    return {**state, **_reordered(state, config, family, inverse=True)}
