"""Gemma 3 (text): q and k normalised per head before RoPE, a norm on each branch's output as well
as its input, a GeGLU MLP (tanh-approximated GELU), embeddings scaled by sqrt(hidden), norm
weights stored as w for a scale of 1 + w, q.k scaled by ``query_pre_attn_scalar``, and sliding-
window layers (five of every six) whose RoPE has its own base.

Like Qwen3 it offers MLP channels and V/O rank only. The branch output norms sit between the
residual stream and the matrices that write it, so the residual cannot be rotated (``--rotate``
is refused). The releases with vision (model_type ``gemma3``) are read as their text model.
llama.cpp's ``gemma3`` architecture holds one MLP width (a rate's GGUF pads every MLP to its
widest block) and places the sliding layers itself, all but every sixth with RoPE base 10000: a
model laid out otherwise is refused by the GGUF export.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ..checkpoint import MLP, VO
from .base import ATTN_K_NORM, ATTN_POST_NORM, ATTN_Q_NORM, FFN_NORM, FFN_POST_NORM, Family
from .llama import BIAS_FLAGS, PARTS

GEMMA3 = Family("gemma3", model_types=("gemma3_text",), gguf_architectures=("gemma3",),
                parts={**PARTS, ATTN_Q_NORM: "self_attn.q_norm", ATTN_K_NORM: "self_attn.k_norm",
                       ATTN_POST_NORM: "post_attention_layernorm", FFN_NORM: "pre_feedforward_layernorm",
                       FFN_POST_NORM: "post_feedforward_layernorm"},
                bias_flags={"attention_bias": BIAS_FLAGS["attention_bias"]}, offers=(MLP, VO),
                activations=("gelu_pytorch_tanh",), gguf=("gemma3", None), gguf_neox=True, gguf_swa=(6, 10000.0),
                kept="every q/k channel is kept: Gemma 3 normalises q and k per head before RoPE",
                norm_offset=1.0, scaled_embeddings=True, attention_scalar="query_pre_attn_scalar",
                unrotatable="a norm on each branch's output sits between the residual stream and the matrices that "
                            "write it")


def text_model(model: nn.Module) -> nn.Module:
    """The ``Gemma3ForCausalLM`` of a Gemma 3 with vision (``Gemma3ForConditionalGeneration``, the
    4B and larger releases): its language model and LM head, shared, not copied; the vision tower
    and projector are left behind."""
    from transformers import Gemma3ForCausalLM

    with torch.device("meta"):  # an empty shell: its two parts are the model's own
        out = Gemma3ForCausalLM(model.config.text_config)
    out.model = model.model.language_model
    out.lm_head = model.lm_head
    return out.eval()


# A Gemma 3 folder with vision: intake keeps its text model, which every stage then asks GEMMA3 about.
GEMMA3_VISION = replace(GEMMA3, name="gemma3 (vision)", model_types=("gemma3",), gguf_architectures=(),
                        convert=text_model)
