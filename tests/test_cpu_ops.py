"""elastiq's own CPU ops (``kernels/cpu_ops.cpp``). The 4-bit matmul: each of its loops that this CPU
runs (AVX-512 VNNI, AVX2, portable) against a float reference, its layout (the checkpoint's blocks, row-major), resizing as slicing,
the Q8 pair on it, and the choice between it and torch's int4 op. RMSNorm and the RoPE gather:
against their torch paths, and the torch paths wherever a gradient must flow.

Tolerance, per output element (S = |x| @ |W|^T; y = x @ W^T in float64 of the bf16 activations
and the exact weights d * (q - 8 + zero)):
- the output is rounded to bfloat16 once, then once more when a bias is added: 2^-8 * (|y| + |bias|)
  each (round to nearest);
- float32 accumulation in any order over K terms: K * 2^-24 * S;
- each activation is rounded to a 12-bit code of its block of 32 (step amax / 2047): at most
  half a step, so 2^-12 * A with A = sum over blocks of the block's amax times sum |w| over it.
The ops are compiled on first use (a C++ compiler and ninja are test requirements here); where they
cannot build, these tests fail rather than skip, since the runtime would then fall back silently.
"""

from __future__ import annotations

import pytest
import torch

from elastiq import kernels
from elastiq.kernels import apply_rope_gather, prepare_q4, q4_linear, q4_path, rms_norm_for, rms_norm_torch, rope_for
from elastiq.kernels.cpu_ops import cpu_ops_built
from elastiq.kernels.rope import CpuRope, TorchRope, pair_channels, position_tables, rotate_gathered_
from elastiq.kernels.q4_layout import q4_nbytes, q4_resize
from elastiq.kernels.q8 import Q8Pair, q8_pair_matmul
from elastiq.quants import dequantize, dequantize_q8_0

# decode (M = 1), a few tokens, a prompt; SmolLM2's widths and pruned ones (N = 486, K = 480),
# N not a multiple of the kernel's 4-row tiles (486, 95) and M not of its 4-row activation tiles (7)
SHAPES = [(1, 576, 1536), (1, 486, 576), (7, 486, 480), (64, 1536, 576), (3, 95, 576), (1, 49152 // 16, 576)]


@pytest.fixture(autouse=True)
def elastiq_kernel(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("ELASTIQ_CPU_KERNEL", "elastiq")
    assert cpu_ops_built(), "elastiq's CPU ops did not build on this machine"


def make_weight(N: int, K: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (N, K // 32, 16), generator=gen, dtype=torch.uint8)
    sign = torch.randint(0, 2, (N, K // 32), generator=gen) * 2 - 1
    return codes, (sign * (0.005 + 0.01 * torch.rand(N, K // 32, generator=gen))).half()


def make_x(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    x[..., :32] *= 100  # blocks of very different magnitudes: the per-block scale matters
    return x.bfloat16()


def check(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """``out`` within the module docstring's tolerance of x @ w^T + bias."""
    xd = x.double().reshape(-1, w.shape[1])
    y = xd @ w.double().T
    b = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.double()
    S = xd.abs() @ w.double().abs().T
    amax = xd.abs().unflatten(-1, (-1, 32)).amax(-1)  # [M, K/32]
    A = amax @ w.double().abs().unflatten(-1, (-1, 32)).sum(-1).T
    tol = 2.0 ** -8 * ((y.abs() + b.abs()) * (1 if bias is None else 2)) + w.shape[1] * 2.0 ** -24 * S + 2.0 ** -12 * A
    excess = (out.double().reshape(y.shape) - (y + b)).abs() - tol
    assert out.dtype == torch.bfloat16
    assert excess.max() <= 0, f"{(excess > 0).sum()} elements out of tolerance, worst by {excess.max():.3g}"


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
def test_matches_float_reference(M, N, K, isa):
    """Each loop this CPU runs (the others skip: this machine cannot run them)."""
    if isa not in torch.ops.elastiq.cpu_isas():
        pytest.skip(f"this CPU does not run {isa}")
    codes, scales = make_weight(N, K)
    x = make_x((M, K))
    out = torch.ops.elastiq.q4_matmul(x, codes, scales, 0, isa=isa)
    assert out.shape == (M, N) and out.is_contiguous()
    check(out, x, dequantize(codes, scales))


def test_isa_names_checked():
    codes, scales = make_weight(8, 64)
    x = make_x((1, 64))
    with pytest.raises(RuntimeError, match="isa must be 'auto', 'avx512', 'avx2' or 'portable'; got 'sse'"):
        torch.ops.elastiq.q4_matmul(x, codes, scales, 0, isa="sse")
    missing = [isa for isa in ("avx512", "avx2") if isa not in torch.ops.elastiq.cpu_isas()]
    for isa in missing:
        with pytest.raises(RuntimeError, match=f"this CPU cannot run isa '{isa}'; it runs .*portable"):
            torch.ops.elastiq.q4_matmul(x, codes, scales, 0, isa=isa)


def test_prepared_weight_is_the_checkpoint_bytes_and_multiplies_with_bias():
    codes, scales = make_weight(486, 576)
    weight = prepare_q4(codes, scales)
    assert q4_path("cpu") == weight.path == "cpu"
    assert torch.equal(weight.packed, codes) and torch.equal(weight.scales, scales)
    assert weight.nbytes == q4_nbytes(486, 576, "cpu") == 486 * 18 * 18
    x, bias = make_x((2, 5, 576)), make_x((486,), seed=2)
    out = q4_linear(x, weight, bias)
    assert out.shape == (2, 5, 486)
    check(out, x, dequantize(codes, scales), bias)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
def test_zero_point(isa):
    """w = (q - 8 + zero) * d: the low half of a Q8 pair has zero 8. 17 blocks a row: the AVX-512
    loop's odd last block."""
    if isa not in torch.ops.elastiq.cpu_isas():
        pytest.skip(f"this CPU does not run {isa}")
    codes, scales = make_weight(96, 544)
    x = make_x((3, 544))
    out = torch.ops.elastiq.q4_matmul(x, codes, scales, 8, isa=isa)
    check(out, x, dequantize(codes, scales) + 8 * scales.float().repeat_interleave(32, -1))


@pytest.mark.parametrize("axis,size", [(0, 40), (0, 70), (1, 320)])
def test_resize_is_slicing(axis, size):
    """A held weight cut to ``size`` rows or input channels holds exactly the slice's bytes without
    reading anything; grown back from the codes it lacks, exactly the whole matrix's."""
    codes, scales = make_weight(96, 576)
    cut = (lambda t, a, b: t[a:b]) if axis == 0 else (lambda t, a, b: t[:, a // 32:b // 32])  # noqa: E731

    def never(a, b):
        raise AssertionError("a cut reads nothing")

    shrunk = q4_resize(prepare_q4(codes, scales), size, axis, never)
    assert torch.equal(shrunk.packed, cut(codes, 0, size)) and torch.equal(shrunk.scales, cut(scales, 0, size))
    whole = 96 if axis == 0 else 576
    grown = q4_resize(shrunk, whole, axis, lambda a, b: (cut(codes, a, b), cut(scales, a, b)))
    assert (grown.out_features, grown.in_features) == (96, 576)
    assert torch.equal(grown.packed, codes) and torch.equal(grown.scales, scales)


def test_q8_pair_on_the_kernel():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-128, 128, (96, 18, 32), generator=gen, dtype=torch.int8)
    scales = (torch.randint(16, 32, (96, 18), generator=gen) * 2.0 ** -16).half()
    pair = kernels.prepare_q8_matrix(codes, scales, torch.bfloat16)
    assert isinstance(pair, Q8Pair) and pair.high.path == pair.low.path == "cpu"
    x = make_x((3, 576))
    w = dequantize_q8_0(codes, scales)
    # two halves, each rounded to bf16, added in bf16: three roundings of 2^-8 at most
    y = x.double() @ w.double().T
    out = q8_pair_matmul(x, None, weight=pair).double()
    S = x.double().abs() @ w.double().abs().T
    assert ((out - y).abs() <= 3 * 2.0 ** -8 * S).all()


def test_environment_picks_torch_op(monkeypatch):
    """ELASTIQ_CPU_KERNEL=torch keeps torch's int4 op (read when a weight is prepared); another
    value is refused, naming what is accepted."""
    codes, scales = make_weight(96, 64)
    monkeypatch.setenv("ELASTIQ_CPU_KERNEL", "torch")
    assert prepare_q4(codes, scales).path == "torch"
    monkeypatch.setenv("ELASTIQ_CPU_KERNEL", "fast")
    with pytest.raises(ValueError, match="ELASTIQ_CPU_KERNEL must be 'elastiq' .* or 'torch'; got 'fast'"):
        prepare_q4(codes, scales)


def test_refuses_bad_operands():
    codes, scales = make_weight(96, 64)
    x = make_x((2, 64))
    with pytest.raises(RuntimeError, match=r"x must be bfloat16 \[\.\.\., K\]"):
        torch.ops.elastiq.q4_matmul(x.float(), codes, scales, 0)
    with pytest.raises(RuntimeError, match=r"codes must be uint8 \[N, >=K/32, 16\]"):
        torch.ops.elastiq.q4_matmul(make_x((2, 96)), codes, scales, 0)
    with pytest.raises(RuntimeError, match="scales must be float16"):
        torch.ops.elastiq.q4_matmul(x, codes, scales.float(), 0)
    with pytest.raises(RuntimeError, match=r"bias must be contiguous bfloat16 \[96\]"):
        torch.ops.elastiq.q4_matmul(x, codes, scales, 0, torch.zeros(95).bfloat16())
    with pytest.raises(RuntimeError, match="zero must be 0 or 8; got 3"):
        torch.ops.elastiq.q4_matmul(x, codes, scales, 3)


@pytest.mark.parametrize("zero", [0, 8])
def test_gathers_as_index_select_does(zero):
    """A matrix held in unit order: the op's in_index / out_index give bit for bit what
    index_select around it gives (bias added in the held order, before out_index picks)."""
    codes, scales = make_weight(96, 576)
    bias = make_x((96,), seed=3)
    x = make_x((2, 5, 640))
    gen = torch.Generator().manual_seed(4)
    in_index, out_index = torch.randperm(640, generator=gen)[:576], torch.randperm(96, generator=gen)
    op = torch.ops.elastiq.q4_matmul
    assert torch.equal(op(x, codes, scales, zero, bias, in_index),
                       op(x.index_select(-1, in_index), codes, scales, zero, bias))
    y = op(x[..., :576], codes, scales, zero, bias)
    assert torch.equal(op(x[..., :576], codes, scales, zero, bias, None, out_index), y.index_select(-1, out_index))
    assert op(x[..., :576], codes, scales, zero, None, None, out_index[:40]).shape == (2, 5, 40)
    with pytest.raises(RuntimeError, match="in_index must index 0..639; got 640"):
        op(x, codes, scales, zero, None, torch.cat((in_index[:-1], torch.tensor([640]))))
    with pytest.raises(RuntimeError, match="out_index must index 0..95; got -1"):
        op(x[..., :576], codes, scales, zero, None, None, torch.tensor([0, -1]))
    with pytest.raises(RuntimeError, match="in_index must be a contiguous int64 vector"):
        op(x, codes, scales, zero, None, in_index.int())


@pytest.mark.parametrize("path", ["cpu", "torch"])
def test_unit_ordered_matmul_on_each_path(monkeypatch, path):
    """``kernels.q4_matmul`` with indices, on a 4-bit matrix and an 8-bit pair, equals the plain
    matmul with index_select around it on both CPU paths (torch's gathers around its op)."""
    monkeypatch.setenv("ELASTIQ_CPU_KERNEL", "elastiq" if path == "cpu" else "torch")
    codes, scales = make_weight(96, 576)
    gen = torch.Generator().manual_seed(5)
    q8 = kernels.prepare_q8_matrix(torch.randint(-128, 128, (96, 18, 32), generator=gen, dtype=torch.int8),
                                   scales, torch.bfloat16)
    bias, x = make_x((96,), seed=3), make_x((3, 576))
    index = torch.randperm(576, generator=gen)
    for weight in (prepare_q4(codes, scales), q8):
        assert weight.high.path == path if isinstance(weight, Q8Pair) else weight.path == path
        plain = kernels.q4_matmul(weight)
        assert torch.equal(kernels.q4_matmul(weight, in_index=index)(x, bias), plain(x.index_select(-1, index), bias))
        assert torch.equal(kernels.q4_matmul(weight, out_index=index[:96] % 96)(x, bias),
                           plain(x, bias).index_select(-1, index[:96] % 96))


def test_any_leading_shape_and_strided_input():
    """[..., K] in, [..., N] out, as the model calls it; a non-contiguous x is multiplied as its copy."""
    codes, scales = make_weight(96, 576)
    x = make_x((2, 3, 1152))[..., ::2]
    out = torch.ops.elastiq.q4_matmul(x, codes, scales, 0)
    assert out.shape == (2, 3, 96)
    assert torch.equal(out, torch.ops.elastiq.q4_matmul(x.contiguous().view(6, 576), codes, scales, 0).view(2, 3, 96))
    assert torch.ops.elastiq.q4_matmul(make_x((0, 576)), codes, scales, 0).shape == (0, 96)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 7, 96), (1, 3, 9, 64), (0, 576)])
def test_rms_norm_matches_the_torch_path(shape, dtype):
    """Within one rounding of x's dtype of transformers' arithmetic (float32, weight times the
    normalised value): the sum of squares is taken in another order."""
    gen = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(shape, generator=gen)).to(dtype)
    weight = 1 + torch.rand(shape[-1], generator=gen)
    out = torch.ops.elastiq.rms_norm(x, weight, 1e-5)
    h = x.float()
    want = weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5))
    eps = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -20
    assert out.dtype == dtype and out.shape == x.shape
    assert ((out.float() - want).abs() <= eps * want.abs() + 1e-30).all()
    assert torch.equal(rms_norm_for("cpu")(x, weight, 1e-5), out)  # the op is what the CPU's norms use


def test_rms_norm_keeps_the_torch_path_for_gradients_and_other_layouts(monkeypatch):
    x = torch.randn(2, 64, requires_grad=True)
    weight = torch.rand(64)
    rms_norm_for("cpu")(x, weight, 1e-6).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    strided = torch.randn(64, 2).T  # not contiguous: the torch ops
    assert torch.equal(rms_norm_for("cpu")(strided, weight, 1e-6), rms_norm_torch(strided, weight, 1e-6))
    monkeypatch.setenv("ELASTIQ_CPU_KERNEL", "torch")
    assert rms_norm_for("cpu") is rms_norm_torch


def _rope_case(dtype: torch.dtype, batch_positions: bool):
    gen = torch.Generator().manual_seed(0)
    B, T, G, per, u, half = 2, 5, 3, 3, 12, 32
    q = torch.randn(B, T, G * per, 2 * u, generator=gen).to(dtype)
    k = torch.randn(B, T, G, 2 * u, generator=gen).to(dtype)
    pairs = torch.stack([torch.randperm(half, generator=gen)[:u] for _ in range(G)])
    positions = torch.arange(3, 3 + T)
    if batch_positions:  # each row of the batch at its own positions
        positions = positions.expand(B, T) + torch.tensor([[0], [7]])
    inv_freq = 10000.0 ** (-torch.arange(half) / half)
    return q, k, pairs, positions, inv_freq


@pytest.mark.parametrize("batch_positions", [False, True], ids=["positions [T]", "positions [B, T]"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_gather_equals_the_torch_path(dtype, batch_positions):
    """The same float32 arithmetic (no fused multiply-add) and one rounding: equal bits."""
    q, k, pairs, positions, inv_freq = _rope_case(dtype, batch_positions)
    cos, sin = position_tables(positions, inv_freq, 0.9)
    channels = pair_channels(pairs)
    q_op, k_op, q_torch, k_torch = q.clone(), k.clone(), q.clone(), k.clone()
    torch.ops.elastiq.rope_gather_(q_op, k_op, cos, sin, channels)
    rotate_gathered_(q_torch, k_torch, cos, sin, channels)
    assert not torch.equal(q_op, q)
    assert torch.equal(q_op, q_torch) and torch.equal(k_op, k_torch)
    apply_rope_gather(q, k, positions, inv_freq, pairs, 0.9)  # the checked entry point picks the op on CPU
    assert isinstance(rope_for("cpu"), CpuRope) and torch.equal(q, q_torch) and torch.equal(k, k_torch)


def test_rope_gather_rotates_strided_heads_and_refuses_bad_columns():
    """q and k as views of one fused projection (strided heads) rotate as contiguous copies do; a
    channel outside the tables is refused before anything is written."""
    q, k, pairs, positions, inv_freq = _rope_case(torch.bfloat16, False)
    fused = torch.cat((q, k), dim=2)
    q_view, k_view = fused[:, :, :q.shape[2]], fused[:, :, q.shape[2]:]
    cos, sin = position_tables(positions, inv_freq)
    channels = pair_channels(pairs)
    torch.ops.elastiq.rope_gather_(q_view, k_view, cos, sin, channels)
    rotate_gathered_(q, k, cos, sin, channels)
    assert torch.equal(q_view, q) and torch.equal(k_view, k)
    before = k.clone()
    with pytest.raises(RuntimeError, match="channels must index the tables' 32 columns; got 40"):
        torch.ops.elastiq.rope_gather_(q, k, cos, sin, torch.full_like(channels, 40))
    assert torch.equal(k, before)


def test_rope_keeps_the_torch_path_for_gradients():
    q, k, pairs, positions, inv_freq = _rope_case(torch.float32, False)
    q, k = q.requires_grad_(), k.requires_grad_()
    qq, kk = q * 1, k * 1
    CpuRope.rotate_(qq, kk, position_tables(positions, inv_freq), pair_channels(pairs))
    (qq.sum() + kk.sum()).backward()
    assert q.grad is not None and not torch.equal(q.grad, torch.ones_like(q))


def test_environment_picks_the_torch_rope(monkeypatch):
    monkeypatch.setenv("ELASTIQ_CPU_KERNEL", "torch")
    assert isinstance(rope_for("cpu"), TorchRope)
