"""Qwen3: Llama's block with q and k normalised per head (RMSNorm over the head size) before RoPE.

That norm averages over every channel of a head, so cutting rotary pairs would change what it
computes for the pairs that stay: Qwen3 offers MLP channels and V/O rank, and keeps every q/k
channel. llama.cpp's ``qwen3`` architecture rotates halves (NeoX style), as transformers does, and
holds one MLP width (its loader refuses a per-layer ``feed_forward_length``, tried with llama.cpp
through llama-cpp-python 0.3.36): a rate's GGUF pads every MLP to its widest block.
"""

from __future__ import annotations

from ..checkpoint import MLP, VO
from .base import ATTN_K_NORM, ATTN_Q_NORM, Family
from .llama import BIAS_FLAGS, PARTS

QWEN3 = Family("qwen3", model_types=("qwen3",), gguf_architectures=("qwen3",),
               parts={**PARTS, ATTN_Q_NORM: "self_attn.q_norm", ATTN_K_NORM: "self_attn.k_norm"},
               bias_flags={"attention_bias": BIAS_FLAGS["attention_bias"]}, offers=(MLP, VO),
               gguf=("qwen3", None), gguf_neox=True,
               kept="every q/k channel is kept: Qwen3 normalises q and k per head before RoPE")
