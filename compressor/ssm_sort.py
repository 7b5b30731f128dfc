"""Sorting a Mamba2 mixer: order its two prunable axes by importance so that any rate keeps a prefix.

After UniQL's state-aware weight sorting for SSMs (enyac-group/UniQL, ``compress/compress_helpers.py``:
``ssd_state_aware_xo_compression``, ``ssd_BC_compression``). SSM heads are never pruned; the axes are

- the head dimension P, the same number of channels kept in every head: an order [H, P] per head
  (z and x rows of ``in_proj``, x channels of ``conv1d``, the gated norm's weight, ``out_proj``
  columns);
- the state size N of every group, B and C sharing one order: [G, N] (B and C rows of
  ``in_proj`` and their ``conv1d`` channels).

Scores (``method``):

- ``uniql``: P channels by state-aware ridge leverage. The layer's own SSD computes, from the
  calibration inputs, the state S [P, N] that each chunk writes (dt with dt_bias and softplus,
  A = -exp(A_log)); head h's channels score diag(C (C + lambda I)^-1) of C = sum over (batch,
  chunk, state n) of S[:, n] S[:, n]^T [P, P]. A channel counts for what it writes into the
  recurrent state, which every later token reads. N states by sum over the group's heads h of
  sqrt(E (dt_h B_n)^2) * sqrt(E C_n^2), B and C after conv1d and SiLU: how strongly a state is
  written times how strongly it is read.
- ``ridge``: P channels by the ridge leverage of the x channels themselves (after conv1d and SiLU,
  no state), N as ``uniql`` (the baseline that isolates the state-awareness).
- ``magnitude``: both axes by the L2 norm of each unit's weights.

Where this departs from UniQL's code: one P x P correlation per head (UniQL takes one over all
H*P channels, cross-head terms included, and selects within each head), lambda relative to the
mean eigenvalue (``ridge_leverage``; UniQL's is 1e-4 absolute), and dt in the N score is the
step the scan applies, softplus(dt + dt_bias), where UniQL's code uses the raw projection.

Permuting never changes the mixer's function (``permute``); ``prune`` keeps the first (P', N').
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..modeling.ssm import SSMConfig, SSMMixer, chunk_states, mixer_widths
from .sort import ridge_leverage

METHODS = ("uniql", "ridge", "magnitude")


def _per_head_leverage(corr: torch.Tensor, ridge: float) -> torch.Tensor:
    """Ridge leverage of each head's [P, P] correlation (on the CPU, where ``ridge_leverage`` works)."""
    return torch.stack([ridge_leverage(c, ridge) for c in corr.cpu()]).float()


@torch.no_grad()
def state_aware_scores(weights: Mapping[str, torch.Tensor], config: SSMConfig, hidden: torch.Tensor,
                       ridge: float = 1.0) -> torch.Tensor:
    """UniQL's score [H, P] of each head's channels from calibration inputs ``hidden`` [b, T,
    hidden] (what enters the mixer): ridge leverage of the chunk states' per-head correlation."""
    mixer = SSMMixer(weights, config)
    s = mixer.scan_inputs(hidden)
    states = chunk_states(s.x, s.dt, mixer.A, s.B, config.chunk_size).double()  # [b, c, H, P, N]
    return _per_head_leverage(torch.einsum("bchpn,bchqn->hpq", states, states), ridge)


@torch.no_grad()
def channel_scores(weights: Mapping[str, torch.Tensor], config: SSMConfig, hidden: torch.Tensor,
                   ridge: float = 1.0) -> torch.Tensor:
    """The baseline [H, P]: ridge leverage of each head's x channels after conv1d and SiLU."""
    x = SSMMixer(weights, config).scan_inputs(hidden).x.double()  # [b, T, H, P]
    return _per_head_leverage(torch.einsum("bthp,bthq->hpq", x, x), ridge)


@torch.no_grad()
def state_scores(weights: Mapping[str, torch.Tensor], config: SSMConfig, hidden: torch.Tensor) -> torch.Tensor:
    """UniQL's score [G, N] of each group's states: sum over the group's heads h of
    sqrt(E (dt_h B_n)^2) * sqrt(E C_n^2), expectations over every calibration position."""
    s = SSMMixer(weights, config).scan_inputs(hidden)
    G = config.n_groups
    dt2 = s.dt.double().square().unflatten(-1, (G, -1))  # [b, T, G, heads of the group]
    written = torch.einsum("btgk,btgn->gkn", dt2, s.B.double().square()) / s.dt.shape[:2].numel()
    read = s.C.double().square().mean((0, 1))  # [G, N]
    return (written.sqrt() * read.sqrt()[:, None]).sum(1).float()


def magnitude_scores(weights: Mapping[str, torch.Tensor], config: SSMConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline: L2 norm of each unit's weights, P channels [H, P] (z and x rows, conv1d
    channel, norm weight, out_proj column) and N states [G, N] (B and C rows and conv1d channels)."""
    widths = mixer_widths(weights, config)
    H, P, G, N = config.num_heads, widths.head_dim, config.n_groups, widths.state_size
    z, x, B, C, _ = weights["in_proj.weight"].double().square().sum(1).split([H * P, H * P, G * N, G * N, H])
    conv_x, conv_b, conv_c = weights["conv1d.weight"].double().square().sum((1, 2)).split([H * P, G * N, G * N])
    norm, out = weights["norm.weight"].double().square(), weights["out_proj.weight"].double().square().sum(0)
    channels = z + x + conv_x + norm + out
    states = B + C + conv_b + conv_c
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


def _select(weights: Mapping[str, torch.Tensor], config: SSMConfig, channel: torch.Tensor,
            state: torch.Tensor) -> dict[str, torch.Tensor]:
    """The mixer keeping, in this order, channels ``channel`` [H, P'] of every head and states
    ``state`` [G, N'] of every group (indices within a head, a group)."""
    widths = mixer_widths(weights, config)
    H, P, G, N = config.num_heads, widths.head_dim, config.n_groups, widths.state_size
    device = weights["out_proj.weight"].device
    channel, state = channel.to(device), state.to(device)
    x = (torch.arange(H, device=device)[:, None] * P + channel).flatten()  # into an [H*P] axis: z, x, y
    bc = (torch.arange(G, device=device)[:, None] * N + state).flatten()  # into a [G*N] axis: B, C
    conv = torch.cat([x, H * P + bc, H * P + G * N + bc])
    rows = torch.cat([x, H * P + conv, 2 * H * P + 2 * G * N + torch.arange(H, device=device)])  # z, (x, B, C), dt
    index = {"in_proj.weight": (0, rows), "in_proj.bias": (0, rows), "conv1d.weight": (0, conv),
             "conv1d.bias": (0, conv), "norm.weight": (0, x), "out_proj.weight": (1, x)}
    return {name: t.index_select(*index[name]) if name in index else t for name, t in weights.items()}


def permute(weights: Mapping[str, torch.Tensor], config: SSMConfig, channel_order: torch.Tensor,
            state_order: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same mixer with each head's channels in ``channel_order`` [H, P] and each group's states
    in ``state_order`` [G, N] (every tensor reordered consistently; dt, A_log, D, dt_bias whole)."""
    widths = mixer_widths(weights, config)
    for name, order, shape in (("channel_order", channel_order, (config.num_heads, widths.head_dim)),
                               ("state_order", state_order, (config.n_groups, widths.state_size))):
        identity = torch.arange(shape[1]).expand(shape)
        if tuple(order.shape) != shape or not torch.equal(order.sort(-1).values.cpu(), identity):
            raise ValueError(f"{name} of shape {tuple(order.shape)} is not a permutation of each row of {shape}")
    return _select(weights, config, channel_order, state_order)


def prune(weights: Mapping[str, torch.Tensor], config: SSMConfig, head_dim: int,
          state_size: int) -> dict[str, torch.Tensor]:
    """The first ``head_dim`` channels of every head and ``state_size`` states of every group."""
    widths = mixer_widths(weights, config)
    if not (0 < head_dim <= widths.head_dim and 0 < state_size <= widths.state_size):
        raise ValueError(f"cannot keep head_dim={head_dim}, state_size={state_size} of a mixer with "
                         f"head_dim={widths.head_dim}, state_size={widths.state_size}")
    return _select(weights, config, torch.arange(head_dim).expand(config.num_heads, -1),
                   torch.arange(state_size).expand(config.n_groups, -1))


def sort_mixer(weights: Mapping[str, torch.Tensor], config: SSMConfig, hidden: torch.Tensor | None,
               method: str = "uniql", ridge: float = 1.0) -> dict[str, torch.Tensor]:
    """The mixer with both axes sorted by ``method`` (``orders``, then ``permute``)."""
    return permute(weights, config, *orders(weights, config, hidden, method, ridge))
