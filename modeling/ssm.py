"""The Mamba2 mixer's computation at any pruned width, in plain torch: its config, its recurrent
state, the chunked SSD scan and the gated norm. The mixer itself, holding its tensors by slot,
is ``modeling.model.SSMMixer`` (a block's module, like the attention ``Block``); what it computes
beyond its weights is the family's ``SSMConfig`` (``families.base``).

UniQL (enyac-group/UniQL, ``modeling/mamba``) prunes a Mamba2 mixer along two axes and never its
heads: the head dimension P, the same number of channels kept in every head (z and x
projections' rows, the x convolution's channels, the gated norm's weight, the output
projection's input columns), and the state size N of every group (B and C projections' rows and
their convolutions' channels). dt_bias, A_log and D stay whole. A sorted mixer pruned at a rate
keeps a prefix of both axes, so the mixer reads P and N off its tensors' shapes and computes what
transformers' ``Mamba2Mixer`` computes for a config with head_dim = P and state_size = N. Head h
reads the B and C of group h // (H/G); the gated RMSNorm normalises y * silu(z) over each group's
H*P/G channels (the heads of that group), so a pruned P changes what it averages over, exactly as
in transformers at head_dim = P.

Two ways to run a sequence (after gpt-fast's ``prefill`` / ``decode_one_token``): the chunked SSD
scan (``ssd_scan``: Mamba2's state-space duality, attention-like within a chunk, a recurrence over
chunk states across chunks), from zeros or from a state; or one token through the recurrence. The
state (``SSMState``: conv [batch, conv channels, K], SSM [batch, H, P, N]) follows the widths and is
constant in context length; ``state_bytes`` sizes it for a memory planner.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..families.base import SSMConfig


@dataclass(frozen=True)
class SSMWidths:
    """The widths of one mixer, read off its tensors: hidden size, head dimension P, state size N."""

    hidden_size: int
    head_dim: int
    state_size: int


def state_bytes(config: SSMConfig, head_dim: int, state_size: int, batch: int,
                dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one mixer's ``SSMState`` for ``batch`` sequences of any length: conv state
    [batch, H*P + 2*G*N, K] plus SSM state [batch, H, P, N], both in ``dtype``."""
    H, G = config.num_heads, config.n_groups
    conv = (H * head_dim + 2 * G * state_size) * config.conv_kernel
    return batch * (conv + H * head_dim * state_size) * torch.empty(0, dtype=dtype).element_size()


class SSMState(nn.Module):
    """The recurrent state of one mixer after ``position`` tokens: the last K inputs of its
    convolutions [batch, channels (x, B, C), K] and the SSM state [batch, H, P, N]. ``position`` is
    None while an update is under way (one that failed leaves a state no position describes)."""

    def __init__(self, conv: torch.Tensor, ssm: torch.Tensor, position: int | None = 0):
        super().__init__()
        self.register_buffer("conv", conv, persistent=False)
        self.register_buffer("ssm", ssm, persistent=False)
        self.position = position

    def reset(self) -> None:
        """Back to no past: zeros at position 0."""
        self.conv.zero_()
        self.ssm.zero_()
        self.position = 0

    @contextmanager
    def updating(self, tokens: int) -> Iterator[None]:
        """Within the block the state is being moved ``tokens`` positions on (in place); it has no
        position until the block finishes."""
        position, self.position = self.position, None
        yield
        self.position = None if position is None else position + tokens

    def advance(self, conv: torch.Tensor, ssm: torch.Tensor, tokens: int) -> None:
        """Hold ``conv`` and ``ssm``, the state ``tokens`` positions later."""
        with self.updating(tokens):
            self.conv.copy_(conv)
            self.ssm.copy_(ssm)


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """[..., L] -> [..., L, L]: entry (l, s) is a_{s+1} + ... + a_l for s <= l (a cumulative sum of
    masked copies, steadier than differences of one cumulative sum), -inf above the diagonal."""
    L = a.shape[-1]
    below = torch.ones(L, L, dtype=torch.bool, device=a.device).tril()
    s = a[..., :, None].expand(*a.shape, L).masked_fill(~below.tril(-1), 0).cumsum(-2)
    return s.masked_fill(~below, -math.inf)


def _chunks(t: torch.Tensor, size: int) -> torch.Tensor:
    """[b, T, ...] zero-padded to whole chunks and split: [b, chunks, size, ...]. A padded step has
    dt = 0: it neither decays nor writes the state."""
    t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, -t.shape[1] % size))
    return t.reshape(t.shape[0], -1, size, *t.shape[2:])


def _discretize(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, chunk_size: int):
    """The scan's inputs in chunks, float32: dt*x [b, c, l, H, P], B per head [b, c, l, H, N], and
    log decay dt*A [b, c, H, l]."""
    H, G = x.shape[2], B.shape[2]
    xdt = _chunks(x.float() * dt[..., None], chunk_size)
    B = _chunks(B.float().repeat_interleave(H // G, dim=2), chunk_size)
    a = _chunks(dt * A, chunk_size).transpose(-1, -2)
    return xdt, B, a


def _local_states(xdt: torch.Tensor, B: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """What each chunk alone writes into the state by its end: [b, c, H, P, N]."""
    acs = a.cumsum(-1)
    return torch.einsum("bclhn,bchl,bclhp->bchpn", B, torch.exp(acs[..., -1:] - acs), xdt)


def chunk_states(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """The states S [b, chunks, H, P, N] that each chunk of the SSD scan writes from its own steps
    (x [b, T, H, P], dt [b, T, H] after softplus, A [H], B [b, T, G, N]), as UniQL's state-aware
    sorting reads them (mamba_ssm's ``_chunk_state_fwd``)."""
    return _local_states(*_discretize(x, dt, A, B, chunk_size))


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int,
             initial: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD scan h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T, y_t = h_t C_t, by chunks: y
    [b, T, H, P] (without the D skip) and the final state [b, H, P, N], float32. x [b, T, H, P], dt
    [b, T, H] after softplus, A [H], B and C [b, T, G, N]; ``initial`` [b, H, P, N] (zeros if None)."""
    b, T, H, P = x.shape
    chunk_size = min(chunk_size, T)  # the same result; a short prompt pays for its own length, not a whole chunk
    xdt, B, a = _discretize(x, dt, A, B, chunk_size)
    C = _chunks(C.float().repeat_interleave(H // C.shape[2], dim=2), chunk_size)
    # within a chunk: y_l = sum over s <= l of (C_l . B_s) exp(a_{s+1} + ... + a_l) dt_s x_s
    scores = torch.einsum("bclhn,bcshn->bchls", C, B) * torch.exp(_segsum(a))
    y = torch.einsum("bchls,bcshp->bclhp", scores, xdt)
    # across chunks: the state entering each chunk, carried by the chunk states
    local = _local_states(xdt, B, a)
    state = torch.zeros_like(local[:, 0]) if initial is None else initial.float()
    entering = []
    for c, decay in enumerate(torch.exp(a.sum(-1)).unbind(1)):
        entering.append(state)
        state = state * decay[..., None, None] + local[:, c]
    decay_in = torch.exp(a.cumsum(-1)).transpose(-1, -2)[..., None]  # [b, c, l, H, 1]
    y = y + torch.einsum("bclhn,bchpn->bclhp", C, torch.stack(entering, 1)) * decay_in
    return y.reshape(b, -1, H, P)[:, :T], state


def ssm_step_(ssm: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
              C: torch.Tensor) -> torch.Tensor:
    """One step of the recurrence h = exp(dt A) h + dt B x^T, y = h C: advances ``ssm`` [b, H, P, N]
    (float32, the state before) in place, in two passes over it (a decode step's largest tensor),
    and returns y [b, H, P] (without the D skip). x [b, H, P], dt [b, H] after softplus, A [H], B and
    C [b, G, N]."""
    b, heads, P, N = ssm.shape
    x, B, C = x.float(), *(t.float().repeat_interleave(heads // t.shape[1], dim=1) for t in (B, C))  # [b, H, N]
    flat = ssm.view(b * heads, P, N)
    ssm.mul_(torch.exp(dt * A)[..., None, None])
    flat.baddbmm_((dt[..., None] * x).reshape(b * heads, P, 1), B.reshape(b * heads, 1, N))  # + dt x B^T
    return torch.bmm(flat, C.reshape(b * heads, N, 1)).view(b, heads, P)


class ScanInputs(NamedTuple):
    """A sequence's way into the scan: the gate z [b, T, H*P], the convolutions' input window with
    the K-1 steps before the sequence [b, channels (x, B, C), K-1+T], and after the convolutions and
    SiLU x [b, T, H, P], B and C [b, T, G, N]; dt [b, T, H] after dt_bias, softplus and the time-step
    limit."""

    z: torch.Tensor
    window: torch.Tensor
    x: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    dt: torch.Tensor


def _param(t: torch.Tensor | None) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t, requires_grad=False)


class SiLUGate(nn.Module):
    """y * silu(z) in float32 over ``width`` channels: a mixer's gate without a norm (Falcon-H1's
    ``mamba_rms_norm`` false), in the place of ``GatedRMSNorm``; it holds no weight."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return y.float() * F.silu(z.float())


class GatedRMSNorm(nn.Module):
    """RMSNorm of y * silu(z) over each of ``groups`` equal groups of channels, in float32
    (transformers' ``MambaRMSNormGated`` with group size = width / n_groups)."""

    def __init__(self, weight: torch.Tensor, groups: int, eps: float):
        super().__init__()
        self.weight, self.groups, self.eps = _param(weight), groups, eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = (y.float() * F.silu(z.float())).unflatten(-1, (self.groups, -1))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.float() * h.flatten(-2)
