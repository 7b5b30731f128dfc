"""Bamba (``BambaForCausalLM``): a hybrid whose every block is a pre-norm mixer and a pre-norm
SwiGLU MLP; the mixer is a Mamba2 one, or attention where the config's ``attn_layer_indices`` put
it (grouped-query, RoPE on a part of each head, ``partial_rotary_factor``).

The mixers are Mamba2's, split on intake as Mamba2's are (``mamba2.split_mixers``); they offer
the channels per SSM head and the states per group, every MLP its channels, the attention blocks
q/k pairs and V/O rank. Intake lays the attention heads out for whole-head RoPE, the channels
that partial RoPE passes paired up and turning at frequency 0 (``partial_rope``), so q/k prune
as rotary pairs do: the pairs that turn and the pairs that pass are sorted together.
"""

from __future__ import annotations

import math
from typing import Mapping

from ..checkpoint import MLP, QK, SSM_N, SSM_P, VO
from .base import (ATTENTION, ATTN_NORM, EMBED, FFN_DOWN, FFN_GATE, FFN_NORM, FFN_UP, FINAL_NORM, HEAD, ROPE_PAIRS,
                   SSM_CONV, SSM_IN, SSM_MLP, SSM_OUT, Family, SSMConfig, check_config)
from .llama import BIAS_FLAGS as LLAMA_BIASES
from .llama import PARTS as LLAMA_PARTS
from .mamba2 import PARTS as MAMBA2_PARTS
from .mamba2 import fuse_mixers, split_mixers

PARTS = {**{slot: path.replace("mixer.", "mamba.") for slot, path in MAMBA2_PARTS.items()},
         **{slot: path for slot, path in LLAMA_PARTS.items() if slot.startswith("attn_") and slot != ATTN_NORM},
         ROPE_PAIRS: LLAMA_PARTS[ROPE_PAIRS],
         ATTN_NORM: "input_layernorm", FFN_NORM: "pre_ff_layernorm", FFN_GATE: "feed_forward.gate_proj",
         FFN_UP: "feed_forward.up_proj", FFN_DOWN: "feed_forward.down_proj"}


def layer_kinds(config: Mapping) -> list[str]:
    attention = set(config.get("attn_layer_indices") or ())
    return [ATTENTION if i in attention else SSM_MLP for i in range(config["num_hidden_layers"])]


def ssm_config(config: Mapping) -> SSMConfig:
    """What the mixers compute beyond their weights, from Bamba's ``mamba_*`` fields (Falcon-H1's too)."""
    limit = config.get("time_step_limit", (0.0, math.inf))
    return SSMConfig(config["mamba_n_heads"], config["mamba_n_groups"], config["mamba_d_conv"], config["rms_norm_eps"],
                     config["mamba_chunk_size"], (float(limit[0]), float(limit[1])), config["mamba_d_head"],
                     config["mamba_d_state"])


_POSITIVE = ("mamba_n_heads", "mamba_d_head", "mamba_n_groups", "mamba_d_state", "mamba_d_conv", "mamba_chunk_size")


def refuse(config: Mapping, key: str, expected: str):
    """Raise the error of a config field that is not what elastiq accepts."""
    from .. import ElastiqError

    raise ElastiqError(f"config field {key} is {config.get(key)!r}; expected {expected}")


def check_mixer_fields(config: Mapping) -> None:
    """Refuse the ``mamba_*`` fields of a Bamba or Falcon-H1 config dict that elastiq reads where
    they are missing, of the wrong type or out of range (the general ones checked before)."""
    for key in _POSITIVE:
        v = config.get(key)
        if not (isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 2 ** 31):
            refuse(config, key, "a positive integer")
    if config["mamba_n_heads"] % config["mamba_n_groups"]:
        refuse(config, "mamba_n_groups", f"a divisor of mamba_n_heads ({config['mamba_n_heads']})")
    limit = config.get("time_step_limit", (0.0, math.inf))
    if not (isinstance(limit, (list, tuple)) and len(limit) == 2 and
            all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in limit) and 0 <= limit[0] < limit[1]):
        refuse(config, "time_step_limit", "two numbers [low, high] with 0 <= low < high")
    for key in ("mamba_proj_bias", "mamba_conv_bias"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            refuse(config, key, "true or false")


def check_bamba_config(config: Mapping) -> None:
    """Refuse a Bamba config dict whose fields that elastiq reads are missing, of the wrong type or
    out of range, naming the field and what is accepted (a config inside a checkpoint is untrusted)."""
    def bad(key: str, expected: str):
        refuse(config, key, expected)

    check_config(config)
    check_mixer_fields(config)
    layers = config["num_hidden_layers"]
    indices = config.get("attn_layer_indices") or []
    if not (isinstance(indices, list) and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < layers
                                              for i in indices)):
        bad("attn_layer_indices", f"a list of layer indices below num_hidden_layers ({layers})")
    expand = config.get("mamba_expand", 2)
    if not isinstance(expand, (int, float)) or isinstance(expand, bool) or \
            int(expand * config["hidden_size"]) != config["mamba_n_heads"] * config["mamba_d_head"]:
        bad("mamba_expand", f"mamba_n_heads x mamba_d_head / hidden_size ({config['mamba_n_heads']} x "
            f"{config['mamba_d_head']} / {config['hidden_size']}), as transformers' Bamba requires")
    if config.get("num_experts", 1) != 1:
        bad("num_experts", "1 (mixture-of-experts MLPs are not supported)")


BAMBA = Family("bamba", model_types=("bamba",), gguf_architectures=(), parts=PARTS,
               top={EMBED: "model.embed_tokens", FINAL_NORM: "model.final_layernorm", HEAD: "lm_head"},
               bias_flags={"mamba_proj_bias": (*SSM_IN, SSM_OUT), "mamba_conv_bias": SSM_CONV,
                           "attention_bias": LLAMA_BIASES["attention_bias"], "mlp_bias": (FFN_GATE, FFN_UP, FFN_DOWN)},
               offers=(MLP, QK, VO, SSM_P, SSM_N), gguf=("granitehybrid", None),  # llama.cpp's converter writes Bamba so
               convert=split_mixers, unconvert=fuse_mixers, partial_rope=True,
               unrotatable="rotating the residual stream is not built for SSM blocks",
               kinds_of=layer_kinds, ssm_of=ssm_config, returns_pair=True, check_fields=check_bamba_config)
