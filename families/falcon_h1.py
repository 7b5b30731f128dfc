"""Falcon-H1 (``FalconH1ForCausalLM``): a hybrid whose every block runs attention and a Mamba2
mixer side by side on one normed input, adds both to the residual stream, then a SwiGLU MLP.

Falcon-H1 scales its tensors by muP multipliers (the embeddings, the mixer's input and each part
of its projection, its output, attention's input, keys and output, the MLP's gate and down
projection, the logits). Each is a constant factor of one matrix's rows or columns, so intake
folds them into the weights and sets them to 1 (``fold_multipliers``): every later stage sees a
plain parallel hybrid, and an export in Falcon-H1's own form says multipliers of 1. The mixers are
Mamba2's, split on intake as Mamba2's are; most releases gate them without a norm
(``mamba_rms_norm`` false: y * silu(z)), which the runtime runs as a weightless gate. Groups:
MLP channels, rotary pairs of q/k, V/O rank, the mixers' P and N.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping

import torch
from torch import nn

from ..checkpoint import MLP, QK, SSM_N, SSM_P, VO
from . import bamba
from .base import (ATTN_NORM, EMBED, FFN_DOWN, FFN_GATE, FFN_NORM, FFN_UP, FINAL_NORM, HEAD, PARALLEL, ROPE_PAIRS,
                   SSM_CONV, SSM_IN, SSM_OUT, Family, SSMConfig, check_config)
from .llama import PARTS as LLAMA_PARTS
from .mamba2 import PARTS as MAMBA2_PARTS
from .mamba2 import fuse_mixers, split_mixers

PARTS = {**{slot: path.replace("mixer.", "mamba.") for slot, path in MAMBA2_PARTS.items()},
         **{slot: path for slot, path in LLAMA_PARTS.items() if slot.startswith("attn_") and slot != ATTN_NORM},
         ROPE_PAIRS: LLAMA_PARTS[ROPE_PAIRS], ATTN_NORM: "input_layernorm", FFN_NORM: "pre_ff_layernorm",
         FFN_GATE: "feed_forward.gate_proj", FFN_UP: "feed_forward.up_proj", FFN_DOWN: "feed_forward.down_proj"}

# The config's muP multipliers, and the value that leaves a tensor as it is.
MULTIPLIERS = {"embedding_multiplier": 1.0, "lm_head_multiplier": 1.0, "key_multiplier": 1.0,
               "attention_in_multiplier": 1.0, "attention_out_multiplier": 1.0, "ssm_in_multiplier": 1.0,
               "ssm_out_multiplier": 1.0, "ssm_multipliers": [1.0] * 5, "mlp_multipliers": [1.0, 1.0]}


def _scale(linear: nn.Linear, factor: float | torch.Tensor, bias: bool = True) -> None:
    """Scale ``linear``'s output rows by ``factor`` (a number or one per row), and its bias too."""
    factor = torch.as_tensor(factor, dtype=linear.weight.dtype)
    linear.weight.mul_(factor.reshape(-1, 1) if factor.dim() else factor)
    if bias and linear.bias is not None:
        linear.bias.mul_(factor)


@torch.no_grad()
def fold_multipliers(model: nn.Module) -> nn.Module:
    """``model`` (a transformers ``FalconH1ForCausalLM``) with its muP multipliers folded into its
    weights and set to 1 in its modules and config, its mixers then split (``split_mixers``): the
    model computes the same (to float rounding) with plain weights."""
    from .. import ElastiqError

    config, inner = model.config, model.model
    if config.tie_word_embeddings and config.embedding_multiplier != config.lm_head_multiplier:
        raise ElastiqError("a Falcon-H1 whose embedding and head are one tensor yet are scaled apart "
                           f"(embedding_multiplier {config.embedding_multiplier}, lm_head_multiplier "
                           f"{config.lm_head_multiplier}) cannot be folded into plain weights")
    inner.embed_tokens.weight.mul_(config.embedding_multiplier)
    if not config.tie_word_embeddings:
        model.lm_head.weight.mul_(config.lm_head_multiplier)
    for layer in inner.layers:
        mixer, attention, mlp = layer.mamba, layer.self_attn, layer.feed_forward
        # in_proj(h * in) * mup: its rows times mup, its weights times in as well
        mup = mixer.mup_vector.reshape(-1).to(mixer.in_proj.weight.dtype)
        _scale(mixer.in_proj, mup)
        mixer.in_proj.weight.mul_(mixer.ssm_in_multiplier)
        _scale(mixer.out_proj, layer.ssm_out_multiplier)
        for proj in (attention.q_proj, attention.k_proj, attention.v_proj):  # they read h * attention_in
            proj.weight.mul_(layer.attention_in_multiplier)
        _scale(attention.k_proj, attention.key_multiplier)
        _scale(attention.o_proj, layer.attn_out_multiplier)
        _scale(mlp.gate_proj, mlp.gate_multiplier)
        _scale(mlp.down_proj, mlp.down_multiplier)
        mixer.mup_vector.fill_(1.0)
        mixer.ssm_in_multiplier = layer.ssm_out_multiplier = layer.attention_in_multiplier = 1.0
        attention.key_multiplier = layer.attn_out_multiplier = mlp.gate_multiplier = mlp.down_multiplier = 1.0
    inner.embedding_multiplier = inner.lm_head_multiplier = 1.0
    for key, unit in MULTIPLIERS.items():
        setattr(config, key, unit)
    return split_mixers(model)


def layer_kinds(config: Mapping) -> list[str]:
    return [PARALLEL] * config["num_hidden_layers"]


def ssm_config(config: Mapping) -> SSMConfig:
    """Bamba's mixers' config, gated with a norm only where ``mamba_rms_norm`` says so."""
    return replace(bamba.ssm_config(config), gated_norm=bool(config.get("mamba_rms_norm")))


def check_falcon_h1_config(config: Mapping) -> None:
    """Refuse a Falcon-H1 config dict whose fields that elastiq reads are missing, of the wrong type
    or out of range, naming the field and what is accepted (a config inside a checkpoint is untrusted)."""
    def bad(key: str, expected: str):
        bamba.refuse(config, key, expected)

    check_config(config)
    bamba.check_mixer_fields(config)
    inner = config.get("mamba_d_ssm") or int(config.get("mamba_expand", 2) * config["hidden_size"])
    if inner != config["mamba_n_heads"] * config["mamba_d_head"]:
        bad("mamba_d_ssm", f"mamba_n_heads x mamba_d_head ({config['mamba_n_heads']} x {config['mamba_d_head']})")
    if config.get("mamba_rms_norm") and config.get("mamba_norm_before_gate"):
        bad("mamba_norm_before_gate", "false where mamba_rms_norm is true (the runtime gates, then normalises)")
    for key, unit in MULTIPLIERS.items():  # folded into the weights on intake
        if config.get(key, unit) != unit:
            bad(key, f"{unit} (intake folds the multipliers into the weights; this config was not folded)")
    for key in ("projectors_bias", "mamba_rms_norm"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            bad(key, "true or false")


FALCON_H1 = Family("falcon_h1", model_types=("falcon_h1",), gguf_architectures=(), parts=PARTS,
                   top={EMBED: "model.embed_tokens", FINAL_NORM: "model.final_layernorm", HEAD: "lm_head"},
                   bias_flags={"mamba_proj_bias": SSM_IN, "projectors_bias": (SSM_OUT,), "mamba_conv_bias": SSM_CONV,
                               "attention_bias": ("attn_q", "attn_k", "attn_v", "attn_output"),
                               "mlp_bias": (FFN_GATE, FFN_UP, FFN_DOWN)},
                   offers=(MLP, QK, VO, SSM_P, SSM_N), gguf=("falcon-h1", None), convert=fold_multipliers,
                   unconvert=fuse_mixers, unrotatable="rotating the residual stream is not built for SSM blocks",
                   kinds_of=layer_kinds, ssm_of=ssm_config, returns_pair=True, check_fields=check_falcon_h1_config)
