"""Sorting: order every prunable axis by importance so that any rate keeps a prefix.

Sorting never changes the model's function: MLP channels and Q/K rotary pairs are permuted (the
pairs' original indices are returned for the RoPE cos/sin gather), and each KV head's V/O rank
gets an invertible transform (V' = R V, O' = O R^-1). Everything works on a group's members
through their storage layout (``elastiq.checkpoint.to_storage``: pruned unit outermost), so it
is the same code for every model family.

Orders (``method``):
- ``uniql``: MLP channels by ridge leverage diag(C (C + lambda I)^-1) of the down projection's
  input correlation C; Q/K pairs by sqrt(E q_c^2) * sqrt(E k_c^2) (the column norms of C_q^1/2
  and C_k^1/2) over both channels of the pair, summed over the query heads of the KV group;
  V/O by a whitened SVD of K V C_x^1/2 per KV head, K = (sum_h O_h^T O_h)^1/2, with the singular
  values folded into V (V' = U^T K V) so that O' = O K^-1 U has jointly orthonormal columns and V'
  rows carry the scale that quantization will see.
- ``magnitude``: every axis by the L2 norm of its units' weights (the baseline).
"""

from __future__ import annotations

import torch

from .. import ElastiqError
from ..checkpoint import MLP, QK, VO, Group, Heads
from ..layouts import from_storage, to_storage
from .calibrate import BlockStats

METHODS = ("uniql", "magnitude")


def ridge_leverage(c: torch.Tensor, ridge: float = 1.0) -> torch.Tensor:
    """diag(C (C + lambda I)^-1) with lambda = ridge x the mean eigenvalue of C, computed as
    1 - lambda diag((C + lambda I)^-1) from a Cholesky factor: a third of the work of a general
    solve, which counts for an 8B model's 14336 MLP channels (about 75 s a block on 2 cores)."""
    lam = ridge * torch.trace(c) / c.shape[0]
    shifted = c.clone()
    shifted.diagonal().add_(lam)
    factor = torch.linalg.cholesky(shifted)
    del shifted  # two matrices of C's size at a time: 1.6 GB each for an 8B model's MLP
    return 1 - lam * torch.cholesky_inverse(factor).diagonal()


def pair_scores(q_sq: torch.Tensor, k_sq: torch.Tensor, heads: Heads) -> torch.Tensor:
    """Importance [G, d/2] of each rotary pair of each KV head from post-RoPE channel energies."""
    G, Q, half = heads.num_kv_heads, heads.num_heads // heads.num_kv_heads, heads.head_dim // 2
    channel = q_sq.sqrt().reshape(G, Q, -1) * k_sq.sqrt()[:, None]  # [G, Q, d]
    per_head = channel[..., :half] + channel[..., half:]
    return per_head.sum(1)


def _member(model: torch.nn.Module, group: Group, role: str) -> torch.Tensor:
    """The weight of ``group`` with ``role`` (biases and pair indices excluded)."""
    for name, r in group.members:
        if r == role and name.endswith(".weight"):
            return model.get_parameter(name).data
    raise ElastiqError(f"group {group.name} has no {role!r} weight")


def _apply(model: torch.nn.Module, group: Group, heads: Heads, fn) -> None:
    """Replace each member's storage form ``s`` by ``fn(s, role)`` (the rotary pair indices, which
    sorting itself produces, are not the model's)."""
    for name, role in group.members:
        if role == "pairs":
            continue
        param = model.get_parameter(name)
        param.data.copy_(from_storage(fn(to_storage(param.data, role, heads), role), role, heads))


def permute_group(model: torch.nn.Module, group: Group, heads: Heads, order: torch.Tensor) -> None:
    """Permute a group's units: ``order`` [W] for the whole layer, or [W, n] per KV head (SSM head,
    SSM group): the units of each of the n parts in their own order."""
    if order.dim() == 1:
        _apply(model, group, heads, lambda s, role: s[order.to(s.device)])
    else:
        parts = torch.arange(order.shape[1])[None]
        _apply(model, group, heads, lambda s, role: s[order.to(s.device), parts.to(s.device)])


def _magnitude(model: torch.nn.Module, group: Group, heads: Heads) -> torch.Tensor:
    """L2 norm of each unit's weights over all members: [W], or [W, n] for groups of n parts (KV
    heads, SSM heads, SSM groups)."""
    total = 0.0
    for name, role in group.members:
        if name.endswith(".weight"):
            s = to_storage(model.get_parameter(name).data, role, heads).double()
            keep = 1 if group.kind == MLP else 2  # per KV head, SSM head or SSM group
            total = total + s.square().reshape(*s.shape[:keep], -1).sum(-1)
    return total.sqrt()


def _vo_transform(v: torch.Tensor, o: torch.Tensor, c_attn: torch.Tensor, eps: float = 1e-6):
    """R [G, d, d] and R^-1 for V' = R V, O' = O R^-1, from v storage [d, G, hidden], o storage
    [d, G, Q, hidden] and the attention input correlation [hidden, hidden]."""
    evals, evecs = torch.linalg.eigh(c_attn)
    whiten = evecs * evals.clamp_min(0).sqrt()  # C^1/2 up to a right rotation, which SVD ignores
    rs, r_invs = [], []
    for g in range(v.shape[1]):
        o_g = o[:, g].double()  # [d, Q, hidden]: each query head's O_h^T
        k2 = torch.einsum("iqh,jqh->ij", o_g, o_g)
        phi, f = torch.linalg.eigh(k2)
        phi = phi.clamp_min(eps * phi.mean().clamp_min(1e-30))
        k, k_inv = (f * phi.sqrt()) @ f.T, (f / phi.sqrt()) @ f.T
        u, _, _ = torch.linalg.svd(k @ v[:, g].double() @ whiten, full_matrices=False)
        rs.append(u.T @ k)
        r_invs.append(k_inv @ u)
    return torch.stack(rs), torch.stack(r_invs)


@torch.no_grad()
def sort_block(model: torch.nn.Module, groups: list[Group], heads: Heads, stats: BlockStats,
               method: str = "uniql", ridge: float = 1.0) -> torch.Tensor:
    """Sort one block's groups in place; return the rotary pairs' original indices [G, d/2] (int32)."""
    if method not in METHODS:
        raise ElastiqError(f"unknown sorting method {method!r}; known: {', '.join(METHODS)}")
    pairs = torch.arange(heads.head_dim // 2).repeat(heads.num_kv_heads, 1)
    for group in groups:
        if method == "magnitude":
            score = _magnitude(model, group, heads)
            order = score.argsort(dim=0, descending=True, stable=True)
            permute_group(model, group, heads, order)
            if group.kind == QK:
                pairs = order.T.contiguous()
        elif group.kind == MLP:
            permute_group(model, group, heads, ridge_leverage(stats.mlp, ridge).argsort(descending=True, stable=True))
        elif group.kind == QK:
            order = pair_scores(stats.q_sq, stats.k_sq, heads).argsort(dim=1, descending=True, stable=True)
            permute_group(model, group, heads, order.T)
            pairs = order
        elif group.kind == VO:
            v = to_storage(_member(model, group, "v"), "v", heads)
            o = to_storage(_member(model, group, "o"), "o", heads)
            r, r_inv = _vo_transform(v, o, stats.attn)

            def transform(s: torch.Tensor, role: str) -> torch.Tensor:
                if role == "o":  # O_h' = O_h R^-1, i.e. O_h'^T = R^-T O_h^T
                    return torch.einsum("gji,jg...->ig...", r_inv, s.double()).to(s.dtype)
                return torch.einsum("gij,jg...->ig...", r, s.double()).to(s.dtype)

            _apply(model, group, heads, transform)
    return pairs.to(torch.int32)
