"""The 4-bit matmul (W4A16): torch's int4 CPU path and the Triton kernel under Triton's
interpreter (elastiq's own CPU kernel: ``test_cpu_ops.py``), each against a float reference: dequantize the Q4_0 codes, then matmul in float32.

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

The Triton kernel runs under ``TRITON_INTERPRET=1``, set while ``w4a16_triton`` is imported
(``triton.jit`` picks the interpreter then) and around each Triton test; the CPU tests run with
it unset. Triton 3.9's interpreter multiplies the raw uint16 bit patterns of bfloat16 operands
in ``tl.dot`` (triton-lang/triton#11584; the fix, #11585, was declined: "we just don't support
it yet"), so the Triton tests widen bfloat16 dot operands to float32 first, exactly, as a GPU's
MMA does; everything else in the kernel runs as the interpreter has it.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from elastiq import kernels
from elastiq.kernels import Q4Weight, prepare_q4, q4_linear
from elastiq.kernels.q4 import int4pack_rows, int4pack_tile, q4_linear_torch
from elastiq.kernels.q4_layout import q4_resize
from elastiq.kernels.q8 import Q8Pair, prepare_q8_pair, q8_pair_matmul
from elastiq.quants import dequantize, dequantize_q8_0, q8_0_halves

HAVE_TRITON = importlib.util.find_spec("triton") is not None
if HAVE_TRITON:
    _previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language as tl
        from triton.runtime import interpreter

        from elastiq.kernels import w4a16_triton
    finally:
        if _previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _previous
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed; its kernel's CPU tests need its interpreter")

EPS = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


@pytest.fixture(autouse=True)
def torch_path(monkeypatch):
    """CPU tensors take the torch path (torch's int4 op, not elastiq's own CPU kernel, which
    ``test_cpu_ops.py`` tests) unless a test asks for the interpreter."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("ELASTIQ_CPU_KERNEL", "torch")


@pytest.fixture
def interpret(monkeypatch):
    """Triton's interpreter for CPU tensors, with bfloat16 ``tl.dot`` operands widened (see above)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    create_dot = interpreter.InterpreterBuilder.create_dot

    def widened(builder, a, b, acc, *args):
        a, b = (builder.cast_impl(t, tl.float32) if t.dtype.scalar == tl.bfloat16 else t for t in (a, b))
        return create_dot(builder, a, b, acc, *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", widened)


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


def test_cpu_padding_to_whole_tiles():
    """N = 486 is held as whole tiles of torch's int4pack layout (512 rows with AVX2's 32-row tiles,
    zero rows added) and sliced back: the 486 outputs are exactly those of the same rows inside the
    padded matrix, and the memory counted is that of the padded rows."""
    rows = int4pack_rows(486)
    assert rows % int4pack_tile() == 0 and 486 <= rows < 486 + int4pack_tile()
    codes, scales = make_weight(rows, 576, False)
    x = make_x((7, 576), torch.bfloat16)
    weight = prepare_q4(codes[:486], scales[:486])
    out = q4_linear(x, weight)
    assert out.shape == (7, 486) and out.is_contiguous()
    assert torch.equal(out, q4_linear(x, prepare_q4(codes, scales))[:, :486])
    assert weight.nbytes == rows * 576 // 2 + (576 // 32) * rows * 2 * 2  # int4 codes + bf16 scales and zeros


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


# Decode (M = 1, the GEMV tiles), a few tokens (M = 7: MMA tiles of 16 rows, 9 masked), a prompt
# (M = 64) and a longer one (M = 130: two row tiles of 128), over the runtime's N and K.
TRITON_SHAPES = [(1, 576, 1536, torch.bfloat16), (1, 486, 480, torch.float16), (7, 486, 576, torch.float16),
                 (7, 1536, 480, torch.bfloat16), (64, 96, 1536, torch.float16), (64, 1536, 576, torch.bfloat16),
                 (130, 576, 480, torch.bfloat16)]


@needs_triton
@pytest.mark.parametrize("exact", [True, False], ids=["exact scales", "fp16 scales"])
@pytest.mark.parametrize("M,N,K,dtype", TRITON_SHAPES)
def test_triton_kernel_matches_float_reference(interpret, M, N, K, dtype, exact):
    codes, scales = make_weight(N, K, exact)
    x = make_x((M, K), dtype)
    bias = make_x((N,), dtype, seed=2)
    weight = prepare_q4(codes, scales)
    assert weight.path == "triton"
    check_against_reference(q4_linear(x, weight, bias), x, codes, scales, bias, exact)


@needs_triton
@pytest.mark.parametrize("M,N,K,dtype", [(1, 486, 576, torch.bfloat16), (7, 96, 480, torch.float16),
                                         (64, 576, 1536, torch.bfloat16)])
def test_triton_kernel_without_split_k(interpret, monkeypatch, M, N, K, dtype):
    """On a one-SM device nothing is split: the kernel adds the bias and rounds to x's dtype itself."""
    monkeypatch.setattr(w4a16_triton, "_multiprocessors", lambda device: 1)
    assert w4a16_triton.w4a16_config(M, N, K, 1)["SPLIT_K"] == 1
    codes, scales = make_weight(N, K, True)
    x = make_x((M, K), dtype)
    bias = make_x((N,), dtype, seed=2)
    check_against_reference(q4_linear(x, prepare_q4(codes, scales), bias), x, codes, scales, bias, True)


@needs_triton
@pytest.mark.parametrize("M,N,K", [(1, 576, 1536), (1, 49152, 576), (7, 486, 576), (64, 8192, 2048),
                                   (4096, 1536, 576), (1, 2048, 8192)])
def test_split_k_fills_the_gpu_without_empty_splits(M, N, K):
    """Output tiles times K splits reach the SM count unless the K tiles (or 16 splits) run out,
    and every split has at least one K tile."""
    sms = 132
    c = w4a16_triton.w4a16_config(M, N, K, sms)
    tiles = -(-M // c["BLOCK_M"]) * -(-N // c["BLOCK_N"])
    k_tiles = -(-K // c["BLOCK_K"])
    assert tiles * c["SPLIT_K"] >= sms or c["SPLIT_K"] in (k_tiles, w4a16_triton.MAX_SPLIT_K)
    assert (c["SPLIT_K"] - 1) * c["tiles_per_split"] < k_tiles <= c["SPLIT_K"] * c["tiles_per_split"]
    assert c["BLOCK_K"] % 32 == 0 and (c["BLOCK_M"] == 1) == (M == 1)


@needs_triton
def test_triton_layout_is_the_checkpoint_bytes_block_major(interpret):
    """The Triton weight holds the checkpoint's bytes, only moved block-major: codes [K/32, N, 16]
    and fp16 scales [K/32, N], no padding, the checkpoint's size in memory."""
    codes, scales = make_weight(486, 480, False)
    weight = prepare_q4(codes, scales)
    assert torch.equal(weight.packed, codes.transpose(0, 1)) and torch.equal(weight.scales, scales.T)
    assert weight.nbytes == codes.nbytes + scales.nbytes == 486 * 480 // 2 + 486 * 480 // 32 * 2


@needs_triton
def test_triton_leading_dims_and_no_tokens(interpret):
    weight = prepare_q4(*make_weight(96, 64, True))
    x = make_x((2, 3, 64), torch.float16)
    out = q4_linear(x, weight)
    assert out.shape == (2, 3, 96) and out.is_contiguous()
    assert torch.equal(out, q4_linear(x.reshape(6, 64), weight).reshape(2, 3, 96))
    assert q4_linear(x[:, :0], weight).shape == (2, 0, 96)


@needs_triton
def test_dispatch(monkeypatch):
    """prepare_q4 picks the Triton layout for CPU tensors only under TRITON_INTERPRET=1, and
    q4_linear runs the path its weight was prepared for."""
    codes, scales = make_weight(96, 64, True)
    cpu = prepare_q4(codes, scales)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    interpreted = prepare_q4(codes, scales)
    assert (cpu.path, interpreted.path) == ("torch", "triton")
    calls = []
    monkeypatch.setattr(w4a16_triton, "launch_w4a16", lambda *args, **kw: calls.append("triton"))
    monkeypatch.setattr(kernels, "int4pack_matmul", lambda *args, **kw: calls.append("torch"))
    x = make_x((1, 64), torch.bfloat16)
    q4_linear(x, interpreted)
    q4_linear(x, cpu)
    assert calls == ["triton", "torch"]


@needs_triton
@pytest.mark.parametrize("case", list(_bad_linear_arguments(prepare_q4(*make_weight(96, 64, False)), torch.float16)))
def test_triton_linear_refuses_bad_input(interpret, case):
    args, error, message = _bad_linear_arguments(prepare_q4(*make_weight(96, 64, False)), torch.float16)[case]
    with pytest.raises(error, match=message):
        w4a16_triton.w4a16_linear(*args)


@needs_triton
def test_triton_path_takes_half_precision_only(interpret):
    weight = prepare_q4(*make_weight(96, 64, False))
    with pytest.raises(TypeError, match="the triton 4-bit path takes float16 or bfloat16 activations; got torch.float32"):
        q4_linear(make_x((1, 64), torch.float32), weight)


# --- 8-bit block matrices as two 4-bit halves (kernels.q8.Q8Pair) --------------------------------

def make_q8(N: int, K: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random Q8_0 codes [N, K/32, 32] (the whole int8 range) and fp16 scales of 5 significant bits
    (exact in bf16, as are 16 and 8 times them)."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-128, 128, (N, K // 32, 32), generator=gen, dtype=torch.int8)
    mantissa = torch.randint(16, 32, (N, K // 32), generator=gen)
    return codes, (mantissa * 2.0 ** -16).half()


@pytest.mark.parametrize("lead,N,K", CPU_SHAPES)
def test_q8_pair_matches_float_reference(lead, N, K):
    """Each half's product is rounded to bf16 once and the two are added in bf16: within
    eps * (|y_high| + |y_low| + |y|) plus float32 accumulation of the exact weights d * q."""
    codes, scales = make_q8(N, K)
    x = make_x((*lead, K), torch.bfloat16)
    weight = kernels.prepare_q8_matrix(codes, scales, torch.bfloat16)
    assert isinstance(weight, Q8Pair) and (weight.out_features, weight.in_features) == (N, K)
    out = q8_pair_matmul(x, None, weight=weight)
    (hc, hs), (lc, ls) = q8_0_halves(codes, scales)
    high, low = dequantize(hc, hs), dequantize(lc, ls) + 8 * ls.float().repeat_interleave(32, -1)
    assert torch.equal(high + low, dequantize_q8_0(codes, scales))
    y_high, y_low = x.float() @ high.T, x.float() @ low.T
    S = x.float().abs() @ (high.abs() + low.abs()).T
    tol = EPS[torch.bfloat16] * (y_high.abs() + y_low.abs() + (y_high + y_low).abs()) + 2 * K * 2.0 ** -24 * S
    assert out.dtype == torch.bfloat16 and out.shape == y_high.shape
    assert ((out.float() - (y_high + y_low)).abs() - tol).max() <= 0


@pytest.mark.parametrize("axis,size", [(0, 40), (0, 70), (1, 320)])
def test_q8_pair_is_cut_and_grown_like_a_prepared_slice(axis, size):
    """A held pair cut to ``size`` rows or input channels, and a pair of that size grown back to the
    whole matrix from the codes it lacks, multiply exactly as pairs prepared from those slices."""
    codes, scales = make_q8(96, 576)
    cut = (lambda c, a, b: c[a:b]) if axis == 0 else (lambda c, a, b: c[:, a // 32:b // 32])  # noqa: E731
    whole, part = prepare_q8_pair(codes, scales), prepare_q8_pair(cut(codes, 0, size), cut(scales, 0, size))

    def read(i):
        return lambda a, b: q8_0_halves(cut(codes, a, b), cut(scales, a, b))[i]

    def never(a, b):
        raise AssertionError("a cut reads nothing")

    shrunk = Q8Pair(q4_resize(whole.high, size, axis, never), q4_resize(whole.low, size, axis, never))
    grown = Q8Pair(q4_resize(part.high, 576 if axis else 96, axis, read(0)),
                   q4_resize(part.low, 576 if axis else 96, axis, read(1)))
    x, x_part = make_x((3, 576), torch.bfloat16), make_x((3, size if axis else 576), torch.bfloat16)
    assert torch.equal(q8_pair_matmul(x_part, None, weight=shrunk), q8_pair_matmul(x_part, None, weight=part))
    assert torch.equal(q8_pair_matmul(x, None, weight=grown), q8_pair_matmul(x, None, weight=whole))
