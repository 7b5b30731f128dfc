"""W4A16 matmul in Triton: fp16/bf16 activations times a Q4_0 matrix, accumulated in float32.

Layout (made once by ``prepare_w4a16``): the checkpoint's bytes are kept as they are, GGUF nibble
order included, only moved **block-major**: codes [K/32, N, 16] uint8 and scales [K/32, N] fp16
(the order the checkpoint already uses on disk for a matrix pruned along its input axis). Then
the 16 code bytes of one quantization block for BLOCK_N consecutive outputs are one contiguous
run of 16 * BLOCK_N bytes, and their scales one run of 2 * BLOCK_N bytes: every load of a tile
is coalesced (each thread takes a 16-byte vector, one block of one output), where the row-major
[N, K/32, 16] layout would read BLOCK_K / 2 bytes per output row and 2-byte scattered scales.
No nibble shuffle is needed: byte j of a block holds codes j (low nibble) and j + 16 (high), so
the kernel loads the activations of a tile as two halves, columns 32b + j and 32b + 16 + j, and
multiplies each by the matching nibbles. Memory is that of the checkpoint: N * K / 2 + N * K / 16 bytes.

Kernel: each program owns a BLOCK_M x BLOCK_N tile of the output and a range of BLOCK_K tiles
of the input axis. Per K tile it loads the bytes [BLOCK_K/2, BLOCK_N] and the scales, dequantizes
in float32 (w = (q - 8) * d) and
- for M > 1, casts w to the activations' dtype and runs two ``tl.dot`` (tensor cores; BLOCK_M is
  at least 16, the MMA's minimum, so M in 2..15 computes some masked rows);
- for M = 1 (decoding), a GEMV: multiplies in float32 on the CUDA cores and reduces over K, since
  a dot would waste 15 of its 16 rows; the kernel is bound by reading the weight, 0.5625 bytes
  per weight, either way.
Split-K: decoding and short prompts on narrow matrices give few output tiles (N = 576 is 9 tiles
of 64) while a GPU has ~100+ multiprocessors to fill to reach its memory bandwidth, so when the
tiles do not fill the machine the K tiles are split across programs (at most 16 ways), each
writing a float32 partial sum [SPLIT_K, M, N] that torch then sums (deterministic, unlike atomic
adds) before adding the bias and rounding once to x's dtype. With one split the bias is added
in the kernel. Configurations are fixed by M (``w4a16_config``) rather than ``triton.autotune``:
prefill M changes with every prompt, and autotuning per new shape would stall the first call of
each; the block sizes are the usual starting points for an sm80/sm90 GPU, not yet tuned on one.

With ``TRITON_INTERPRET=1`` set before this module is imported, the kernel runs on CPU tensors
through Triton's interpreter (numpy), which is how the tests check it without a GPU.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..quants import BLOCK
from .q4 import Q4Weight, check_q4_linear_args

MAX_SPLIT_K = 16
INTERPRETER_MULTIPROCESSORS = 132  # an H100's count: the interpreter then makes the H100's choices


@triton.jit
def _w4a16_kernel(x_ptr, codes_ptr, scales_ptr, bias_ptr, out_ptr,
                  M, N, K, x_sm, out_ss, out_sm, tiles_per_split,
                  HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (m, n, s): output rows m*BLOCK_M.., columns n*BLOCK_N.., K tiles of split s."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    i = tl.arange(0, BLOCK_K // 2)  # byte of the tile: block i // 16, byte j = i % 16
    j = i % 16
    m_mask = rm < M
    n_mask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first_block = tl.program_id(2).to(tl.int64) * tiles_per_split * (BLOCK_K // 32)
    for t in range(tiles_per_split):
        b = first_block + t * (BLOCK_K // 32) + i // 16  # quantization block of each byte row
        k_mask = b < K // 32
        w_mask = k_mask[:, None] & n_mask[None, :]
        codes = tl.load(codes_ptr + b[:, None] * N * 16 + rn[None, :] * 16 + j[:, None], mask=w_mask, other=0)
        d = tl.load(scales_ptr + b[:, None] * N + rn[None, :], mask=w_mask, other=0.0).to(tl.float32)
        w_lo = ((codes & 0xF).to(tl.float32) - 8.0) * d  # weights of columns 32b + j
        w_hi = ((codes >> 4).to(tl.float32) - 8.0) * d  # weights of columns 32b + 16 + j
        col = b * 32 + j
        if BLOCK_M == 1:
            x_at = x_ptr + rm[None, :] * x_sm + col[:, None]  # [BLOCK_K/2, 1]
            x_mask = k_mask[:, None] & m_mask[None, :]
            x_lo = tl.load(x_at, mask=x_mask, other=0.0).to(tl.float32)
            x_hi = tl.load(x_at + 16, mask=x_mask, other=0.0).to(tl.float32)
            acc += tl.sum(x_lo * w_lo + x_hi * w_hi, axis=0)[None, :]
        else:
            x_at = x_ptr + rm[:, None] * x_sm + col[None, :]  # [BLOCK_M, BLOCK_K/2]
            x_mask = m_mask[:, None] & k_mask[None, :]
            x_lo = tl.load(x_at, mask=x_mask, other=0.0)
            x_hi = tl.load(x_at + 16, mask=x_mask, other=0.0)
            acc = tl.dot(x_lo, w_lo.to(x_lo.dtype), acc)
            acc = tl.dot(x_hi, w_hi.to(x_hi.dtype), acc)
    out_mask = m_mask[:, None] & n_mask[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_at = out_ptr + tl.program_id(2) * out_ss + rm[:, None] * out_sm + rn[None, :]
    tl.store(out_at, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def w4a16_config(M: int, N: int, K: int, multiprocessors: int) -> dict[str, int]:
    """Tile sizes, warps, pipeline stages and split-K for an [M, K] x [K, N] product on a GPU
    with ``multiprocessors`` SMs: GEMV tiles for M = 1, MMA tiles growing with M, and the K tiles
    split until the output tiles times the splits cover every SM once (each split keeps at least
    one K tile)."""
    if M == 1:
        config = dict(BLOCK_M=1, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
    elif M <= 16:
        config = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
    elif M <= 64:
        config = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
    else:
        config = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
    tiles = triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"])
    k_tiles = triton.cdiv(K, config["BLOCK_K"])
    split = max(1, min(triton.cdiv(multiprocessors, tiles), k_tiles, MAX_SPLIT_K))
    per_split = triton.cdiv(k_tiles, split)
    return {**config, "SPLIT_K": triton.cdiv(k_tiles, per_split), "tiles_per_split": per_split}


def prepare_w4a16(codes: torch.Tensor, scales: torch.Tensor, device: torch.device) -> Q4Weight:
    """The Triton path's ``Q4Weight`` on ``device`` of checked codes [N, K/32, 16] and fp16 scales
    [N, K/32]: the same bytes block-major, codes [K/32, N, 16] and scales [K/32, N]."""
    N, blocks, _ = codes.shape
    packed = codes.to(device).transpose(0, 1).contiguous()
    return Q4Weight(N, blocks * BLOCK, "triton", packed, scales.to(device).T.contiguous())


def w4a16_linear(x: torch.Tensor, weight: Q4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [..., K] (float16 or bfloat16) times the Triton path's ``weight`` [N, K] transposed,
    plus ``bias`` [N]: [..., N] in x's dtype, contiguous, accumulated in float32 and rounded once."""
    check_q4_linear_args(x, weight, bias, (torch.float16, torch.bfloat16))
    return launch_w4a16(x, bias, weight=weight)


def launch_w4a16(x: torch.Tensor, bias: torch.Tensor | None, *, weight: Q4Weight) -> torch.Tensor:
    """``w4a16_linear`` without its argument checks (the hot path of a model that checked them)."""
    N, K = weight.out_features, weight.in_features
    rows = x.reshape(-1, K).contiguous()
    M = rows.shape[0]
    if M == 0 or N == 0:
        return x.new_zeros(*x.shape[:-1], N)
    config = w4a16_config(M, N, K, _multiprocessors(x.device))
    split = config.pop("SPLIT_K")
    out = torch.empty((split, M, N), device=x.device, dtype=x.dtype if split == 1 else torch.float32)
    grid = (triton.cdiv(M, config["BLOCK_M"]), triton.cdiv(N, config["BLOCK_N"]), split)
    _w4a16_kernel[grid](rows, weight.packed, weight.scales, bias if split == 1 else None, out,
                        M, N, K, rows.stride(0), out.stride(0), out.stride(1), config.pop("tiles_per_split"),
                        HAS_BIAS=split == 1 and bias is not None, **config)
    if split == 1:
        return out[0].unflatten(0, x.shape[:-1])
    total = out.sum(0) if bias is None else out.sum(0) + bias.float()
    return total.to(x.dtype).unflatten(0, x.shape[:-1])


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    """The SM count of a CUDA device; the interpreter (CPU tensors) plans for an H100."""
    if device.type != "cuda":
        return INTERPRETER_MULTIPROCESSORS
    return torch.cuda.get_device_properties(device).multi_processor_count
