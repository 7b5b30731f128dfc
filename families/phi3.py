"""Phi-3 (and Phi-3.5-mini): Llama's block with q, k and v fused in one projection
(``qkv_proj``, rows [q | k | v]) and gate and up in another (``gate_up_proj``, rows [gate | up]).

A fused matrix cannot be pruned as the parts it fuses, so intake splits it: ``convert`` turns a
transformers Phi-3 model into the Mistral model (Llama's block with Phi-3's sliding window) that
computes the same logits, and every stage then asks the Llama description. The checkpoint and
its Hugging Face export are therefore Mistral's (stock, and exact); the source's ``model_type``
stays ``phi3`` in the manifest. Partial rotary embeddings (Phi-4-mini) are refused.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ElastiqError
from .base import Family
from .llama import PARTS


def unfuse(model: nn.Module) -> nn.Module:
    """The ``MistralForCausalLM`` of a transformers ``Phi3ForCausalLM``, its q/k/v and gate/up split."""
    from transformers import MistralConfig, MistralForCausalLM

    c = model.config
    rope = dict(c.rope_parameters or {})
    if (rope.get("partial_rotary_factor") or getattr(c, "partial_rotary_factor", None) or 1.0) != 1.0:
        raise ElastiqError("this Phi-3 model turns only part of each head by RoPE (partial_rotary_factor "
                           f"{rope.get('partial_rotary_factor')}); elastiq runs Phi-3 models whose RoPE turns "
                           "the whole head")
    rope.pop("partial_rotary_factor", None)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    config = MistralConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                           num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                           num_key_value_heads=c.num_key_value_heads, head_dim=head_dim, hidden_act=c.hidden_act,
                           max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                           rope_parameters=rope, sliding_window=c.sliding_window,
                           tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id,
                           eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
    if rope.get("rope_type") == "longrope":
        config.original_max_position_embeddings = c.original_max_position_embeddings
    state = {}
    q_rows, kv_rows = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    for name, t in model.state_dict().items():
        if name.endswith("self_attn.qkv_proj.weight"):
            prefix = name.removesuffix("qkv_proj.weight")
            for part, rows in zip(("q", "k", "v"), t.split((q_rows, kv_rows, kv_rows))):
                state[f"{prefix}{part}_proj.weight"] = rows
        elif name.endswith("mlp.gate_up_proj.weight"):
            prefix = name.removesuffix("gate_up_proj.weight")
            gate, up = t.chunk(2)
            state[f"{prefix}gate_proj.weight"], state[f"{prefix}up_proj.weight"] = gate, up
        else:
            state[name] = t
    with torch.device("meta"):  # no second copy of the weights: the split tensors are assigned
        out = MistralForCausalLM(config)
    out.load_state_dict({k: v.contiguous() for k, v in state.items()}, assign=True, strict=not c.tie_word_embeddings)
    if c.tie_word_embeddings:
        out.tie_weights()
    out.model.rotary_emb = type(out.model.rotary_emb)(config)  # its frequencies are not weights: made here
    return out.eval()


PHI3 = Family("phi3", model_types=("phi3",), gguf_architectures=("phi3",), parts=PARTS, convert=unfuse)
