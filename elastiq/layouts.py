"""Where a prunable tensor's units lie, as data: a ``Layout`` (how its axis is factored and which
factor is the pruned unit), and the roles of the decoder block's groups that make one.

The checkpoint stores every pruned tensor with its unit outermost, so that a rate's part is a
byte prefix. A ``Layout`` says how: factor one axis of the Hugging Face tensor (one factor, -1,
counts the units), then permute the factored axes so that the units come first. The checkpoint
reader knows only this (``docs/format.md``); what a role means lives here, and a family whose
blocks have new kinds of units adds roles here without touching the reader.

Roles (``Group`` members): ``rows`` / ``cols`` (an axis of MLP channels), ``q`` / ``k`` (whole
rotary pairs, channel p with p + d/2, per query / KV head), ``v`` (value rank per KV head),
``o`` (the output projection's input, per query head), ``pairs`` (a block's rotary pair indices
[G, d/2]), ``rows/n`` / ``cols/n`` (an axis of n equal parts, the same units kept in each: an
SSM head's channels, a group's states; ``per_unit_of``); ``whole`` tensors are not pruned. A
quantized matrix's codes [out, in/32, 16] and scales [out, in/32] take their matrix's layout: the
units of ``cols``, ``cols/n`` and ``o`` are then whole blocks of 32 input channels (``is_input_role``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch

from . import ElastiqError

INPUT_ROLES = frozenset({"cols", "o"})  # roles that prune a matrix's input axis: quantized, whole blocks
ADDED_DIMS = {"q": 3, "k": 2, "v": 1, "o": 2}  # axes a role's factoring adds to its tensor's in storage
ROLES = ("whole", "rows", "cols", "pairs", "q", "k", "v", "o")  # and rows/n, cols/n
_PER_PART = re.compile(r"(rows|cols)/([1-9][0-9]{0,6})")


def per_unit_of(role: str, parts: int) -> str:
    """The role of an axis of ``parts`` equal parts (``rows`` or ``cols``), each keeping the same
    prefix of its units: ``rows/8`` for the rows of 8 SSM heads."""
    return f"{role}/{parts}"


def known_role(role: object) -> bool:
    """Whether ``role`` is one the layouts know (a checkpoint's roles are untrusted input)."""
    return isinstance(role, str) and (role in ROLES or _PER_PART.fullmatch(role) is not None)


def is_input_role(role: str) -> bool:
    """Whether ``role`` prunes a matrix's input axis (a quantized one loses whole blocks)."""
    return role in INPUT_ROLES or role.startswith("cols/")


def added_dims(role: str) -> int:
    """Axes ``role``'s factoring adds to its tensor's in storage."""
    return 1 if _PER_PART.fullmatch(role) else ADDED_DIMS.get(role, 0)


@dataclass(frozen=True)
class Layout:
    """Axis ``axis`` of a tensor factored into ``split`` (the -1 factor counts the units), then the
    factored axes permuted by ``perm``, which puts the units first."""

    axis: int
    split: tuple[int, ...]
    perm: tuple[int, ...]

    def to_storage(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (full, or already cut to some rate's width) with its units outermost (a contiguous copy)."""
        known = 1
        for f in self.split:
            known *= f if f != -1 else 1
        factors = [t.shape[self.axis] // known if f == -1 else f for f in self.split]
        factored = t.reshape(*t.shape[:self.axis], *factors, *t.shape[self.axis + 1:])
        return factored.permute(self.perm).contiguous()

    def from_storage(self, s: torch.Tensor) -> torch.Tensor:
        """The tensor of storage ``s`` (any prefix of units) in its own form."""
        inverse = sorted(range(len(self.perm)), key=self.perm.__getitem__)
        factored = s.permute(inverse)
        n = len(self.split)
        merged = 1
        for size in factored.shape[self.axis:self.axis + n]:
            merged *= size
        return factored.reshape(*factored.shape[:self.axis], merged, *factored.shape[self.axis + n:])

    @property
    def ndim(self) -> int:
        """Dimensions of the tensor (its storage has one more for each factor past the first)."""
        return len(self.perm) - len(self.split) + 1

    def in_unit_order(self, s: torch.Tensor) -> torch.Tensor:
        """The tensor of storage ``s`` (any prefix of units) in its own shape, but with its pruned
        axis in unit order, the factors as stored: any rate's part of that axis is then a prefix,
        which is how the runtime holds it (``unit_order`` gives where each position comes from)."""
        n = len(self.split)
        factors = [i for i, p in enumerate(self.perm) if self.axis <= p < self.axis + n]
        before = sorted((i for i, p in enumerate(self.perm) if p < self.axis), key=self.perm.__getitem__)
        after = sorted((i for i, p in enumerate(self.perm) if p >= self.axis + n), key=self.perm.__getitem__)
        t = s.permute(*before, *factors, *after)
        merged = 1
        for size in t.shape[len(before):len(before) + n]:
            merged *= size
        return t.reshape(*t.shape[:len(before)], merged, *t.shape[len(before) + n:])

    def unit_order(self, length: int) -> torch.Tensor:
        """Where each position of the pruned axis (``length`` long) in unit order comes from:
        position j of ``in_unit_order`` is position ``unit_order(length)[j]`` of the tensor."""
        shape = [1] * self.ndim
        shape[self.axis] = length
        return self.to_storage(torch.arange(length).view(shape)).flatten()

    def to_dict(self) -> dict:
        return {"axis": self.axis, "split": list(self.split), "perm": list(self.perm)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Layout":
        return cls(int(d["axis"]), tuple(int(f) for f in d["split"]), tuple(int(p) for p in d["perm"]))


def role_layout(role: str, num_heads: int, num_kv_heads: int, ndim: int) -> Layout | None:
    """The layout of a tensor of ``ndim`` dimensions that plays ``role`` in a block with
    ``num_heads`` query and ``num_kv_heads`` KV heads; None for a tensor that is not pruned."""
    G, Q = num_kv_heads, num_heads // num_kv_heads
    if role == "whole":
        return None
    if role == "rows":  # [W, ...]
        return Layout(0, (-1,), tuple(range(ndim)))
    if role in ("cols", "pairs"):  # [out, W, ...] -> [W, out, ...]
        return Layout(1, (-1,), (1, 0, *range(2, ndim)))
    if role == "q":  # [H*d, ...] as [G, Q, 2, P, ...] -> [P, G, Q, 2, ...]: pair p is channels p and p + d/2
        return Layout(0, (G, Q, 2, -1), (3, 0, 1, 2, *range(4, ndim + 3)))
    if role == "k":  # [G*d, ...] as [G, 2, P, ...] -> [P, G, 2, ...]
        return Layout(0, (G, 2, -1), (2, 0, 1, *range(3, ndim + 2)))
    if role == "v":  # [G*d, ...] as [G, d, ...] -> [d, G, ...]
        return Layout(0, (G, -1), (1, 0, *range(2, ndim + 1)))
    if role == "o":  # [hidden, H*d, ...] as [hidden, G, Q, d, ...] -> [d, G, Q, hidden, ...]
        return Layout(1, (G, Q, -1), (3, 1, 2, 0, *range(4, ndim + 2)))
    part = _PER_PART.fullmatch(role)
    if part and part[1] == "rows":  # [n*W, ...] as [n, W, ...] -> [W, n, ...]
        return Layout(0, (int(part[2]), -1), (1, 0, *range(2, ndim + 1)))
    if part:  # [out, n*W, ...] as [out, n, W, ...] -> [W, n, out, ...]
        return Layout(1, (int(part[2]), -1), (2, 1, 0, *range(3, ndim + 1)))
    raise ElastiqError(f"unknown tensor role {role!r}; known: {', '.join(ROLES)}, rows/n, cols/n")


def head_counts(heads) -> tuple[int, int]:
    """Query and KV heads of ``heads`` (a ``checkpoint.Heads``; None in a model without attention,
    whose roles do not use them)."""
    return (heads.num_heads, heads.num_kv_heads) if heads is not None else (1, 1)


def to_storage(t: torch.Tensor, role: str, heads) -> torch.Tensor:
    """``t`` with the unit ``role`` prunes outermost (``heads``: a ``checkpoint.Heads`` or None)."""
    layout = role_layout(role, *head_counts(heads), t.dim())
    return t.contiguous() if layout is None else layout.to_storage(t)


def from_storage(s: torch.Tensor, role: str, heads, ndim: int | None = None) -> torch.Tensor:
    """The tensor of storage ``s`` of ``role`` (the inverse of ``to_storage``); ``ndim`` is the
    tensor's own number of dimensions, which ``role`` fixes from the storage's unless given."""
    if ndim is None:
        ndim = s.dim() - added_dims(role)
    layout = role_layout(role, *head_counts(heads), ndim)
    return s if layout is None else layout.from_storage(s)
