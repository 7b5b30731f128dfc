"""The elastic model: a decoder whose every layer has its own widths, for every supported family.

A sorted model pruned at some rate keeps a prefix of every prunable axis, so its layers differ
in MLP width, kept rotary pairs per KV head (q/k head size 2u) and V/O rank (value head size r).
This module runs such a model in plain torch (after gpt-fast's ``model.py``): the widths are read
off the tensors' shapes, RoPE gathers each KV group's frequencies by its stored pair indices
(``elastiq.kernels.rope``), and the attention scale stays that of the original head size.
Blocks name their modules by slot, not by any family's names: ``runtime_weights`` renames a
checkpoint's or a transformers state dict's tensors through the family of the config. A block is
either attention + gated MLP (``Block``) or a Mamba2 mixer (``SSMBlock``, whose computation is in
``modeling/ssm.py``), told apart by its tensors; a model may mix both.

Two ways to run it: a full causal pass over ``input_ids`` (evaluation, calibration), or
incremental decoding through a per-layer ``KVCache`` or recurrent ``SSMState`` (``setup_caches``,
then ``forward(ids, start=position)``; a recurrent state only goes on from where it is, or
restarts at 0). Quantized matrices either become float (the reference) or stay packed
(``int4=True``): Q4_0 in ``Q4Linear`` / ``Q4Embedding`` through ``elastiq.kernels.q4_linear``, an
8-bit (Q8_0) embedding and head in ``Q8Embedding`` / ``Q8Linear`` sharing one ``Q8Weight``, an
8-bit block matrix in ``Q8PairLinear`` (two 4-bit halves).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .. import ElastiqError
from ..families import config_dict, family_for
from ..families.partial_rope import whole_head_frequencies
from ..families.base import (ATTN_K, ATTN_K_NORM, ATTN_NORM, ATTN_OUT, ATTN_POST_NORM, ATTN_Q, ATTN_Q_NORM, ATTN_V,
                              EMBED, FFN_DOWN, FFN_GATE, FFN_NORM, FFN_POST_NORM, FFN_UP, HEAD, ROPE_PAIRS, SSM_A,
                              SSM_CONV, SSM_D, SSM_DT, SSM_IN_B, SSM_IN_C, SSM_IN_DT, SSM_IN_X, SSM_IN_Z,
                              SSM_MATRICES, SSM_NORM, SSM_OUT, SSMConfig, is_norm)
from ..kernels import Q4Weight, prepare_q4, prepare_q8_matrix, q4_activation_dtypes, q4_matmul, rms_norm_for, rope_for
from ..kernels.q8 import Q8Pair, Q8Weight, prepare_q8, q8_embedding, q8_linear, q8_pair_matmul
from ..quants import Q8Tensor, QuantizedTensor, dequantize
from .ssm import GatedRMSNorm, ScanInputs, SiLUGate, SSMState, SSMWidths, ssd_scan, ssm_step_

Weight = torch.Tensor | QuantizedTensor | Q8Tensor | Q4Weight | Q8Weight | Q8Pair
# The gated MLP's activations, by transformers' hidden_act names.
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
               "relu2": lambda x: F.relu(x).square()}
SSM_SCALARS = (SSM_DT, SSM_A, SSM_D)  # a mixer's bare per-head tensors [H]: dt_bias, A_log, D


@dataclass(frozen=True)
class LayerArgs:
    """Widths of one block of attention and an MLP, or of either alone (a hybrid's): MLP channels,
    rotary pairs u per KV head, V/O rank r per KV head (0 for a branch the block lacks)."""

    intermediate_size: int
    rope_pairs: int
    v_rank: int
    biases: frozenset[str]  # the slots whose projection carries a bias
    attention: bool = True
    mlp: bool = True
    gated: bool = True  # the MLP has a gate (SwiGLU, GeGLU); else down(act(up(x)))

    @classmethod
    def of(cls, block: Mapping[str, Weight], num_kv_heads: int, index: int) -> "LayerArgs":
        """The widths of block ``index`` read off its tensors' shapes (runtime names within the block)."""
        attention, mlp = f"{ATTN_Q}.weight" in block, f"{FFN_DOWN}.weight" in block
        k_rows = _rows(block[f"{ATTN_K}.weight"]) if attention else 0
        v_rows = _rows(block[f"{ATTN_V}.weight"]) if attention else 0
        if attention and (k_rows % (2 * num_kv_heads) or v_rows % num_kv_heads):
            raise ElastiqError(f"layer {index}: the key projection has {k_rows} rows and the value projection "
                               f"{v_rows}; expected whole rotary pairs and whole V ranks for each of the "
                               f"{num_kv_heads} KV heads")
        biases = frozenset(name.removesuffix(".bias") for name in block if name.endswith(".bias"))
        return cls(_rows(block[f"{FFN_UP}.weight"]) if mlp else 0, k_rows // (2 * num_kv_heads) if attention else 0,
                   v_rows // num_kv_heads if attention else 0, biases, attention, mlp, f"{FFN_GATE}.weight" in block)


@dataclass(frozen=True)
class SSMLayerArgs:
    """Widths of one Mamba2 block: channels per SSM head P and states per group N, and the channels
    of the gated MLP that follows the mixer in a hybrid's block (0: none, a Mamba2's block), and the
    widths of the attention beside it (Falcon-H1's parallel block; None: none)."""

    head_dim: int
    state_size: int
    biases: frozenset[str]  # the slots whose projection or convolution carries a bias
    intermediate_size: int = 0
    attention: "LayerArgs | None" = None

    @classmethod
    def of(cls, block: Mapping[str, Weight], config: SSMConfig, index: int, num_kv_heads: int = 0) -> "SSMLayerArgs":
        """The widths of block ``index`` read off its tensors' shapes (runtime names within the
        block: ``attn_norm.weight`` and the mixer's, ``mixer_widths``)."""
        try:
            widths = mixer_widths(mixer_tensors(block), config)
        except ValueError as err:
            raise ElastiqError(f"layer {index}: {err}") from None
        biases = frozenset(name.removesuffix(".bias") for name in block if name.endswith(".bias"))
        mlp = _rows(block[f"{FFN_UP}.weight"]) if f"{FFN_UP}.weight" in block else 0
        attention = LayerArgs.of(block, num_kv_heads, index) if f"{ATTN_Q}.weight" in block else None
        return cls(widths.head_dim, widths.state_size, biases, mlp, attention)


# A hybrid's tensors beside its Mamba2 mixer: the MLP after it, the attention beside it.
BRANCH_TENSORS = (*(f"{slot}.{p}" for slot in (FFN_NORM, FFN_GATE, FFN_UP, FFN_DOWN, ATTN_Q, ATTN_K, ATTN_V, ATTN_OUT)
                    for p in ("weight", "bias")), ROPE_PAIRS)


def mixer_tensors(block: Mapping[str, Weight]) -> dict[str, Weight]:
    """A Mamba2 block's mixer tensors: its own, less its norm and a hybrid's other branches (runtime names)."""
    return {k: t for k, t in block.items() if k != f"{ATTN_NORM}.weight" and k not in BRANCH_TENSORS}


def attends(layer: "LayerArgs | SSMLayerArgs") -> "LayerArgs | None":
    """The attention widths of a block (``layer_args``), or None where it has no attention."""
    if isinstance(layer, SSMLayerArgs):
        return layer.attention
    return layer if layer.attention else None


def layer_args(block: Mapping[str, Weight], num_kv_heads: int, ssm: SSMConfig | None,
               index: int) -> LayerArgs | SSMLayerArgs:
    """The widths of block ``index`` (runtime names within the block): a Mamba2 block's
    (``SSMLayerArgs``) when it holds ``ssm_out.weight``, else an attention block's (``LayerArgs``)."""
    if not num_kv_heads and f"{ATTN_Q}.weight" in block:
        raise ElastiqError(f"layer {index} holds attention ({ATTN_Q}.weight); the model's config describes none")
    if f"{SSM_OUT}.weight" in block:
        if ssm is None:
            raise ElastiqError(f"layer {index} holds a Mamba2 mixer; the model's config describes none")
        return SSMLayerArgs.of(block, ssm, index, num_kv_heads)
    if f"{ATTN_Q}.weight" not in block and f"{FFN_DOWN}.weight" not in block:
        raise ElastiqError(f"layer {index} holds neither a Mamba2 mixer ({SSM_OUT}.weight), attention "
                           f"({ATTN_Q}.weight) nor an MLP ({FFN_DOWN}.weight)")
    return LayerArgs.of(block, num_kv_heads, index)


@dataclass(frozen=True)
class ModelArgs:
    """The unpruned shape of the model and what its blocks compute (from its config, through its
    family), and the widths of each block. A model without attention has 0 heads of size 0 (and an
    attention scale of 0); one without Mamba2 mixers has no ``ssm``."""

    vocab_size: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # the original head size d: fixes the rotary frequencies
    rms_norm_eps: float  # of every RMSNorm but the mixers' gated one (``SSMConfig.layer_norm_epsilon``)
    tie_word_embeddings: bool
    hidden_act: str  # the MLP's activation: "silu", "gelu_pytorch_tanh" or "relu2"
    embed_scale: float  # the embeddings' multiplier (1, or Gemma's sqrt(hidden))
    attention_scale: float  # of q.k: that of the original head size, or the family's; pruning keeps it
    layers: tuple[LayerArgs | SSMLayerArgs, ...]
    ssm: SSMConfig | None = None  # what the Mamba2 mixers compute beyond their weights

    @classmethod
    def from_weights(cls, weights: Mapping[str, Weight], config: Mapping) -> "ModelArgs":
        """Read each block's widths off the shapes of its tensors in ``weights`` (runtime names,
        ``runtime_weights``)."""
        args = cls.from_config(config)
        return replace(args, layers=tuple(layer_args(block_weights(weights, i), args.num_kv_heads, args.ssm, i)
                                          for i in range(config["num_hidden_layers"])))

    @classmethod
    def from_config(cls, config: Mapping) -> "ModelArgs":
        """What ``config`` alone says (no block's widths: ``layers`` is empty): enough to build one
        block (``block_from_weights``) or the model's ends (``Transformer.ends_from_weights``)."""
        family = family_for(config)
        family.check(config)
        heads, ssm = family.heads(config), family.ssm_config(config)
        num_heads, num_kv_heads, head_dim = (heads.num_heads, heads.num_kv_heads, heads.head_dim) if heads else \
            (0, 0, 0)
        return cls(vocab_size=config["vocab_size"], hidden_size=config["hidden_size"], num_heads=num_heads,
                   num_kv_heads=num_kv_heads, head_dim=head_dim,
                   rms_norm_eps=family.norm_eps(config), tie_word_embeddings=config.get("tie_word_embeddings", False),
                   hidden_act=family.activation(config),
                   embed_scale=family.embedding_scale(config),
                   attention_scale=family.attention_scale(config) if heads else 0.0, layers=(), ssm=ssm)


@dataclass(frozen=True)
class LayerAttention:
    """What a block's attention needs beyond its weights: the rotary frequencies of the original
    head's pairs [d/2] (0 for the pairs partial RoPE passes; None: a family whose attention has no
    RoPE), transformers' cos/sin scaling factor (1 for default RoPE), and its sliding window (None:
    full causal attention)."""

    inv_freq: torch.Tensor | None
    scaling: float
    window: int | None


def layer_windows(config: Mapping) -> list[int | None]:
    """Each block's sliding attention window, as transformers applies it: every block's when the
    config has a window and no ``layer_types`` (Mistral), else the ``sliding_attention`` ones'."""
    window, types = config.get("sliding_window"), config.get("layer_types")
    if not window:
        return [None] * config["num_hidden_layers"]
    if types is None:
        return [window] * config["num_hidden_layers"]
    return [window if t == "sliding_attention" else None for t in types]


def layer_attention(config: Mapping, device: torch.device | str = "cpu") -> list[LayerAttention]:
    """``LayerAttention`` of every block (blocks of one layer type share one frequency tensor, and
    so one RoPE table a forward pass)."""
    types = config.get("layer_types") or [None] * config["num_hidden_layers"]
    if not family_for(config).rotary:
        return [LayerAttention(None, 1.0, w) for w in layer_windows(config)]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    rope = {}
    for t in set(types):  # partial RoPE's passing pairs turn at frequency 0 (``families.partial_rope``)
        inv_freq, scaling = rotary_frequencies(config, t)
        rope[t] = whole_head_frequencies(inv_freq, head_dim).to(device), scaling
    return [LayerAttention(*rope[t], w) for t, w in zip(types, layer_windows(config))]


def runtime_weights(weights: Mapping[str, Weight], config: Mapping) -> dict[str, Weight]:
    """``weights`` (a checkpoint's or transformers' names) under the elastic model's names, which
    no family owns: ``layers.{i}.{slot}.{param}``, ``layers.{i}.rope_pairs``, ``embed_tokens.weight``,
    ``norm.weight``, ``lm_head.weight``; norm weights in the plain form x / rms(x) * w (a family
    that stores them otherwise, as Gemma's 1 + w, is converted). The family of ``config`` knows both."""
    family = family_for(config)
    names = family.runtime_names(weights)
    return {names[name]: family.runtime_tensor(names[name], t) for name, t in weights.items()}


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 as transformers does, with a float32 weight (a
    scale such as Gemma's 1 + w keeps its low bits) and one rounding to the activations' dtype."""

    def __init__(self, dim: int, eps: float, device: torch.device | str = "cpu"):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.compute = rms_norm_for(device)  # elastiq's CPU op or the torch ops, chosen once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.compute(x, self.weight, self.eps)


class Q4Linear(nn.Module):
    """A linear layer whose Q4_0 weight stays packed (``elastiq.kernels.prepare_q4``): 4.5 bits a
    weight in memory, multiplied by the W4A16 kernels in the activations' dtype (bf16 on CPU)."""

    def __init__(self, weight: Q4Weight, bias: torch.Tensor | None):
        super().__init__()
        self.weight = weight
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.register_buffer("bias", bias)
        self.matmul = q4_matmul(weight)  # its kernel, chosen once; the model checks the activations' dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class Q4Embedding(nn.Module):
    """Token embeddings kept as Q4_0 codes: a lookup dequantizes only the rows it gathers."""

    def __init__(self, weight: QuantizedTensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("codes", weight.codes)
        self.register_buffer("scales", weight.scales)
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return dequantize(self.codes[ids], self.scales[ids]).to(self.dtype)


class Q8Linear(nn.Module):
    """A linear layer (the LM head) whose Q8_0 weight stays 8-bit (``elastiq.kernels.q8``)."""

    def __init__(self, weight: Q8Weight):
        super().__init__()
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.register_buffer("codes", weight.codes)
        self.register_buffer("scales", weight.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return q8_linear(x, Q8Weight(self.codes, self.scales))


class Q8PairLinear(nn.Module):
    """A linear layer whose Q8_0 weight is held as two 4-bit halves (``kernels.q8.Q8Pair``) for
    torch's int4 CPU matmul: bf16 activations."""

    def __init__(self, weight: Q8Pair, bias: torch.Tensor | None):
        super().__init__()
        self.weight = weight
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return q8_pair_matmul(x, self.bias, weight=self.weight)


class Q8Embedding(nn.Module):
    """Token embeddings kept as Q8_0 codes, shared with a tied ``Q8Linear`` head."""

    def __init__(self, weight: Q8Weight):
        super().__init__()
        self.register_buffer("codes", weight.codes)
        self.register_buffer("scales", weight.scales)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return q8_embedding(ids, Q8Weight(self.codes, self.scales))


class KVCache(nn.Module):
    """Keys [B, G, S, 2u] and values [B, G, S, r] of one layer for up to S positions."""

    def __init__(self, batch: int, max_seq: int, kv_heads: int, k_dim: int, v_dim: int, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        self.register_buffer("k", torch.zeros(batch, kv_heads, max_seq, k_dim, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("v", torch.zeros(batch, kv_heads, max_seq, v_dim, dtype=dtype, device=device),
                             persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``, ``v`` [B, G, T, .] at positions start..start+T-1; return the cache up to there."""
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            raise ElastiqError(f"position {end - 1} is beyond the KV cache of {self.k.shape[2]} tokens; "
                               "set up the caches for a longer context")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class UnitOrdered(nn.Module):
    """A projection whose pruned axis is held in the checkpoint's unit order, where every rate's
    part is a prefix (so that the runtime changes rate by cutting or growing it in place): its
    input is gathered into that order (``axis`` 1), or its output back into the model's (``axis`` 0).
    ``order`` is where each held position comes from (``Checkpoint.unit_order``)."""

    def __init__(self, inner: nn.Module, order: torch.Tensor, axis: int):
        super().__init__()
        self.inner, self.axis = inner, axis
        self.register_buffer("index", order if axis == 1 else torch.argsort(order))
        # a packed matrix's kernel gathers itself (elastiq's CPU op in the same call), chosen once
        self.matmul = (q4_matmul(inner.weight, **{"in_index" if axis == 1 else "out_index": self.index})
                       if isinstance(inner, (Q4Linear, Q8PairLinear)) else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.matmul is not None:
            return self.matmul(x, self.inner.bias)
        if self.axis == 1:
            return self.inner(x.index_select(-1, self.index))
        return self.inner(x).index_select(-1, self.index)


class UnitOrderedParams(nn.Module):
    """A small module (a Mamba2 mixer's depthwise convolution, its gated norm) whose parameters are
    held with their pruned axis 0 in the checkpoint's unit order, as ``UnitOrdered`` holds a
    matrix's, so that the runtime cuts and grows them in place; it computes with them gathered back
    into the model's order (``params``: a few thousand channels, exact), gathered once and again
    only when its tensors are replaced (a rate switch builds a new block; ``to`` moves them).
    ``order`` is where each held position comes from (``Checkpoint.unit_order``)."""

    def __init__(self, inner: nn.Module, order: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.register_buffer("index", torch.argsort(order))
        self._gathered: tuple[tuple, dict[str, torch.Tensor]] | None = None

    def params(self) -> dict[str, torch.Tensor]:
        """The inner module's parameters in the model's order, by name."""
        held = dict(self.inner.named_parameters(recurse=False))
        key = tuple(t.data_ptr() for t in (self.index, *held.values()))
        if self._gathered is None or self._gathered[0] != key:
            self._gathered = key, {name: t.index_select(0, self.index) for name, t in held.items()}
        return self._gathered[1]

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return functional_call(self.inner, self.params(), args)


def _in_model_order(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias (None if it has none) of ``module`` or of the module ``UnitOrderedParams``
    holds, in the model's order."""
    if isinstance(module, UnitOrderedParams):
        params = module.params()
        return params["weight"], params.get("bias")
    return module.weight, module.bias


def _linear(weight: torch.Tensor | Q4Weight | Q8Weight, bias: torch.Tensor | None,
            order: tuple[int, torch.Tensor] | None = None) -> nn.Module:
    """The module of one projection, holding ``weight`` (and ``bias``) without a copy; ``order``
    (axis, order): the pruned axis is held in unit order (``UnitOrdered``)."""
    if order is not None:
        return UnitOrdered(_linear(weight, bias), order[1], order[0])
    if isinstance(weight, Q4Weight):
        return Q4Linear(weight, bias)
    if isinstance(weight, Q8Weight):
        return Q8Linear(weight)
    if isinstance(weight, Q8Pair):
        return Q8PairLinear(weight, bias)
    with torch.device("meta"):
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


def _norm(weight: torch.Tensor, eps: float) -> RMSNorm:
    with torch.device("meta"):
        norm = RMSNorm(weight.shape[0], eps, weight.device)
    norm.weight = nn.Parameter(weight, requires_grad=False)
    return norm


class Attending:
    """Grouped-query attention of a block's own widths, for the blocks that hold it (``Block``, and
    ``SSMBlock`` beside a mixer): ``init_attention`` puts its modules on the block, named by slot."""

    def init_attention(self, args: ModelArgs, layer: LayerArgs, w: Mapping[str, Weight],
                       attending: LayerAttention | None, orders: Mapping[str, tuple[int, torch.Tensor]] | None) -> None:
        """Attention's modules from ``w`` (None for each where the block has no attention), its
        rotary pair indices and frequencies (none without RoPE), and no KV cache yet."""
        H, G, u, r = args.num_heads, args.num_kv_heads, layer.rope_pairs, layer.v_rank
        self.attn_heads, self.attn_kv_heads = H, G
        self.qk_dim, self.v_dim = 2 * u, r
        self.scale = args.attention_scale  # pruning drops terms of q.k, it does not rescale it
        self.attending = attending
        for slot in (ATTN_Q, ATTN_K, ATTN_V, ATTN_OUT):
            setattr(self, slot, _linear(w[f"{slot}.weight"], w.get(f"{slot}.bias"), (orders or {}).get(slot))
                    if f"{slot}.weight" in w else None)
        for slot in (ATTN_Q_NORM, ATTN_K_NORM):
            setattr(self, slot, _norm(w[f"{slot}.weight"], args.rms_norm_eps) if f"{slot}.weight" in w else None)
        self.rope = None  # no attention, or attention without RoPE
        if layer.attention and attending.inv_freq is not None:
            self.register_buffer("inv_freq", attending.inv_freq)  # rotary frequencies of the original head
            self.register_buffer("rope_pairs", w[ROPE_PAIRS])
            if self.rope_pairs.shape != (G, u) or self.inv_freq.shape[0] < u:
                raise ElastiqError(f"rotary pairs {tuple(self.rope_pairs.shape)} and {self.inv_freq.shape[0]} "
                                   f"frequencies do not fit {G} KV heads of {u} kept pairs")
            self.rope = rope_for(self.rope_pairs.device)  # shapes checked here, not on every token
            self.rope_index = self.rope.prepare(self.rope_pairs)
        self.kv_cache: KVCache | None = None

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, T, H, 2u], k [B, T, G, 2u], v [B, T, G, r] of hidden states ``x`` [B, T, hidden]
        (q and k normalised per head if the block has their norms)."""
        B, T, _ = x.shape
        q = self.attn_q(x).view(B, T, self.attn_heads, self.qk_dim)
        k = self.attn_k(x).view(B, T, self.attn_kv_heads, self.qk_dim)
        v = self.attn_v(x).view(B, T, self.attn_kv_heads, self.v_dim)
        if self.attn_q_norm is not None:
            q, k = self.attn_q_norm(q), self.attn_k_norm(k)
        return q, k, v

    def rope_tables(self, positions: torch.Tensor) -> tuple:
        """What ``rotate`` needs at ``positions``, the same for every block of these frequencies:
        the model computes it once per forward pass (``elastiq.kernels.rope_for``)."""
        return self.rope.tables(positions, self.inv_freq, self.attending.scaling)

    def rotate(self, q: torch.Tensor, k: torch.Tensor, tables: tuple) -> None:
        """RoPE in place at the positions of ``tables`` (``rope_tables``): the query heads of KV
        group g use group g's frequencies (``elastiq.kernels`` picks the Triton kernel on a GPU,
        the torch path elsewhere)."""
        self.rope.rotate_(q, k, tables, self.rope_index)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int | None = None) -> torch.Tensor:
        """Attention of queries q [B, H, T, 2u] over keys k [B, G, S, 2u] and values v [B, G, S, r]
        (each KV head serving its H/G query heads): [B, H, T, r]. The queries sit at positions
        ``start``..``start``+T-1 of the S keys (``start`` None: the same T positions, causal); a
        query at position p sees the keys at positions p - window < s <= p in a windowed block.
        One query position (decoding) attends as the H/G query heads of each KV head taken as
        positions of one head, which spares SDPA's grouped-query path (several times slower on CPU).
        Where q/k heads and value heads differ in size (a pruned rate that keeps V/O whole), the
        narrower are padded with zero channels, which adds nothing to q.k or to the output, so that
        SDPA's fused CPU kernels run: they want one head size, and its general fallback took 76 us a
        decode step against 41 with the padding (SmolLM2's 0.35 widths, 128 keys, 2 threads)."""
        B, H, T, S = *q.shape[:3], k.shape[2]
        first = S - T if start is None else start
        window = self.attending.window
        if window is not None and first + T > window:
            keys = torch.arange(S, device=q.device)
            queries = torch.arange(first, first + T, device=q.device)[:, None]
            mask, causal = (keys <= queries) & (keys > queries - window), False
        elif start is None or (start == 0 and T == S):
            mask, causal = None, True
        elif T == 1:
            mask, causal = None, False  # one new token sees every cached position
        else:
            mask = torch.arange(S, device=q.device) <= torch.arange(start, start + T, device=q.device)[:, None]
            causal = False
        if T == 1:  # no causal mask to keep: a window's mask [1, S] holds for every grouped head
            q = q.view(B, self.attn_kv_heads, H // self.attn_kv_heads, -1)
        r = v.shape[-1]
        if q.shape[-1] != r:
            width = max(q.shape[-1], r)
            q, k, v = (t if t.shape[-1] == width else F.pad(t, (0, width - t.shape[-1])) for t in (q, k, v))
        if T == 1:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
            return y[..., :r].reshape(B, H, 1, r)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
                                              enable_gqa=self.attn_heads != self.attn_kv_heads)[..., :r]

    def attention(self, x: torch.Tensor, tables: tuple | None, start: int | None = None) -> torch.Tensor:
        q, k, v = self.project(x)
        if self.rope is not None:
            self.rotate(q, k, tables)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if start is not None:
            if self.kv_cache is None:
                raise ElastiqError("decoding at a position needs the KV caches: call setup_caches first")
            k, v = self.kv_cache.update(start, k, v)
        y = self.attend(q, k, v, start)
        return self.attn_output(y.transpose(1, 2).flatten(2))


class Block(Attending, nn.Module):
    """Pre-norm decoder block of its own widths: x + attention(norm(x)), then + MLP(norm(.)).

    Its modules are named by slot (``attn_q``, ``ffn_down``, ...; ``elastiq.families.base``), so a
    block tensor's runtime name is ``layers.{i}.{slot}.{param}`` whatever the family. Attention is
    grouped-query with q/k heads of 2u channels, value heads of r channels, and RoPE frequencies
    gathered by ``rope_pairs`` [G, u] (original pair index of each kept pair); q and k are
    normalised per head before RoPE when the block has ``attn_q_norm`` / ``attn_k_norm``. The MLP
    is gated (SwiGLU, or GeGLU with tanh-approximated GELU) of the block's own width. Where the
    block has ``post_attention_norm`` / ``post_ffw_norm`` (Gemma), they normalise each branch's
    output before it joins the residual stream. Attention sees ``attending``'s sliding window.
    ``orders`` names the slots whose pruned axis ``w`` holds in unit order (``UnitOrdered``).

    A hybrid's block may hold one branch (``LayerArgs.attention``, ``LayerArgs.mlp``), read through
    its one norm ``attn_norm``: x + attention(attn_norm(x)), or x + MLP(attn_norm(x)); its MLP may be
    ungated (down(act(up(x))), Nemotron-H's ReLU²), its attention without RoPE (``attending`` has no
    frequencies; then q and k keep their channels in order and no ``rope_pairs`` is needed).
    """

    def __init__(self, args: ModelArgs, layer: LayerArgs, w: Mapping[str, torch.Tensor | Q4Weight],
                 attending: LayerAttention, orders: Mapping[str, tuple[int, torch.Tensor]] | None = None):
        super().__init__()
        self.init_attention(args, layer, w, attending, orders)
        self.act = ACTIVATIONS[args.hidden_act]
        for slot in (FFN_GATE, FFN_UP, FFN_DOWN):  # None: a branch (or gate) the block does not have
            setattr(self, slot, _linear(w[f"{slot}.weight"], w.get(f"{slot}.bias"), (orders or {}).get(slot))
                    if f"{slot}.weight" in w else None)
        for slot in (ATTN_NORM, ATTN_POST_NORM, FFN_NORM, FFN_POST_NORM):
            setattr(self, slot, _norm(w[f"{slot}.weight"], args.rms_norm_eps) if f"{slot}.weight" in w else None)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        if self.ffn_gate is None:
            return self.ffn_down(self.act(self.ffn_up(x)))
        return self.ffn_down(self.act(self.ffn_gate(x)) * self.ffn_up(x))

    def forward(self, x: torch.Tensor, tables: tuple | None, start: int | None = None) -> torch.Tensor:
        """The block at the positions of ``tables`` (``rope_tables``; None without RoPE); ``start``
        as in ``attend``."""
        if self.attn_q is None:  # an MLP alone
            return x + self.mlp(self.attn_norm(x))
        a = self.attention(self.attn_norm(x), tables, start)
        h = x + (a if self.post_attention_norm is None else self.post_attention_norm(a))
        if self.ffn_down is None:  # attention alone
            return h
        m = self.mlp(self.ffn_norm(h))
        return h + (m if self.post_ffw_norm is None else self.post_ffw_norm(m))


# The tensors of a Mamba2 mixer (runtime names within its block), and those config flags add.
SSM_REQUIRED = (*(f"{slot}.weight" for slot in (*SSM_MATRICES, *SSM_CONV, SSM_NORM)), *SSM_SCALARS)
SSM_OPTIONAL = tuple(f"{slot}.bias" for slot in (*SSM_MATRICES, *SSM_CONV))


def _shape(t: Weight) -> tuple[int, ...]:
    """A tensor's shape; a prepared matrix's (out_features, in_features)."""
    if isinstance(t, (Q4Weight, Q8Weight, Q8Pair)):
        return t.out_features, t.in_features
    return tuple(t.shape)


def mixer_widths(weights: Mapping[str, Weight], config: SSMConfig) -> SSMWidths:
    """The widths of a Mamba2 mixer whose tensors are ``weights`` (runtime names within its block,
    ``attn_norm.weight`` excluded): the hidden size and P from ``ssm_out.weight`` [hidden, H*P], N
    from ``ssm_in_b.weight`` [G*N, hidden]; then every tensor is checked against them. Raises
    ValueError naming the first tensor that is missing, unexpected or of the wrong shape."""
    H, G, K = config.num_heads, config.n_groups, config.conv_kernel
    if H < 1 or G < 1 or H % G:
        raise ValueError(f"num_heads={H} is not a positive multiple of n_groups={G}")
    required = [name for name in SSM_REQUIRED if config.gated_norm or name != f"{SSM_NORM}.weight"]
    missing = [name for name in required if name not in weights]
    unknown = sorted(set(weights) - set(required) - set(SSM_OPTIONAL))
    if missing or unknown:
        raise ValueError(f"a Mamba2 mixer's tensors are {', '.join(required)} (and optionally "
                         f"{', '.join(SSM_OPTIONAL)}); missing: {missing or 'none'}, unexpected: {unknown or 'none'}")
    out, states = _shape(weights[f"{SSM_OUT}.weight"]), _shape(weights[f"{SSM_IN_B}.weight"])
    if len(out) != 2 or out[1] % H or out[1] == 0:
        raise ValueError(f"{SSM_OUT}.weight has shape {out}; expected (hidden_size, num_heads * head_dim) with "
                         f"num_heads={H}")
    if len(states) != 2 or states[0] % G or states[0] == 0:
        raise ValueError(f"{SSM_IN_B}.weight has shape {states}; expected (n_groups * state_size, hidden_size) with "
                         f"n_groups={G}")
    hidden, P, N = out[0], out[1] // H, states[0] // G
    rows = {SSM_IN_Z: H * P, SSM_IN_X: H * P, SSM_IN_B: G * N, SSM_IN_C: G * N, SSM_IN_DT: H, SSM_OUT: hidden}
    channels = dict(zip(SSM_CONV, (H * P, G * N, G * N)))
    expected = {**{f"{slot}.weight": (n, hidden) for slot, n in rows.items()},
                **{f"{slot}.bias": (n,) for slot, n in (*rows.items(), *channels.items())},
                **{f"{slot}.weight": (n, 1, K) for slot, n in channels.items()},
                **{slot: (H,) for slot in SSM_SCALARS}, f"{SSM_NORM}.weight": (H * P,),
                f"{SSM_OUT}.weight": (hidden, H * P)}
    for name, t in weights.items():
        if _shape(t) != expected[name]:
            raise ValueError(f"{name} has shape {_shape(t)}; expected {expected[name]} for hidden_size={hidden}, "
                             f"num_heads={H}, head_dim={P} (from {SSM_OUT}.weight), n_groups={G}, state_size={N} "
                             f"(from {SSM_IN_B}.weight), conv_kernel={K}")
    return SSMWidths(hidden, P, N)


def _unit_ordered(module: nn.Module, order: tuple[int, torch.Tensor] | None) -> nn.Module:
    """``module``, or with ``order`` (axis 0, order) its parameters held in unit order (``UnitOrderedParams``)."""
    return module if order is None else UnitOrderedParams(module, order[1])


def _conv(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv1d:
    """A depthwise convolution [channels, 1, K] holding ``weight`` (and ``bias``) without a copy;
    the mixer pads it with the state (or zeros) itself."""
    with torch.device("meta"):
        conv = nn.Conv1d(weight.shape[0], weight.shape[0], weight.shape[2], groups=weight.shape[0],
                         bias=bias is not None)
    conv.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        conv.bias = nn.Parameter(bias, requires_grad=False)
    return conv


class SSMMixer(nn.Module):
    """A Mamba2 mixer of its own head dimension P and state size N (``mixer_widths``), holding its
    tensors without a copy in modules named by slot: projections ``ssm_in_z``, ``ssm_in_x``,
    ``ssm_in_b``, ``ssm_in_c``, ``ssm_in_dt``, ``ssm_out`` (``_linear``: float or packed),
    depthwise convolutions ``ssm_conv1d_x``, ``ssm_conv1d_b``, ``ssm_conv1d_c``, the gated norm
    ``ssm_norm`` and the bare parameters ``ssm_dt`` (dt_bias), ``ssm_a`` (A_log) and ``ssm_d`` (D),
    so that its tensors' names are their runtime names within the block. ``orders`` names the slots
    whose pruned axis ``weights`` holds in unit order: projections (``UnitOrdered``), convolutions
    and the gated norm (``UnitOrderedParams``, along their channels); it computes the same.

    ``prefill`` runs a sequence through the chunked SSD scan from a state (zeros if None) and
    ``step`` one token through the recurrence, each advancing the state in place; what they
    compute is transformers' ``Mamba2Mixer`` at head_dim = P, state_size = N."""

    def __init__(self, weights: Mapping[str, Weight], config: SSMConfig,
                 orders: Mapping[str, tuple[int, torch.Tensor]] | None = None):
        super().__init__()
        widths = mixer_widths(weights, config)
        orders = orders or {}
        channels = (*SSM_CONV, SSM_NORM)  # held in unit order along axis 0, their channels
        unexpected = sorted(slot for slot, (axis, _) in orders.items()
                            if slot not in SSM_MATRICES and not (slot in channels and axis == 0))
        if unexpected:
            raise ElastiqError(f"a Mamba2 mixer holds in unit order only its projections and the channels of its "
                               f"convolutions and gated norm; got unit orders for {', '.join(unexpected)}")
        self.config = config
        self.num_heads, self.n_groups = config.num_heads, config.n_groups
        self.hidden_size, self.head_dim, self.state_size = widths.hidden_size, widths.head_dim, widths.state_size
        self.width = self.num_heads * self.head_dim  # H*P: z, x, y
        self.conv_sizes = (self.width, self.n_groups * self.state_size, self.n_groups * self.state_size)  # x, B, C
        self.conv_channels = sum(self.conv_sizes)
        for slot in SSM_MATRICES:
            setattr(self, slot, _linear(weights[f"{slot}.weight"], weights.get(f"{slot}.bias"), orders.get(slot)))
        for slot in SSM_CONV:
            setattr(self, slot, _unit_ordered(_conv(weights[f"{slot}.weight"], weights.get(f"{slot}.bias")),
                                              orders.get(slot)))
        for slot in SSM_SCALARS:
            setattr(self, slot, nn.Parameter(weights[slot], requires_grad=False))
        self.ssm_norm = SiLUGate(self.width) if not config.gated_norm else \
            _unit_ordered(GatedRMSNorm(weights[f"{SSM_NORM}.weight"], self.n_groups, config.layer_norm_epsilon),
                          orders.get(SSM_NORM))

    @property
    def A(self) -> torch.Tensor:
        """The (negative) continuous-time decay of each head [H], float32."""
        return -torch.exp(self.ssm_a.float())

    def _conv_parts(self) -> tuple[tuple[nn.Module, torch.Tensor, torch.Tensor | None], ...]:
        """(projection, convolution weight [channels, 1, K], its bias or None) of x, B and C, in the
        model's order: the convolutions' channels, in this order."""
        return tuple((project, *_in_model_order(conv)) for project, conv in
                     ((self.ssm_in_x, self.ssm_conv1d_x), (self.ssm_in_b, self.ssm_conv1d_b),
                      (self.ssm_in_c, self.ssm_conv1d_c)))

    def new_state(self, batch: int, dtype: torch.dtype = torch.float32) -> SSMState:
        """An empty state (zeros: no past) of this mixer's widths, on its device."""
        device = self.ssm_a.device
        return SSMState(torch.zeros(batch, self.conv_channels, self.config.conv_kernel, dtype=dtype, device=device),
                        torch.zeros(batch, self.num_heads, self.head_dim, self.state_size, dtype=dtype, device=device))

    def _heads_groups(self, x: torch.Tensor, B: torch.Tensor, C: torch.Tensor):
        """x [..., H, P], B and C [..., G, N] of the convolutions' outputs [..., H*P], [..., G*N]."""
        groups = (self.n_groups, self.state_size)
        return x.unflatten(-1, (self.num_heads, self.head_dim)), B.unflatten(-1, groups), C.unflatten(-1, groups)

    def _time_step(self, dt: torch.Tensor) -> torch.Tensor:
        """softplus(dt + dt_bias) within the time-step limit, float32."""
        low, high = self.config.time_step_limit
        return F.softplus(dt.float() + self.ssm_dt.float()).clamp(low, high)

    def _output(self, y: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.ssm_out(self.ssm_norm(y, z).to(dtype))

    def scan_inputs(self, hidden: torch.Tensor, past: torch.Tensor | None = None) -> ScanInputs:
        """The scan's inputs for ``hidden`` [b, T, hidden]; ``past`` [b, channels, K-1]: the
        convolutions' inputs before the sequence (zeros if None)."""
        K = self.config.conv_kernel
        if past is None:
            past = hidden.new_zeros(hidden.shape[0], self.conv_channels, K - 1)
        last, out = [], []
        for (project, weight, bias), before in zip(self._conv_parts(), past.split(self.conv_sizes, 1)):
            u = project(hidden).transpose(1, 2)  # [b, channels, T]
            window = torch.cat([before.to(u.dtype), u], -1)
            last.append(window[..., -K:])
            out.append(F.silu(F.conv1d(window, weight, bias, groups=window.shape[1])).transpose(1, 2))
        return ScanInputs(self.ssm_in_z(hidden), torch.cat(last, 1), *self._heads_groups(*out),
                          self._time_step(self.ssm_in_dt(hidden)))

    def prefill(self, hidden: torch.Tensor, state: SSMState | None = None) -> tuple[torch.Tensor, SSMState]:
        """The mixer's output [b, T, hidden] for ``hidden`` [b, T, hidden] by the chunked scan,
        continuing from ``state`` (an empty one if None), and the state after the sequence:
        ``state`` itself, advanced in place, or a new float32 one."""
        if state is None:
            state = self.new_state(hidden.shape[0])
        out, window, ssm = self._scan(hidden, state.conv[..., 1:], state.ssm)
        state.advance(window, ssm, hidden.shape[1])
        return out, state

    def _scan(self, hidden: torch.Tensor, past: torch.Tensor | None,
              initial: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The output for ``hidden`` after the convolutions' inputs ``past`` and the SSM state
        ``initial`` (zeros if None), the convolutions' last window and the SSM state after it."""
        s = self.scan_inputs(hidden, past)
        y, ssm = ssd_scan(s.x, s.dt, self.A, s.B, s.C, self.config.chunk_size, initial)
        y = y + self.ssm_d.float()[:, None] * s.x.float()
        return self._output(y.flatten(-2), s.z, hidden.dtype), s.window, ssm

    def step(self, hidden: torch.Tensor, state: SSMState) -> torch.Tensor:
        """The output [b, 1, hidden] for one token ``hidden`` [b, 1, hidden] after ``state``, which
        is advanced by that token in place."""
        if hidden.shape[1] != 1:
            raise ValueError(f"step takes one token, [batch, 1, hidden]; got {tuple(hidden.shape)}: use prefill")
        h = hidden[:, 0]
        with state.updating(1):
            windows, out = [], []
            for (project, weight, bias), before in zip(self._conv_parts(), state.conv.split(self.conv_sizes, 1)):
                u = project(h)
                window = torch.cat([before[..., 1:], u[..., None].to(before.dtype)], -1)  # [b, channels, K]
                windows.append(window)
                c = (window.to(u.dtype) * weight[:, 0]).sum(-1)
                out.append(F.silu(c if bias is None else c + bias))
            x, B, C = self._heads_groups(*out)
            y = ssm_step_(state.ssm, x, self._time_step(self.ssm_in_dt(h)), self.A, B, C)
            state.conv.copy_(torch.cat(windows, 1))
        y = y + self.ssm_d.float()[:, None] * x.float()
        return self._output(y.flatten(-2), self.ssm_in_z(h), hidden.dtype)[:, None]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output [b, T, hidden] of a whole sequence from no past, keeping no state (so that it
        can be trained through: a state is advanced in place)."""
        return self._scan(hidden, None, None)[0]


class SSMBlock(Attending, SSMMixer):
    """Pre-norm Mamba2 block of its own widths: x + mixer(attn_norm(x)), its modules named by slot
    (``SSMMixer``, and ``attn_norm``), so a block tensor's runtime name is ``layers.{i}.{slot}.{param}``
    (``layers.{i}.ssm_dt`` for the bare ones). A hybrid's block adds a gated MLP of its own width
    after the mixer, h + MLP(ffn_norm(h)) (Bamba), and may run attention beside the mixer on the
    same normed input, x + mixer(n) + attention(n) (Falcon-H1; ``layer.attention``, ``attending``).
    ``state`` is its recurrent state for decoding at a position (``Transformer.setup_caches``), the
    counterpart of an attention block's KV cache. ``orders`` as in ``SSMMixer``."""

    def __init__(self, args: ModelArgs, w: Mapping[str, Weight],
                 orders: Mapping[str, tuple[int, torch.Tensor]] | None = None, layer: SSMLayerArgs | None = None,
                 attending: LayerAttention | None = None):
        mixer = (*SSM_MATRICES, *SSM_CONV, SSM_NORM)
        super().__init__(mixer_tensors(w), args.ssm, {s: o for s, o in (orders or {}).items() if s in mixer})
        if layer is not None and layer.attention is not None:
            self.init_attention(args, layer.attention, w, attending, orders)
        else:
            self.attn_q, self.rope, self.kv_cache = None, None, None
        self.attn_norm = _norm(w[f"{ATTN_NORM}.weight"], args.rms_norm_eps)
        self.ffn_norm = _norm(w[f"{FFN_NORM}.weight"], args.rms_norm_eps) if f"{FFN_NORM}.weight" in w else None
        for slot in (FFN_GATE, FFN_UP, FFN_DOWN):
            setattr(self, slot, _linear(w[f"{slot}.weight"], w.get(f"{slot}.bias"), (orders or {}).get(slot))
                    if self.ffn_norm is not None else None)
        self.act = ACTIVATIONS[args.hidden_act]
        self.state: SSMState | None = None

    def check_start(self, start: int) -> SSMState:
        """The state that decoding at position ``start`` goes on from: a state goes on from the
        position it has reached, or restarts at 0; it cannot go back (nor skip ahead)."""
        if self.state is None:
            raise ElastiqError("decoding at a position needs the recurrent states: call setup_caches first")
        if start != 0 and start != self.state.position:
            reached = ("an update that did not finish" if self.state.position is None else
                       f"position {self.state.position}")
            raise ElastiqError(f"cannot run from position {start}: a recurrent state cannot go back, and this one "
                               f"stands at {reached}; run from there or from 0")
        return self.state

    def forward(self, x: torch.Tensor, start: int | None = None, tables: tuple | None = None) -> torch.Tensor:
        """The block on ``x`` [B, T, hidden]: with ``start`` None from no past (no state kept);
        else at positions start..start+T-1 from ``state`` (reset when ``start`` is 0), advancing it;
        attention beside the mixer at the positions of ``tables`` (``rope_tables``)."""
        h = self.attn_norm(x)
        if start is None:
            mixed = SSMMixer.forward(self, h)
        else:
            state = self.check_start(start)
            if start == 0:
                state.reset()
            mixed = self.step(h, state) if h.shape[1] == 1 else self.prefill(h, state)[0]
        out = x + (mixed if self.attn_q is None else mixed + self.attention(h, tables, start))
        if self.ffn_norm is None:
            return out
        m = self.ffn_norm(out)
        return out + self.ffn_down(self.act(self.ffn_gate(m)) * self.ffn_up(m))


def build_block(args: ModelArgs, layer: LayerArgs | SSMLayerArgs, w: Mapping[str, Weight],
                attending: LayerAttention | None, orders: Mapping[str, tuple[int, torch.Tensor]] | None = None
                ) -> Block | SSMBlock:
    """The block of widths ``layer`` (``layer_args``) holding ``w`` (runtime names within it):
    ``Block`` for attention, ``SSMBlock`` for a Mamba2 mixer; ``orders`` {slot: (axis, order)}
    names the slots ``w`` holds with their pruned axis in unit order."""
    if isinstance(layer, LayerArgs):
        return Block(args, layer, w, attending, orders)
    return SSMBlock(args, w, orders, layer, attending)


class Transformer(nn.Module):
    """Embeddings, blocks of per-layer widths (attention ``Block`` or Mamba2 ``SSMBlock``), final
    norm and LM head (tied to the embeddings when the config says so: then one parameter or one
    ``Q8Weight``; a tied Q4_0 embedding keeps its codes for lookups and the head its own packed
    form for the int4 matmul). ``attending`` is None for a Mamba2 block, which has no rotary
    frequencies."""

    def __init__(self, args: ModelArgs, weights: Mapping[str, Weight], attending: list[LayerAttention | None],
                 dtype: torch.dtype, orders: Mapping[str, tuple[int, torch.Tensor]] | None = None):
        super().__init__()
        self.args, self.dtype, self.attending = args, dtype, attending
        # the first block of each set of rotary frequencies: blocks of one layer type share a RoPE
        # table (None: a block without RoPE, which needs none)
        self.rope_groups = [None if a is None or a.inv_freq is None else
                            next(j for j, b in enumerate(attending) if b is not None and b.inv_freq is a.inv_freq and
                                 b.scaling == a.scaling) for a in attending]
        embed = weights["embed_tokens.weight"]
        if isinstance(embed, QuantizedTensor):
            self.embed_tokens = Q4Embedding(embed, dtype)
        elif isinstance(embed, Q8Weight):
            self.embed_tokens = Q8Embedding(embed)
        else:
            with torch.device("meta"):
                self.embed_tokens = nn.Embedding(*embed.shape)
            self.embed_tokens.weight = nn.Parameter(embed, requires_grad=False)
        self.layers = nn.ModuleList(build_block(args, layer, block_weights(weights, i), attending[i],
                                                block_weights(orders or {}, i))
                                    for i, layer in enumerate(args.layers))
        self.norm = _norm(weights["norm.weight"], args.rms_norm_eps)
        self.lm_head = _linear(weights["lm_head.weight"], None)
        if args.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):
            self.lm_head.weight = self.embed_tokens.weight  # tied: one parameter
        for module in self.modules():  # the 4-bit kernels skip this check on every call
            if not isinstance(module, (Q4Linear, Q8PairLinear)):
                continue
            weight = module.weight if isinstance(module, Q4Linear) else module.weight.high  # a pair: 4-bit halves
            if dtype not in q4_activation_dtypes(weight):
                accepted = " or ".join(str(d).removeprefix("torch.") for d in q4_activation_dtypes(weight))
                raise ElastiqError(f"4-bit matrices prepared for the {weight.path} kernel multiply {accepted} "
                                   f"activations; the model was asked for {str(dtype).removeprefix('torch.')}")

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def forward(self, input_ids: torch.Tensor, start: int | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, vocab] of ``input_ids`` [B, T]: with ``start`` None, the full causal
        sequence from position 0 without caches (right padding leaves the logits at real positions
        unchanged) and Mamba2 blocks from a zero state, kept nowhere; with ``start``, the tokens at
        positions start..start+T-1 attending to the KV caches and going on from the recurrent
        states, which ``start`` 0 resets and any other ``start`` must continue (``resumable``;
        else ElastiqError, before any block runs). ``last_only`` computes the logits of the last
        position only ([B, 1, vocab])."""
        if start is not None:
            for layer in self._ssm_blocks():
                layer.check_start(start)
        T = input_ids.shape[1]
        end = T if start is None else start + T
        positions = torch.arange(end - T, end, device=input_ids.device)
        x = self.embed(input_ids)
        tables = {}  # one RoPE table per set of frequencies (layer type) and forward pass
        for layer, group in zip(self.layers, self.rope_groups):
            if group is not None and group not in tables:
                tables[group] = layer.rope_tables(positions)
            if isinstance(layer, SSMBlock):
                x = layer(x, start, tables.get(group))
            else:
                x = layer(x, tables.get(group), start)
        x = self.norm(x[:, -1:] if last_only else x)
        return self.lm_head(x)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The hidden states [B, T, hidden] the first block reads: the embeddings of ``input_ids``
        [B, T] in the model's dtype, scaled where the family scales them (Gemma)."""
        x = self.embed_tokens(input_ids).to(self.dtype)
        if self.args.embed_scale != 1:
            x = x * torch.tensor(self.args.embed_scale, dtype=self.dtype)
        return x

    def setup_caches(self, batch: int, max_seq: int) -> None:
        """Give every attention block an empty KV cache of ``max_seq`` positions in the model's
        dtype, and every Mamba2 block an empty recurrent state of its widths in float32 (constant
        in ``max_seq``; ``ssm.state_bytes``)."""
        for layer in self.layers:
            if isinstance(layer, SSMBlock):
                layer.state = layer.new_state(batch)
            if layer.attn_q is not None:
                layer.kv_cache = KVCache(batch, max_seq, layer.attn_kv_heads, layer.qk_dim, layer.v_dim, self.dtype,
                                         self.device)

    def clear_caches(self) -> None:
        for layer in self.layers:
            if isinstance(layer, SSMBlock):
                layer.state = None
            layer.kv_cache = None

    def _ssm_blocks(self) -> list[SSMBlock]:
        return [layer for layer in self.layers if isinstance(layer, SSMBlock)]

    def resumable(self, start: int) -> bool:
        """Whether ``forward(ids, start=start)`` may go on from the caches as they are: a KV cache
        from any position it holds, a recurrent state only from the position it has reached (or
        from 0, which resets it). Always true for a model without Mamba2 blocks."""
        return start == 0 or all(layer.state is not None and layer.state.position == start
                                 for layer in self._ssm_blocks())

    @classmethod
    def from_weights(cls, weights: Mapping[str, Weight], config: Mapping, dtype: torch.dtype = torch.float32,
                     int4: bool = False, orders: Mapping[str, tuple[int, torch.Tensor]] | None = None) -> "Transformer":
        """The model of ``weights`` (a checkpoint's or transformers' names, any rate's widths, with
        or without each block's rotary pair indices [G, u]: pairs 0..u-1 when absent) and the
        Hugging Face config dict ``config``, computing in ``dtype``. Float tensors become the
        parameters without a copy when they already have ``dtype``. Quantized matrices
        (``QuantizedTensor``, ``Q8Tensor``) are dequantized to ``dtype`` (the reference), or with
        ``int4`` kept packed for the quantized kernels (then ``dtype`` must suit them: bfloat16 on
        CPU); weights already prepared (``Q4Weight``, ``Q8Weight``, as ``resident`` makes them)
        are used as they are. A tied embedding and head are made resident once. ``orders``
        {runtime name of a block's slot, ``layers.{i}.{slot}``: (axis, order)} says which matrices
        (and their biases) ``weights`` holds with their pruned axis in unit order."""
        weights = _resident_weights(weights, config, dtype, int4)
        args = ModelArgs.from_weights(weights, config)
        device = _device(weights["norm.weight"])
        attention = [attends(layer) for layer in args.layers]
        # rotary frequencies for attention blocks only (a Mamba2 model's config has none)
        attending = layer_attention(config, device) if any(attention) else [None] * len(attention)
        for i, layer in enumerate(attention):
            if layer is not None and attending[i].inv_freq is not None:
                name = f"layers.{i}.{ROPE_PAIRS}"
                weights[name] = _rope_pairs(weights.get(name), layer, args.num_kv_heads, i, device,
                                            attending[i].inv_freq.shape[0])
        attending = [a if layer is not None else None for a, layer in zip(attending, attention)]
        return cls(args, weights, attending, dtype, orders).eval()

    @classmethod
    def from_hf(cls, model: nn.Module) -> "Transformer":
        """The elastic model of a transformers causal LM as intake gives it (converted by its family:
        Mamba2 mixers split, heads of partial RoPE laid out whole), sharing its tensors."""
        return cls.from_weights(model.state_dict(), config_dict(model.config))

    @classmethod
    def ends_from_weights(cls, weights: Mapping[str, Weight], config: Mapping) -> "Transformer":
        """The model of ``config`` without its blocks, from its top-level tensors alone (token
        embedding, final norm, LM head or a tied head; names as in ``from_weights``), in float32
        with quantized ones dequantized: with ``block_from_weights``, a stage holds one block at
        a time and computes ``lm_head(norm(block_n(...block_0(embed(ids)))))``, what ``forward``
        computes, without the whole model in memory."""
        return cls(ModelArgs.from_config(config), _resident_weights(weights, config, torch.float32, False), [],
                   torch.float32).eval()


def block_from_weights(weights: Mapping[str, Weight], config: Mapping, index: int) -> Block | SSMBlock:
    """Block ``index`` of the model of ``config`` from its own tensors alone (names as in
    ``Transformer.from_weights``; pairs 0..u-1 when its rotary pair indices are absent), in
    float32 with quantized matrices dequantized: the block ``Transformer.from_weights`` builds,
    computing the same, for a stage that holds one block at a time. An attention block runs on
    its own RoPE tables (``block(x, block.rope_tables(positions))``), a Mamba2 block as ``block(x)``."""
    args = ModelArgs.from_config(config)
    w = block_weights(_resident_weights(weights, config, torch.float32, False), index)
    layer = layer_args(w, args.num_kv_heads, args.ssm, index)
    attending = None
    if attends(layer) is not None:
        device = _device(w[f"{ATTN_NORM}.weight"])
        attending = layer_attention(config, device)[index]
        if attending.inv_freq is not None:
            w[ROPE_PAIRS] = _rope_pairs(w.get(ROPE_PAIRS), attends(layer), args.num_kv_heads, index, device,
                                        attending.inv_freq.shape[0])
    return build_block(args, layer, w, attending).eval()


def _resident_weights(weights: Mapping[str, Weight], config: Mapping, dtype: torch.dtype,
                      int4: bool) -> dict[str, Weight]:
    """``weights`` under runtime names (``runtime_weights``), the head naming the embedding where
    the config ties them, each in the form the model holds it (``resident``; a tied Q8_0 embedding
    and head share one)."""
    weights = runtime_weights(weights, config)
    if config.get("tie_word_embeddings") and "embed_tokens.weight" in weights:
        weights["lm_head.weight"] = weights["embed_tokens.weight"]
    q8: dict[int, Weight] = {}  # a tied Q8_0 embedding and head share one resident form
    for name, t in weights.items():
        if not isinstance(t, Q8Tensor):
            weights[name] = resident(name, t, dtype, int4)
        elif id(t) in q8:
            weights[name] = q8[id(t)]
        else:
            weights[name] = q8[id(t)] = resident(name, t, dtype, int4)
    return weights


def _rope_pairs(pairs: torch.Tensor | None, layer: LayerArgs, num_kv_heads: int, index: int,
                device: torch.device, frequencies: int) -> torch.Tensor:
    """Block ``index``'s rotary pair indices [G, u] as the model holds them (int64): ``pairs``, or
    pairs 0..u-1 of every KV head when absent (a family or group that keeps every pair)."""
    u = layer.rope_pairs
    if pairs is None:
        pairs = torch.arange(u, device=device).expand(num_kv_heads, -1)
    if pairs.shape != (num_kv_heads, u) or u > frequencies:
        raise ElastiqError(f"layer {index}: rope_pairs has shape {tuple(pairs.shape)}, the key projection's "
                           f"rows and {frequencies} rotary frequencies say {(num_kv_heads, u)}")
    return pairs.long()


def resident(name: str, t: Weight, dtype: torch.dtype, int4: bool) -> Weight:
    """Tensor ``name`` (its runtime name) in the form the model holds it: floats in ``dtype`` (norm
    weights and a Mamba2 mixer's bare dt_bias, A_log and D in float32, as its scan computes),
    integers (rotary pair indices) in int64; quantized matrices dequantized,
    or with ``int4`` prepared for their kernels (a Q4_0 token embedding stays as codes, since a
    lookup needs rows, not a matmul; a Q8_0 one is held block-major for both; a Q8_0 block matrix
    as ``kernels.prepare_q8_matrix`` holds it)."""
    if isinstance(t, Q8Tensor):
        if not int4:
            return t.dequantize().to(dtype)
        if name in (f"{EMBED}.weight", f"{HEAD}.weight"):
            return prepare_q8(t.codes, t.scales, dtype, t.codes.device)
        return prepare_q8_matrix(t.codes, t.scales, dtype, t.codes.device)
    if isinstance(t, QuantizedTensor):
        if not int4:
            return t.dequantize().to(dtype)
        if name == "embed_tokens.weight":
            return t
        return prepare_q4(t.codes, t.scales, t.codes.device)
    if isinstance(t, (Q4Weight, Q8Weight, Q8Pair)):
        return t
    if is_norm(name) or name.rpartition(".")[2] in SSM_SCALARS:
        return t.float()  # the norms and the SSM scan compute in float32
    return t.to(dtype) if t.is_floating_point() else t.long()


def block_weights(weights: Mapping[str, Weight], index: int) -> dict[str, Weight]:
    """The tensors of block ``index`` by their names within the block."""
    prefix = f"layers.{index}."
    return {k.removeprefix(prefix): t for k, t in weights.items() if k.startswith(prefix)}


def _rows(t: Weight) -> int:
    return t.out_features if isinstance(t, (Q4Weight, Q8Weight, Q8Pair)) else t.shape[0]


def _device(t: Weight) -> torch.device:
    return t.codes.device if isinstance(t, (QuantizedTensor, Q8Tensor, Q8Weight)) else t.device


def rope_parameters(config: Mapping, layer_type: str | None = None) -> Mapping:
    """The RoPE parameters of a layer type (a config may give each type its own, as Gemma 3 does)."""
    rope = config.get("rope_parameters") or {**(config.get("rope_scaling") or {}),
                                             "rope_theta": config.get("rope_theta", 10000.0)}
    return rope[layer_type] if isinstance(rope.get(layer_type), Mapping) else rope


def rotary_frequencies(config: Mapping, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """inv_freq [d/2] of the original head size d and the cos/sin scaling factor of the blocks of
    ``layer_type``, computed as transformers computes them: the default formula from the config
    dict itself, or transformers' own initialiser of a scaled RoPE type (building a transformers
    config object costs ~160 MB of memory, which a device running the default type is spared)."""
    rope = rope_parameters(config, layer_type)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        dim = int(dim * rope.get("partial_rotary_factor", config.get("partial_rotary_factor") or 1.0))
        return 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    try:
        hf_config = AutoConfig.for_model(**config)
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, layer_type=layer_type)
    except (KeyError, TypeError, ValueError) as err:  # a config from a checkpoint is untrusted input
        raise ElastiqError(f"the config's {rope_type} RoPE parameters are not what transformers takes: {err!r}") from None
    return inv_freq.float(), float(scaling)
