"""A prepared weight's size, and its cut or growth to another rate's width, in each path's layout.

The runtime predicts its memory from the checkpoint's shapes before it loads anything
(``q4_nbytes``), and changes rate while running by resizing the weights it holds
(``q4_resize``): a narrower width is cut from memory without reading anything, a wider one
appends only the rows or input channels it lacks, read from the checkpoint. The held matrix keeps
its pruned axis in the checkpoint's unit order, so every rate's part of it is a prefix.

The Triton path holds the checkpoint's own bytes block-major, and elastiq's CPU kernel ("cpu")
holds them row-major, so a prefix is a slice in both. torch's
int4pack layout is private to torch and never decoded here: the torch path relies only on the
three facts ``q4.int4pack_tile`` checks against torch's own repack (whole tiles concatenate, each
tile is input-channel-major, codes that lie apart combine by OR). A matrix of n rows holds whole
tiles; cutting it keeps the tiles that hold the first n rows, and the rows past n in the last one
keep codes of the wider rate they came from (the same units at every rate, so still true).
Growing repacks only the new rows, with zero codes where the last held tile already has rows, and
ORs the held tile into them. Without a known tile, a resize repacks the new width from the file.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..quants import BLOCK, PACKED
from .q4 import Q4Weight, int4pack_rows, int4pack_scales, int4pack_tile, pack_int4, prepare_int4pack

# Reads rows (axis 0) or input channels (axis 1) [start, end) of a matrix from the checkpoint:
# GGUF-packed codes and fp16 scales, as ``prepare_q4`` takes them.
ReadCodes = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


def q4_nbytes(out_features: int, in_features: int, path: str) -> int:
    """Bytes a weight [out_features, in_features] prepared for ``path`` holds: "triton" and "cpu"
    keep the codes and fp16 scales as stored; "torch" pads N to whole tiles and keeps bf16 scales
    with a zero beside each."""
    blocks = in_features // BLOCK
    if path in ("triton", "cpu"):
        return out_features * blocks * (PACKED + 2)
    return int4pack_rows(out_features) * blocks * (PACKED + 2 * 2)


def q4_resize(weight: Q4Weight, size: int, axis: int, read: ReadCodes) -> Q4Weight:
    """``weight`` with its first ``size`` rows (``axis`` 0) or input channels (``axis`` 1, whole
    blocks of 32): cut from memory without calling ``read``, or grown by ``read(current, size)``.
    Where torch's layout has no known tile, ``read(0, size)`` gives the whole new width."""
    current = weight.out_features if axis == 0 else weight.in_features
    if size == current:
        return weight
    if weight.path == "torch" and int4pack_tile() is None:
        return prepare_int4pack(*read(0, size), weight.zero)
    if size < current:
        return _cut(weight, size, axis)
    codes, scales = read(current, size)
    return _grow(weight, codes, scales, axis)


def _cut(weight: Q4Weight, size: int, axis: int) -> Q4Weight:
    packed, scales = weight.packed, weight.scales
    if weight.path == "cpu":  # codes [N, K/32, 16], scales [N, K/32]
        if axis == 0:
            return Q4Weight(size, weight.in_features, "cpu", packed[:size].clone(), scales[:size].clone(), weight.zero)
        blocks = size // BLOCK
        return Q4Weight(weight.out_features, size, "cpu", packed[:, :blocks].contiguous(),
                        scales[:, :blocks].contiguous(), weight.zero)
    if weight.path == "triton":  # codes [K/32, N, 16], scales [K/32, N]
        if axis == 0:
            return Q4Weight(size, weight.in_features, "triton", packed[:, :size].contiguous(),
                            scales[:, :size].contiguous())
        blocks = size // BLOCK
        return Q4Weight(weight.out_features, size, "triton", packed[:blocks].clone(), scales[:blocks].clone())
    if axis == 0:  # the tiles that hold the first `size` rows
        rows = int4pack_rows(size)
        if rows < packed.shape[0]:
            packed, scales = packed[:rows].clone(), scales[:, :rows].clone()
        return Q4Weight(size, weight.in_features, "torch", packed, scales, weight.zero)
    tile, rows = int4pack_tile(), packed.shape[0]  # the first `size` channels of every tile
    cut = packed.view(rows // tile, weight.in_features, tile // 2)[:, :size].reshape(rows, size // 2)
    return Q4Weight(weight.out_features, size, "torch", cut, scales[:size // BLOCK].clone(), weight.zero)


def _grow(weight: Q4Weight, codes: torch.Tensor, scales: torch.Tensor, axis: int) -> Q4Weight:
    """``weight`` with rows (axis 0) or input channels (axis 1) appended: GGUF-packed ``codes``
    and fp16 ``scales`` of the new part, [new rows, K/32, 16] or [N, new channels / 32, 16]."""
    codes, scales = codes.to(weight.packed.device), scales.to(weight.packed.device)
    if weight.path == "cpu":
        packed, held_scales = torch.cat((weight.packed, codes), dim=axis), torch.cat((weight.scales, scales), dim=axis)
        n, k = packed.shape[0], packed.shape[1] * BLOCK
        return Q4Weight(n, k, "cpu", packed, held_scales, weight.zero)
    if weight.path == "triton":
        dim = 1 if axis == 0 else 0
        packed = torch.cat((weight.packed, codes.transpose(0, 1)), dim=dim)
        held_scales = torch.cat((weight.scales, scales.T), dim=dim)
        n, k = (weight.out_features + codes.shape[0], weight.in_features) if axis == 0 else \
            (weight.out_features, weight.in_features + codes.shape[1] * BLOCK)
        return Q4Weight(n, k, "triton", packed.contiguous(), held_scales.contiguous())
    if axis == 0:
        return _grow_rows(weight, codes, scales)
    return _grow_channels(weight, codes, scales)


def _grow_rows(weight: Q4Weight, codes: torch.Tensor, scales: torch.Tensor) -> Q4Weight:
    """torch path: rows n..size appended. The tile that holds row n (if n is not on a tile's end)
    is repacked with the new rows, its held rows left zero, and ORed with the held tile."""
    tile, n, k = int4pack_tile(), weight.out_features, weight.in_features
    size = n + codes.shape[0]
    first, held_rows, rows = n // tile * tile, weight.packed.shape[0], int4pack_rows(size)
    new = pack_int4(codes, rows - first, n - first)
    new[:held_rows - first] |= weight.packed[first:held_rows]
    held_scales = torch.empty(weight.scales.shape[0], rows, 2, dtype=weight.scales.dtype)
    held_scales[:, :n] = weight.scales[:, :n]
    held_scales[:, n:size] = int4pack_scales(scales, weight.zero)
    held_scales[:, size:] = 0
    return Q4Weight(size, k, "torch", torch.cat((weight.packed[:first], new)), held_scales, weight.zero)


def _grow_channels(weight: Q4Weight, codes: torch.Tensor, scales: torch.Tensor) -> Q4Weight:
    """torch path: input channels appended to every tile (padding rows get zero codes)."""
    tile, rows, n, k = int4pack_tile(), weight.packed.shape[0], weight.out_features, weight.in_features
    added = codes.shape[1] * BLOCK
    new = pack_int4(codes, rows)
    packed = torch.cat((weight.packed.view(rows // tile, k, tile // 2), new.view(rows // tile, added, tile // 2)), 1)
    held_scales = torch.cat((weight.scales, int4pack_scales(F.pad(scales, (0, 0, 0, rows - n)), weight.zero)))
    return Q4Weight(n, k + added, "torch", packed.reshape(rows, (k + added) // 2), held_scales, weight.zero)
