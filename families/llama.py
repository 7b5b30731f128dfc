"""Llama (and SmolLM, Mistral): pre-norm attention with GQA and RoPE, SwiGLU MLP; biases only
where the config asks for them."""

from __future__ import annotations

from .base import (ATTN_K, ATTN_NORM, ATTN_OUT, ATTN_Q, ATTN_V, FFN_DOWN, FFN_GATE, FFN_NORM, FFN_UP, ROPE_PAIRS,
                   Family)

BIAS_FLAGS = {"attention_bias": (ATTN_Q, ATTN_K, ATTN_V, ATTN_OUT), "mlp_bias": (FFN_GATE, FFN_UP, FFN_DOWN)}

PARTS = {ATTN_NORM: "input_layernorm", ATTN_Q: "self_attn.q_proj", ATTN_K: "self_attn.k_proj",
         ATTN_V: "self_attn.v_proj", ATTN_OUT: "self_attn.o_proj", FFN_NORM: "post_attention_layernorm",
         FFN_GATE: "mlp.gate_proj", FFN_UP: "mlp.up_proj", FFN_DOWN: "mlp.down_proj",
         ROPE_PAIRS: "self_attn.rope_pairs"}

# llama.cpp's converters write Mistral as "llama".
LLAMA = Family("llama", model_types=("llama", "mistral"), gguf_architectures=("llama",), parts=PARTS,
               bias_flags=BIAS_FLAGS)
