"""Sorting a Mamba2 mixer: order its two prunable axes by importance so that any rate keeps a prefix.

After UniQL's state-aware weight sorting for SSMs (enyac-group/UniQL, ``compress/compress_helpers.py``:
``ssd_state_aware_xo_compression``, ``ssd_BC_compression``). SSM heads are never pruned; the axes are

- the head dimension P, the same number of channels kept in every head: an order [H, P] per head
  (rows of ``ssm_in_z`` and ``ssm_in_x``, channels of ``ssm_conv1d_x``, the gated norm's weight
  ``ssm_norm``, input columns of ``ssm_out``);
- the state size N of every group, B and C sharing one order: [G, N] (rows of ``ssm_in_b`` and
  ``ssm_in_c``, channels of ``ssm_conv1d_b`` and ``ssm_conv1d_c``).

A mixer's tensors are given by their runtime names within its block (``modeling.model.mixer_widths``;
the block's norm ``attn_norm.weight``, if given, is not read); the calibration inputs are what
enters the mixer (after that norm).

Scores (``method``):

- ``uniql``: P channels by state-aware ridge leverage. The layer's own SSD computes, from the
  calibration inputs, the state S [P, N] that each chunk writes (dt with dt_bias ``ssm_dt`` and
  softplus, A = -exp(A_log), A_log being ``ssm_a``); head h's channels score
  diag(C (C + lambda I)^-1) of C = sum over (batch, chunk, state n) of S[:, n] S[:, n]^T [P, P].
  A channel counts for what it writes into the recurrent state, which every later token reads.
  N states by sum over the group's heads h of
  sqrt(E (dt_h B_n)^2) * sqrt(E C_n^2), B and C after conv1d and SiLU: how strongly a state is
  written times how strongly it is read.
- ``ridge``: P channels by the ridge leverage of the x channels themselves (after conv1d and SiLU,
  no state), N as ``uniql`` (the baseline that isolates the state-awareness).
- ``magnitude``: both axes by the L2 norm of each unit's weights.

Where this departs from UniQL's code: one P x P correlation per head (UniQL takes one over all
H*P channels, cross-head terms included, and selects within each head), lambda relative to the
mean eigenvalue (``ridge_leverage``; UniQL's is 1e-4 absolute), and dt in the N score is the
step the scan applies, softplus(dt + dt_bias), where UniQL's code uses the raw projection.

Permuting both axes by these orders never changes the mixer's function; ``sort_block`` permutes a
transformers model's block through its groups' storage layouts, as attention blocks are sorted.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .. import ElastiqError
from ..checkpoint import SSM_P, Group
from ..families import config_dict
from ..families.base import (SSM_CONV_B, SSM_CONV_C, SSM_CONV_X, SSM_IN_B, SSM_IN_C, SSM_IN_X, SSM_IN_Z,
                              SSM_NORM, SSM_OUT, Family, SSMConfig)
from ..modeling.model import SSMMixer, mixer_tensors
from ..modeling.ssm import chunk_states
from .calibrate import BlockStats
from .sort import permute_group, ridge_leverage

METHODS = ("uniql", "ridge", "magnitude")


def _mixer(weights: Mapping[str, torch.Tensor], config: SSMConfig) -> SSMMixer:
    """The mixer of a block's tensors (its norm, and a hybrid's MLP, left out)."""
    return SSMMixer(mixer_tensors(weights), config)


def _per_head_leverage(corr: torch.Tensor, ridge: float) -> torch.Tensor:
    """Ridge leverage of each head's [P, P] correlation."""
    return torch.stack([ridge_leverage(c, ridge) for c in corr]).float()


@torch.no_grad()
def state_aware_scores(weights: Mapping[str, torch.Tensor], config: SSMConfig, hidden: torch.Tensor,
                       ridge: float = 1.0) -> torch.Tensor:
    """UniQL's score [H, P] of each head's channels from calibration inputs ``hidden`` [b, T,
    hidden] (what enters the mixer): ridge leverage of the chunk states' per-head correlation."""
    mixer = _mixer(weights, config)
    s = mixer.scan_inputs(hidden)
    states = chunk_states(s.x, s.dt, mixer.A, s.B, config.chunk_size).double()  # [b, c, H, P, N]
    return _per_head_leverage(torch.einsum("bchpn,bchqn->hpq", states, states), ridge)


@torch.no_grad()
def channel_scores(weights: Mapping[str, torch.Tensor], config: SSMConfig, hidden: torch.Tensor,
                   ridge: float = 1.0) -> torch.Tensor:
    """The baseline [H, P]: ridge leverage of each head's x channels after conv1d and SiLU."""
    x = _mixer(weights, config).scan_inputs(hidden).x.double()  # [b, T, H, P]
    return _per_head_leverage(torch.einsum("bthp,bthq->hpq", x, x), ridge)


@torch.no_grad()
def state_scores(weights: Mapping[str, torch.Tensor], config: SSMConfig, hidden: torch.Tensor) -> torch.Tensor:
    """UniQL's score [G, N] of each group's states: sum over the group's heads h of
    sqrt(E (dt_h B_n)^2) * sqrt(E C_n^2), expectations over every calibration position."""
    s = _mixer(weights, config).scan_inputs(hidden)
    G = config.n_groups
    dt2 = s.dt.double().square().unflatten(-1, (G, -1))  # [b, T, G, heads of the group]
    written = torch.einsum("btgk,btgn->gkn", dt2, s.B.double().square()) / s.dt.shape[:2].numel()
    read = s.C.double().square().mean((0, 1))  # [G, N]
    return (written.sqrt() * read.sqrt()[:, None]).sum(1).float()


def magnitude_scores(weights: Mapping[str, torch.Tensor], config: SSMConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline: L2 norm of each unit's weights, P channels [H, P] (z and x rows, x convolution
    channel, gated norm weight where the mixer has one, output projection column) and N states
    [G, N] (B and C rows and their convolution channels)."""
    mixer = _mixer(weights, config)  # checks the shapes
    H, P, G, N = config.num_heads, mixer.head_dim, config.n_groups, mixer.state_size

    def square(slot: str, dims) -> torch.Tensor:  # per unit: the squared norm of its weights
        return weights[f"{slot}.weight"].double().square().sum(dims)

    channels = sum(square(slot, 1) for slot in (SSM_IN_Z, SSM_IN_X)) + square(SSM_CONV_X, (1, 2)) + square(SSM_OUT, 0)
    if f"{SSM_NORM}.weight" in weights:  # Falcon-H1's mixers are gated without a norm
        channels = channels + weights[f"{SSM_NORM}.weight"].double().square()
    states = sum(square(slot, 1) for slot in (SSM_IN_B, SSM_IN_C)) + \
        sum(square(slot, (1, 2)) for slot in (SSM_CONV_B, SSM_CONV_C))
    return channels.sqrt().view(H, P).float(), states.sqrt().view(G, N).float()


def orders(weights: Mapping[str, torch.Tensor], config: SSMConfig, hidden: torch.Tensor | None,
           method: str = "uniql", ridge: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Most important first: the order of each head's channels [H, P] and of each group's states
    [G, N] by ``method`` (``hidden``, the calibration inputs, may be None for ``magnitude``)."""
    if method not in METHODS:
        raise ValueError(f"unknown sorting method {method!r}; known: {', '.join(METHODS)}")
    if hidden is None and method != "magnitude":
        raise ValueError(f"sorting by {method!r} needs calibration inputs (the hidden states entering the mixer)")
    if method == "magnitude":
        p, n = magnitude_scores(weights, config)
    else:
        score = state_aware_scores if method == "uniql" else channel_scores
        p, n = score(weights, config, hidden, ridge), state_scores(weights, config, hidden)
    return p.argsort(dim=-1, descending=True, stable=True), n.argsort(dim=-1, descending=True, stable=True)


@torch.no_grad()
def sort_block(model: torch.nn.Module, family: Family, index: int, groups: list[Group], stats: BlockStats,
               method: str = "uniql", ridge: float = 1.0) -> None:
    """Sort the groups of SSM block ``index`` of the transformers model ``model`` in place (as
    ``sort.sort_block`` sorts an attention block): each head's channels and each group's states in
    the order of ``orders`` over the block's calibration inputs (``stats.ssm_input``)."""
    if method not in METHODS:
        raise ElastiqError(f"unknown sorting method {method!r} for a Mamba2 block; known: {', '.join(METHODS)}")
    prefix = f"{family.layers}.{index}."
    block = {name: t for name, t in model.state_dict().items() if name.startswith(prefix)}
    weights = {runtime.removeprefix(f"layers.{index}."): block[name]
               for name, runtime in family.runtime_names(block).items()}
    config = family.ssm_config(config_dict(model.config))
    channels, states = orders(weights, config, stats.ssm_input, method, ridge)
    for group in groups:
        permute_group(model, group, None, (channels if group.kind == SSM_P else states).T)
