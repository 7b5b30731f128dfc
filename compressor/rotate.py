"""Rotation of the residual stream, fused into the weights (QuaRot / SpinQuant), before 4-bit quantization.

An orthogonal Q applied to every residual vector (x -> x Q) leaves the model's function
unchanged once each RMSNorm's weight is folded into the linears that read it: a weightless
RMSNorm commutes with Q because Q preserves the root mean square. The weights then see the
residual stream in a basis where a few large channels are spread over all of them, so a 4-bit
grid with one scale per block wastes less of its range on outliers. The hidden size is never
pruned, so the rotation composes with every rate of a nested checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ElastiqError
from ..families.base import EMBED, FINAL_NORM, HEAD, NORM_READERS, WRITERS, Family


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A seeded random orthogonal matrix [n, n] in float64: D (H ⊗ R), for n = 2^k m.

    H is the normalized Walsh-Hadamard matrix of order 2^k (the largest power of two dividing
    n), R a Haar-random orthogonal m x m (QR of a Gaussian, signs corrected), D random signs.
    Every entry is at most 2^(-k/2) in magnitude, so one outlier channel is spread over at least
    2^k channels: a pure randomized Hadamard when n is a power of two (every entry ±1/sqrt(n)),
    H_64 ⊗ R_9 for SmolLM2's 576, and a Haar-random matrix when n is odd.
    """
    if n < 1:
        raise ElastiqError(f"a rotation needs a size of at least 1, got {n}")
    gen = torch.Generator().manual_seed(seed)
    power = n & -n
    m = n // power
    q, r = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    haar = (q * r.diagonal().sign()).contiguous()  # torch.kron fails on QR's column-major output
    signs = torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1
    return signs[:, None] * torch.kron(_walsh_hadamard(power), haar)


def _walsh_hadamard(n: int) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix of order n (a power of two), float64."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)]) / 2 ** 0.5
    return h


def rotate_residual(model: nn.Module, family: Family, rotation: torch.Tensor) -> None:
    """Rotate ``model``'s residual stream by the orthogonal ``rotation`` [hidden, hidden], in place.

    Every RMSNorm's weight is folded into the input columns of the linears that read it (q/k/v,
    gate/up; the final norm into the head) and set to ones; then the embeddings and the readers'
    inputs become E Q and W Q, and the writers' outputs (the attention output and down projections,
    and their biases if any) Q^T W. Biases on a reader's output (Qwen2's q/k/v) stay as they are. Products are taken
    in float64 and cast back to each weight's dtype, so the logits are unchanged up to that cast.

    A tied lm_head is untied (folding the final norm makes it differ from the embeddings): it
    becomes its own parameter, ``lm_head.weight`` in the state dict, and
    ``config.tie_word_embeddings`` is set to False. That costs vocab x hidden more weights
    (~28M for SmolLM2-135M).
    """
    embed, head = family.top_module(model, EMBED), family.top_module(model, HEAD)
    hidden = embed.weight.shape[1]
    if rotation.shape != (hidden, hidden):
        raise ElastiqError(f"the rotation has shape {tuple(rotation.shape)}; the residual stream needs "
                           f"({hidden}, {hidden}), e.g. random_orthogonal({hidden}, seed)")
    q = rotation.to(torch.float64)
    error = (q.T @ q - torch.eye(hidden, dtype=torch.float64)).abs().max().item()
    if error > 1e-5:
        raise ElastiqError(f"the rotation is not orthogonal (max |Q^T Q - I| = {error:.2e}); "
                           "use random_orthogonal() or orthogonalize it in float64")
    for block in family.blocks(model):
        for norm, readers in NORM_READERS.items():
            _fold_and_rotate(family.part(block, norm), [family.part(block, slot) for slot in readers], q)
        for slot in WRITERS:
            _rotate_output(family.part(block, slot), q)
    if head.weight is embed.weight:
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    model.config.tie_word_embeddings = False
    _fold_and_rotate(family.top_module(model, FINAL_NORM), [head], q)
    _assign(embed.weight, _matmul(embed.weight, q))


def _fold_and_rotate(norm: nn.Module, readers: list[nn.Linear], q: torch.Tensor) -> None:
    """W <- (W diag(g)) Q for each reader of ``norm``, whose weight g then becomes ones."""
    g = norm.weight.detach().to(torch.float64)
    for linear in readers:
        _assign(linear.weight, _matmul(linear.weight.detach().to(torch.float64) * g, q))
    with torch.no_grad():
        norm.weight.fill_(1)


def _rotate_output(linear: nn.Linear, q: torch.Tensor) -> None:
    """W <- Q^T W and b <- Q^T b for a linear that writes into the residual stream."""
    qt = q.T.to(linear.weight.device)
    _assign(linear.weight, qt @ linear.weight.detach().to(torch.float64))
    if linear.bias is not None:
        _assign(linear.bias, qt @ linear.bias.detach().to(torch.float64))


def _matmul(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """w Q in float64 on w's device (w's rows are residual vectors)."""
    return w.detach().to(torch.float64) @ q.to(w.device)


def _assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """Overwrite ``param`` in place with ``value`` cast to its dtype."""
    with torch.no_grad():
        param.copy_(value)
