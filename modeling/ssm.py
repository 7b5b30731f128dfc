"""The elastic Mamba2 mixer: the SSD layer of Mamba2 at any pruned width, in plain torch.

UniQL (enyac-group/UniQL, ``modeling/mamba``) prunes a Mamba2 mixer along two axes and never its
heads: the head dimension P, the same number of channels kept in every head (rows of the z and x
parts of ``in_proj``, the x channels of ``conv1d``, the gated norm's weight, the input columns of
``out_proj``), and the state size N of every group (rows of the B and C parts of ``in_proj`` and
their ``conv1d`` channels). ``dt_bias``, ``A_log`` and ``D`` stay whole. A sorted mixer pruned at a
rate keeps a prefix of both axes, so this module reads P and N off the tensors' shapes and
computes what transformers' ``Mamba2Mixer`` computes for a config with head_dim = P and
state_size = N.

Tensors carry transformers' ``Mamba2Mixer`` names and layout: ``in_proj`` rows are
[z (H*P), x (H*P), B (G*N), C (G*N), dt (H)], ``conv1d`` channels [x, B, C], and head h reads the
B and C of group h // (H/G). The gated RMSNorm normalises y * silu(z) over each group's H*P/G
channels (the heads of that group), so a pruned P changes what it averages over, exactly as in
transformers at head_dim = P.

Two ways to run it (after gpt-fast's ``prefill`` / ``decode_one_token``): ``prefill`` runs a
sequence through the chunked SSD scan (Mamba2's state-space duality: attention-like within a
chunk, a recurrence over chunk states across chunks), from zeros or from a state, and returns the
state after the sequence; ``step`` runs one token through the recurrence, updating the state in
place. The state (conv [batch, conv channels, K], SSM [batch, H, P, N]) follows the widths and is
constant in context length; ``state_bytes`` sizes it for a memory planner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# The tensors of every mixer, and the biases of transformers' use_bias / use_conv_bias.
REQUIRED = ("in_proj.weight", "conv1d.weight", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight")
OPTIONAL = ("in_proj.bias", "conv1d.bias", "out_proj.bias")


@dataclass(frozen=True)
class SSMConfig:
    """What a Mamba2 mixer computes beyond its weights; pruning changes none of it."""

    num_heads: int
    n_groups: int
    conv_kernel: int
    layer_norm_epsilon: float
    chunk_size: int
    time_step_limit: tuple[float, float] = (0.0, math.inf)

    @classmethod
    def from_config(cls, config: Mapping) -> "SSMConfig":
        """From a transformers Mamba2 config dict (``Mamba2Config.to_dict()``)."""
        limit = config.get("time_step_limit", (0.0, math.inf))
        return cls(config["num_heads"], config["n_groups"], config["conv_kernel"], config["layer_norm_epsilon"],
                   config["chunk_size"], (float(limit[0]), float(limit[1])))


@dataclass(frozen=True)
class SSMWidths:
    """The widths of one mixer, read off its tensors: hidden size, head dimension P, state size N."""

    hidden_size: int
    head_dim: int
    state_size: int


def mixer_widths(weights: Mapping[str, torch.Tensor], config: SSMConfig) -> SSMWidths:
    """Hidden size and P from ``out_proj.weight`` [hidden, H*P], N from ``conv1d.weight``
    [H*P + 2*G*N, 1, K]; then every tensor is checked against them. Raises ValueError naming the
    first tensor that is missing, unexpected or of the wrong shape."""
    H, G, K = config.num_heads, config.n_groups, config.conv_kernel
    if H < 1 or G < 1 or H % G:
        raise ValueError(f"num_heads={H} is not a positive multiple of n_groups={G}")
    missing = [name for name in REQUIRED if name not in weights]
    unknown = sorted(set(weights) - set(REQUIRED) - set(OPTIONAL))
    if missing or unknown:
        raise ValueError(f"a Mamba2 mixer's tensors are {', '.join(REQUIRED)} (and optionally "
                         f"{', '.join(OPTIONAL)}); missing: {missing or 'none'}, unexpected: {unknown or 'none'}")
    out, conv = weights["out_proj.weight"], weights["conv1d.weight"]
    if out.dim() != 2 or out.shape[1] % H or out.shape[1] == 0:
        raise ValueError(f"out_proj.weight has shape {tuple(out.shape)}; expected (hidden_size, num_heads * head_dim) "
                         f"with num_heads={H}")
    hidden, P = out.shape[0], out.shape[1] // H
    states = conv.shape[0] - H * P if conv.dim() == 3 else 0
    if conv.dim() != 3 or states <= 0 or states % (2 * G) or conv.shape[1:] != (1, K):
        raise ValueError(f"conv1d.weight has shape {tuple(conv.shape)}; expected ({H * P} + 2 * {G} * state_size, 1, "
                         f"{K}) for num_heads={H}, head_dim={P} (from out_proj.weight), n_groups={G}, conv_kernel={K}")
    N = states // (2 * G)
    conv_channels, projected = H * P + 2 * G * N, 2 * H * P + 2 * G * N + H
    expected = {"in_proj.weight": (projected, hidden), "in_proj.bias": (projected,),
                "conv1d.weight": (conv_channels, 1, K), "conv1d.bias": (conv_channels,),
                "dt_bias": (H,), "A_log": (H,), "D": (H,), "norm.weight": (H * P,),
                "out_proj.weight": (hidden, H * P), "out_proj.bias": (hidden,)}
    for name, t in weights.items():
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {expected[name]} for hidden_size={hidden}, "
                             f"num_heads={H}, head_dim={P}, n_groups={G}, state_size={N}, conv_kernel={K}")
    return SSMWidths(hidden, P, N)


def state_bytes(config: SSMConfig, head_dim: int, state_size: int, batch: int,
                dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one mixer's ``SSMState`` for ``batch`` sequences of any length: conv state
    [batch, H*P + 2*G*N, K] plus SSM state [batch, H, P, N], both in ``dtype``."""
    H, G = config.num_heads, config.n_groups
    conv = (H * head_dim + 2 * G * state_size) * config.conv_kernel
    return batch * (conv + H * head_dim * state_size) * torch.empty(0, dtype=dtype).element_size()


class SSMState(nn.Module):
    """The recurrent state of one mixer: the last K inputs of ``conv1d`` [batch, channels, K] and
    the SSM state [batch, H, P, N]."""

    def __init__(self, conv: torch.Tensor, ssm: torch.Tensor):
        super().__init__()
        self.register_buffer("conv", conv, persistent=False)
        self.register_buffer("ssm", ssm, persistent=False)


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


class ScanInputs(NamedTuple):
    """A sequence's way into the scan: the gate z [b, T, H*P], the ``conv1d`` input window with the
    K-1 steps before the sequence [b, channels, K-1+T], and after conv1d and SiLU x [b, T, H, P],
    B and C [b, T, G, N]; dt [b, T, H] after dt_bias, softplus and the time-step limit."""

    z: torch.Tensor
    window: torch.Tensor
    x: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    dt: torch.Tensor


def _param(t: torch.Tensor | None) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t, requires_grad=False)


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


class SSMMixer(nn.Module):
    """A Mamba2 mixer of its own head dimension P and state size N (read off ``weights``, a dict
    in transformers' ``Mamba2Mixer`` names; the tensors are held without a copy)."""

    def __init__(self, weights: Mapping[str, torch.Tensor], config: SSMConfig):
        super().__init__()
        widths = mixer_widths(weights, config)
        self.config = config
        self.num_heads, self.n_groups = config.num_heads, config.n_groups
        self.hidden_size, self.head_dim, self.state_size = widths.hidden_size, widths.head_dim, widths.state_size
        self.width = self.num_heads * self.head_dim  # H*P: z, x, y
        self.conv_channels = self.width + 2 * self.n_groups * self.state_size
        C, K = self.conv_channels, config.conv_kernel
        with torch.device("meta"):  # shapes only; the tensors are ``weights``'
            self.in_proj = nn.Linear(self.hidden_size, self.width + C + self.num_heads)
            self.conv1d = nn.Conv1d(C, C, K, groups=C, padding=K - 1)
            self.out_proj = nn.Linear(self.width, self.hidden_size)
        for module, name in ((self.in_proj, "in_proj"), (self.conv1d, "conv1d"), (self.out_proj, "out_proj")):
            module.weight, module.bias = _param(weights[f"{name}.weight"]), _param(weights.get(f"{name}.bias"))
        self.dt_bias, self.A_log, self.D = (_param(weights[name]) for name in ("dt_bias", "A_log", "D"))
        self.norm = GatedRMSNorm(weights["norm.weight"], self.n_groups, config.layer_norm_epsilon)

    @property
    def A(self) -> torch.Tensor:
        """The (negative) continuous-time decay of each head [H], float32."""
        return -torch.exp(self.A_log.float())

    def new_state(self, batch: int, dtype: torch.dtype = torch.float32) -> SSMState:
        """An empty state (zeros: no past) of this mixer's widths, on its device."""
        device = self.A_log.device
        return SSMState(torch.zeros(batch, self.conv_channels, self.config.conv_kernel, dtype=dtype, device=device),
                        torch.zeros(batch, self.num_heads, self.head_dim, self.state_size, dtype=dtype, device=device))

    def _split(self, xbc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., H, P], B and C [..., G, N] of the conv output [..., channels]."""
        states = self.n_groups * self.state_size
        x, B, C = xbc.split([self.width, states, states], -1)
        return (x.unflatten(-1, (self.num_heads, self.head_dim)), B.unflatten(-1, (self.n_groups, self.state_size)),
                C.unflatten(-1, (self.n_groups, self.state_size)))

    def _time_step(self, dt: torch.Tensor) -> torch.Tensor:
        """softplus(dt + dt_bias) within the time-step limit, float32."""
        low, high = self.config.time_step_limit
        return F.softplus(dt.float() + self.dt_bias.float()).clamp(low, high)

    def _output(self, y: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.out_proj(self.norm(y, z).to(dtype))

    def scan_inputs(self, hidden: torch.Tensor, past: torch.Tensor | None = None) -> ScanInputs:
        """The scan's inputs for ``hidden`` [b, T, hidden]; ``past`` [b, channels, K-1]: the conv
        inputs before the sequence (zeros if None)."""
        z, xbc, dt = self.in_proj(hidden).split([self.width, self.conv_channels, self.num_heads], -1)
        xbc = xbc.transpose(1, 2)
        if past is None:
            past = xbc.new_zeros(*xbc.shape[:2], self.config.conv_kernel - 1)
        window = torch.cat([past.to(xbc.dtype), xbc], -1)
        conv = F.conv1d(window, self.conv1d.weight, self.conv1d.bias, groups=self.conv_channels)
        return ScanInputs(z, window, *self._split(F.silu(conv).transpose(1, 2)), self._time_step(dt))

    def prefill(self, hidden: torch.Tensor, state: SSMState | None = None) -> tuple[torch.Tensor, SSMState]:
        """The mixer's output [b, T, hidden] for ``hidden`` [b, T, hidden] by the chunked scan,
        continuing from ``state`` (an empty one if None), and the state after the sequence:
        ``state`` itself, updated in place, or a new float32 one."""
        if state is None:
            state = self.new_state(hidden.shape[0])
        s = self.scan_inputs(hidden, state.conv[..., 1:])
        y, ssm = ssd_scan(s.x, s.dt, self.A, s.B, s.C, self.config.chunk_size, state.ssm)
        y = y + self.D.float()[:, None] * s.x.float()
        state.conv.copy_(s.window[..., -self.config.conv_kernel:])
        state.ssm.copy_(ssm)
        return self._output(y.flatten(-2), s.z, hidden.dtype), state

    def step(self, hidden: torch.Tensor, state: SSMState) -> torch.Tensor:
        """The output [b, 1, hidden] for one token ``hidden`` [b, 1, hidden] after ``state``, which
        is advanced by that token in place."""
        if hidden.shape[1] != 1:
            raise ValueError(f"step takes one token, [batch, 1, hidden]; got {tuple(hidden.shape)}: use prefill")
        z, xbc, dt = self.in_proj(hidden[:, 0]).split([self.width, self.conv_channels, self.num_heads], -1)
        window = torch.cat([state.conv[..., 1:], xbc[..., None].to(state.conv.dtype)], -1)
        state.conv.copy_(window)
        conv = (window.to(xbc.dtype) * self.conv1d.weight[:, 0]).sum(-1)
        if self.conv1d.bias is not None:
            conv = conv + self.conv1d.bias
        x, B, C = self._split(F.silu(conv))
        x, dt = x.float(), self._time_step(dt)  # [b, H, P], [b, H]
        B, C = (t.float().repeat_interleave(self.num_heads // self.n_groups, dim=1) for t in (B, C))  # [b, H, N]
        written = (dt[..., None] * x)[..., None] * B[:, :, None]  # dt B x^T [b, H, P, N]
        ssm = state.ssm.float() * torch.exp(dt * self.A)[..., None, None] + written
        state.ssm.copy_(ssm)
        y = torch.einsum("bhpn,bhn->bhp", ssm, C) + self.D.float()[:, None] * x
        return self._output(y.flatten(-2), z, hidden.dtype)[:, None]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output [b, T, hidden] of a whole sequence from no past."""
        return self.prefill(hidden)[0]
