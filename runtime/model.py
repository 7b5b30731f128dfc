"""The elastic model: a Llama / Mistral / Qwen2 decoder whose every layer has its own widths.

A sorted model pruned at some rate keeps a prefix of every prunable axis, so its layers differ
in MLP width, kept rotary pairs per KV head (q/k head size 2u) and V/O rank (value head size r).
This module runs such a model in plain torch (after gpt-fast's ``model.py``): the widths are read
off the tensors' shapes, RoPE gathers each KV group's frequencies by its stored pair indices
(``elastiq.kernels.rope``), and the attention scale stays that of the original head size.
Modules carry Hugging Face's names, so a Hugging Face state dict loads by dropping ``model.``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .. import ElastiqError
from ..kernels import apply_rope_gather
from ..quants import QuantizedTensor


@dataclass(frozen=True)
class LayerArgs:
    """Widths of one block: MLP channels, rotary pairs u per KV head, V/O rank r per KV head."""

    intermediate_size: int
    rope_pairs: int
    v_rank: int
    biases: frozenset[str]  # the projections that carry a bias, as "self_attn.q_proj"


@dataclass(frozen=True)
class ModelArgs:
    """The unpruned shape of the model (from its config) and the widths of each block."""

    vocab_size: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # the original head size d: fixes the attention scale and the rotary frequencies
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_scaling: float  # transformers' post-processing factor of cos/sin (1 for default RoPE)
    sliding_window: int | None
    layers: tuple[LayerArgs, ...]

    @classmethod
    def from_weights(cls, weights: Mapping[str, torch.Tensor], config: Mapping,
                     attention_scaling: float) -> "ModelArgs":
        """Read each block's widths off the shapes of its tensors in ``weights`` (Hugging Face names)."""
        if config.get("hidden_act", "silu") != "silu":
            raise ElastiqError(f"hidden_act {config['hidden_act']!r} is not supported; "
                               "the elastic model runs SwiGLU (silu)")
        num_heads = config["num_attention_heads"]
        num_kv_heads = config.get("num_key_value_heads") or num_heads
        layers = []
        for i in range(config["num_hidden_layers"]):
            p = f"model.layers.{i}."
            k_rows = weights[p + "self_attn.k_proj.weight"].shape[0]
            v_rows = weights[p + "self_attn.v_proj.weight"].shape[0]
            if k_rows % (2 * num_kv_heads) or v_rows % num_kv_heads:
                raise ElastiqError(f"layer {i}: k_proj has {k_rows} rows and v_proj {v_rows}; expected whole rotary "
                                   f"pairs and whole V ranks for each of the {num_kv_heads} KV heads")
            biases = frozenset(name.removeprefix(p).removesuffix(".bias") for name in weights
                               if name.startswith(p) and name.endswith(".bias"))
            layers.append(LayerArgs(weights[p + "mlp.gate_proj.weight"].shape[0], k_rows // (2 * num_kv_heads),
                                    v_rows // num_kv_heads, biases))
        layer_types = config.get("layer_types")
        windowed = config.get("sliding_window") and (layer_types is None or "sliding_attention" in layer_types)
        return cls(vocab_size=config["vocab_size"], hidden_size=config["hidden_size"], num_heads=num_heads,
                   num_kv_heads=num_kv_heads,
                   head_dim=config.get("head_dim") or config["hidden_size"] // num_heads,
                   rms_norm_eps=config["rms_norm_eps"], tie_word_embeddings=config.get("tie_word_embeddings", False),
                   attention_scaling=attention_scaling,
                   sliding_window=config["sliding_window"] if windowed else None, layers=tuple(layers))


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 as transformers does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class FeedForward(nn.Module):
    """SwiGLU MLP of a block's own width."""

    def __init__(self, args: ModelArgs, layer: LayerArgs):
        super().__init__()
        dim, width = args.hidden_size, layer.intermediate_size
        self.gate_proj = nn.Linear(dim, width, bias="mlp.gate_proj" in layer.biases)
        self.up_proj = nn.Linear(dim, width, bias="mlp.up_proj" in layer.biases)
        self.down_proj = nn.Linear(width, dim, bias="mlp.down_proj" in layer.biases)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """Grouped-query attention with q/k heads of 2u channels, value heads of r channels, and
    RoPE frequencies gathered by ``rope_pairs`` [G, u] (original pair index of each kept pair)."""

    def __init__(self, args: ModelArgs, layer: LayerArgs):
        super().__init__()
        H, G, u, r = args.num_heads, args.num_kv_heads, layer.rope_pairs, layer.v_rank
        self.num_heads, self.num_kv_heads = H, G
        self.qk_dim, self.v_dim = 2 * u, r
        self.scale = 1 / math.sqrt(args.head_dim)  # pruning drops terms of q.k, it does not rescale it
        self.attention_scaling = args.attention_scaling
        self.q_proj = nn.Linear(args.hidden_size, H * 2 * u, bias="self_attn.q_proj" in layer.biases)
        self.k_proj = nn.Linear(args.hidden_size, G * 2 * u, bias="self_attn.k_proj" in layer.biases)
        self.v_proj = nn.Linear(args.hidden_size, G * r, bias="self_attn.v_proj" in layer.biases)
        self.o_proj = nn.Linear(H * r, args.hidden_size, bias="self_attn.o_proj" in layer.biases)
        self.register_buffer("rope_pairs", torch.zeros(G, u, dtype=torch.long))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, T, H, 2u], k [B, T, G, 2u], v [B, T, G, r] of hidden states ``x`` [B, T, hidden]."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.qk_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.qk_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.v_dim)
        return q, k, v

    def rotate(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> None:
        """RoPE in place at ``positions``: the query heads of KV group g use group g's frequencies
        (``elastiq.kernels`` picks the Triton kernel on a GPU, the torch path elsewhere)."""
        apply_rope_gather(q, k, positions, inv_freq, self.rope_pairs, self.attention_scaling)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention over [B, T, heads, dim] inputs, each KV head expanded to its query
        heads: [B, H, T, r]."""
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        repeats = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project(x)
        self.rotate(q, k, positions, inv_freq)
        y = self.attend(q, k, v)
        return self.o_proj(y.transpose(1, 2).flatten(2))


class Block(nn.Module):
    """Pre-norm decoder block: x + attention(norm(x)), then + mlp(norm(.))."""

    def __init__(self, args: ModelArgs, layer: LayerArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = FeedForward(args, layer)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), positions, inv_freq)
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    """Embeddings, blocks of per-layer widths, final norm and LM head (tied to the embeddings
    when the config says so: then one parameter)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, layer) for layer in args.layers)
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.register_buffer("inv_freq", torch.zeros(args.head_dim // 2))  # rotary frequencies of the original head
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, vocab] of the full causal sequence ``input_ids`` [B, T]; right padding
        leaves the logits at real positions unchanged."""
        T = input_ids.shape[1]
        if self.args.sliding_window is not None and T > self.args.sliding_window:
            raise ElastiqError(f"{T} tokens exceed the model's sliding attention window of "
                               f"{self.args.sliding_window}, which this runtime does not implement; "
                               f"pass at most {self.args.sliding_window} tokens")
        positions = torch.arange(T, device=input_ids.device)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, positions, self.inv_freq)
        return self.lm_head(self.norm(x))

    @classmethod
    def from_weights(cls, weights: Mapping[str, torch.Tensor | QuantizedTensor], config: Mapping) -> "Transformer":
        """The model of ``weights`` (Hugging Face names, any rate's widths, optional
        ``model.layers.{i}.self_attn.rope_pairs`` [G, u]; pairs 0..u-1 when absent) and the
        Hugging Face config dict ``config``. The tensors become the parameters (no copy);
        quantized matrices are dequantized to float32 (the int4 matmul path is not built yet)."""
        weights = {k: v.dequantize() if isinstance(v, QuantizedTensor) else v for k, v in weights.items()}
        inv_freq, attention_scaling = _rotary_frequencies(config)
        args = ModelArgs.from_weights(weights, config, attention_scaling)
        with torch.device("meta"):
            model = cls(args)
        state = {name.removeprefix("model."): t for name, t in weights.items()}
        device = state["embed_tokens.weight"].device
        if args.tie_word_embeddings:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        state["inv_freq"] = inv_freq.to(device)
        for i, layer in enumerate(args.layers):
            pairs = state.get(f"layers.{i}.self_attn.rope_pairs")
            if pairs is None:
                pairs = torch.arange(layer.rope_pairs, device=device).expand(args.num_kv_heads, -1)
            if pairs.shape != (args.num_kv_heads, layer.rope_pairs):
                raise ElastiqError(f"layer {i}: rope_pairs has shape {tuple(pairs.shape)}, the k_proj rows say "
                                   f"{(args.num_kv_heads, layer.rope_pairs)}")
            state[f"layers.{i}.self_attn.rope_pairs"] = pairs.long()
        model.load_state_dict(state, assign=True)
        if args.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        return model.eval().requires_grad_(False)

    @classmethod
    def from_hf(cls, model: nn.Module) -> "Transformer":
        """The elastic model of a transformers causal LM, sharing its tensors."""
        return cls.from_weights(model.state_dict(), model.config.to_dict())


def _rotary_frequencies(config: Mapping) -> tuple[torch.Tensor, float]:
    """inv_freq [d/2] of the original head size d and the cos/sin scaling factor, from
    transformers' own rotary embedding, so that every RoPE type it supports is computed as it does."""
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(AutoConfig.for_model(**config))
    return rotary.inv_freq.float(), float(rotary.attention_scaling)
