"""The 4-bit matmul (W4A16): torch's int4 CPU path and the Triton kernel under Triton's
interpreter, each against a float reference: dequantize the Q4_0 codes, then matmul in float32.

Tolerance, per output element, derived from the rounding each path may do (eps = one ulp
relative: 2^-7 in bfloat16, 2^-10 in float16; S = |x| @ |W|^T; y = x @ W^T):
- the output is rounded to x's dtype at most twice (to nearest, then again after adding the
  bias) or truncated once (the interpreter converts float32 to bfloat16 by truncation):
  eps * (|y| + |bias|);
- float32 accumulation in any order over K terms: K * 2^-24 * S;
- and, only when a scale has more significant bits than the path keeps (the CPU path holds its
  scales in bf16; the Triton kernel dequantizes to x's dtype for tl.dot): eps * S.
The "exact scales" cases use scales of 5 significant bits, so every weight d * (q - 8) is exact
in bf16 and only the first two terms remain: a wrong code, scale or block is off by far more.
"""

from __future__ import annotations

import pytest
import torch

from elastiq.kernels import Q4Weight, prepare_q4, q4_linear
from elastiq.kernels.q4 import q4_linear_torch
from elastiq.quants import dequantize

EPS = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def make_weight(N: int, K: int, exact: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random GGUF-packed codes [N, K/32, 16] and signed fp16 scales [N, K/32] around 0.01;
    ``exact``: scales of 5 significant bits (16..31 times a power of two)."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (N, K // 32, 16), generator=gen, dtype=torch.uint8)
    sign = torch.randint(0, 2, (N, K // 32), generator=gen) * 2 - 1
    if exact:
        mantissa = torch.randint(16, 32, (N, K // 32), generator=gen)
        exponent = torch.randint(-13, -10, (N, K // 32), generator=gen)
        scales = sign * mantissa * 2.0 ** exponent
    else:
        scales = sign * (0.005 + 0.01 * torch.rand(N, K // 32, generator=gen))
    return codes, scales.to(torch.float16)


def make_x(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def check_against_reference(out: torch.Tensor, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                            bias: torch.Tensor | None, exact: bool) -> None:
    """``out`` within the module docstring's tolerance of x @ dequantize(codes, scales)^T + bias."""
    w = dequantize(codes, scales)
    y = x.float() @ w.T
    b = torch.zeros(w.shape[0]) if bias is None else bias.float()
    S = x.float().abs() @ w.abs().T
    eps = EPS[x.dtype]
    tol = eps * (y.abs() + b.abs()) + x.shape[-1] * 2.0 ** -24 * S + (0 if exact else eps * S)
    assert out.dtype == x.dtype and out.shape == y.shape
    excess = (out.float() - (y + b)).abs() - tol
    assert excess.max() <= 0, f"{(excess > 0).sum()} elements out of tolerance, worst by {excess.max():.3g}"


# The runtime's shapes: SmolLM2-135M hidden 576, MLP 1536, q/k of pruned rotary pairs (N = 486 is
# 9 heads x 2u = 54, not a multiple of 16), a pruned MLP's down_proj input (K = 480).
CPU_SHAPES = [((1,), 576, 1536), ((7,), 486, 576), ((2, 32), 1536, 576), ((64,), 576, 480), ((3,), 96, 576)]


@pytest.mark.parametrize("exact", [True, False], ids=["exact scales", "fp16 scales"])
@pytest.mark.parametrize("lead,N,K", CPU_SHAPES)
def test_cpu_path_matches_float_reference(lead, N, K, exact):
    codes, scales = make_weight(N, K, exact)
    x = make_x((*lead, K), torch.bfloat16)
    weight = prepare_q4(codes, scales)
    assert weight.path == "torch" and (weight.out_features, weight.in_features) == (N, K)
    check_against_reference(q4_linear(x, weight), x, codes, scales, None, exact)


@pytest.mark.parametrize("N", [96, 486])
def test_cpu_path_bias(N):
    codes, scales = make_weight(N, 576, True)
    x = make_x((5, 576), torch.bfloat16)
    bias = make_x((N,), torch.bfloat16, seed=2)
    check_against_reference(q4_linear(x, prepare_q4(codes, scales), bias), x, codes, scales, bias, True)


def test_cpu_padding_to_16_rows():
    """N = 486 is held as 496 rows (zero rows added) and sliced back: the 486 outputs are exactly
    those of the same rows inside a 496-row matrix, and the memory counted is that of 496 rows."""
    codes, scales = make_weight(496, 576, False)
    x = make_x((7, 576), torch.bfloat16)
    weight = prepare_q4(codes[:486], scales[:486])
    out = q4_linear(x, weight)
    assert out.shape == (7, 486) and out.is_contiguous()
    assert torch.equal(out, q4_linear(x, prepare_q4(codes, scales))[:, :486])
    assert weight.nbytes == 496 * 576 // 2 + (576 // 32) * 496 * 2 * 2  # int4 codes + bf16 scales and zeros


def test_cpu_path_takes_any_layout_of_codes():
    """Codes and scales read block-major ([K/32, N, ...], as the checkpoint stores a matrix pruned
    along its input axis) and transposed to [N, K/32, ...] give the same weight as contiguous ones."""
    codes, scales = make_weight(96, 576, False)
    blocked = prepare_q4(codes.transpose(0, 1).contiguous().transpose(0, 1),
                         scales.T.contiguous().T)
    plain = prepare_q4(codes, scales)
    assert torch.equal(blocked.packed, plain.packed) and torch.equal(blocked.scales, plain.scales)


def test_leading_dims_and_no_tokens():
    codes, scales = make_weight(96, 64, False)
    weight = prepare_q4(codes, scales)
    x = make_x((2, 3, 64), torch.bfloat16)
    assert torch.equal(q4_linear(x, weight), q4_linear(x.reshape(6, 64), weight).reshape(2, 3, 96))
    assert q4_linear(x[:, :0], weight).shape == (2, 0, 96)


def test_weight_is_frozen():
    weight = prepare_q4(*make_weight(16, 32, False))
    with pytest.raises(AttributeError):
        weight.out_features = 8  # type: ignore[misc]


def _bad_prepare_arguments():
    codes, scales = make_weight(16, 64, False)
    return {
        "codes not [N, K/32, 16]": ((codes.flatten(1), scales), ValueError, r"expected GGUF-packed codes \[N, K/32, 16\]"),
        "K not whole blocks": ((codes[..., :8], scales), ValueError, "K a multiple of 32"),
        "scales shape": ((codes, scales[:, :1]), ValueError, r"scales \[N, K/32\]"),
        "int32 codes": ((codes.int(), scales), TypeError, "codes must be uint8 and scales float16"),
        "float32 scales": ((codes, scales.float()), TypeError, "codes must be uint8 and scales float16"),
        "unknown device": ((codes, scales, "meta"), ValueError, "got device meta"),
    }


@pytest.mark.parametrize("case", list(_bad_prepare_arguments()))
def test_prepare_refuses_bad_input(case):
    args, error, message = _bad_prepare_arguments()[case]
    with pytest.raises(error, match=message):
        prepare_q4(*args)


def _bad_linear_arguments(weight: Q4Weight, dtype: torch.dtype):
    x = make_x((3, 64), dtype)
    bias = make_x((96,), dtype)
    return {
        "K mismatch": ((make_x((3, 40), dtype), weight), ValueError, r"x must be \[\.\.\., 64\] for a \[96, 64\] weight"),
        "scalar x": ((x[0, 0], weight), ValueError, r"x must be \[\.\.\., 64\]"),
        "float32 x": ((x.float(), weight), TypeError, "4-bit path takes"),
        "bias shape": ((x, weight, bias[:95]), ValueError, r"bias must be \[96\]"),
        "bias dtype": ((x, weight, bias.float()), TypeError, "bias must have x's dtype"),
    }


@pytest.mark.parametrize("case", list(_bad_linear_arguments(prepare_q4(*make_weight(96, 64, False)), torch.bfloat16)))
def test_cpu_linear_refuses_bad_input(case):
    args, error, message = _bad_linear_arguments(prepare_q4(*make_weight(96, 64, False)), torch.bfloat16)[case]
    with pytest.raises(error, match=message):
        q4_linear_torch(*args)


def test_cpu_path_takes_bfloat16_only():
    weight = prepare_q4(*make_weight(96, 64, False))
    with pytest.raises(TypeError, match="the torch 4-bit path takes bfloat16 activations; got torch.float16"):
        q4_linear(make_x((1, 64), torch.float16), weight)
