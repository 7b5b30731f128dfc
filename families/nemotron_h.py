"""Nemotron-H (``NemotronHForCausalLM``): a hybrid whose every block is one pre-norm branch, as its
config's ``layers_block_type`` lays them out: a Mamba2 mixer (``linear_attention``), attention
without position encoding (``full_attention``) or a ReLU² MLP without a gate (``mlp``).

Each block's one norm is its ``attn_norm`` (llama.cpp's ``nemotron_h`` names it so for every
kind). The mixers are Mamba2's, split on intake as Mamba2's are (``mamba2.split_mixers``), with dt
clamped below at ``time_step_min``; they offer the channels per SSM head and the states per group,
the attention blocks V/O rank and pairs of q/k channels (j with j + d/2, as rotary pairs are cut
elsewhere: without RoPE any pairing computes the same, and this one keeps every exporter's
layout), the MLP blocks their channels. Mixture-of-experts layers (``moe``, Nemotron-3) are refused.
"""

from __future__ import annotations

import math
from typing import Mapping

from ..checkpoint import MLP, QK, SSM_N, SSM_P, VO
from .base import (ATTN_K, ATTN_OUT, ATTN_Q, ATTN_V, ATTENTION_ONLY, EMBED, FFN_DOWN, FFN_UP, FINAL_NORM, HEAD,
                   MLP_ONLY, ROPE_PAIRS, SSM, SSM_CONV, SSM_IN, SSM_OUT, Family, SSMConfig, check_token_ids)
from .mamba2 import PARTS as MAMBA2_PARTS
from .mamba2 import fuse_mixers, split_mixers

KINDS = {"linear_attention": SSM, "full_attention": ATTENTION_ONLY, "mlp": MLP_ONLY}  # layers_block_type's values

PARTS = {**MAMBA2_PARTS, ATTN_Q: "mixer.q_proj", ATTN_K: "mixer.k_proj", ATTN_V: "mixer.v_proj",
         ATTN_OUT: "mixer.o_proj", ROPE_PAIRS: "mixer.rope_pairs", FFN_UP: "mixer.up_proj", FFN_DOWN: "mixer.down_proj"}


def layer_kinds(config: Mapping) -> list[str]:
    return [KINDS[t] for t in config["layers_block_type"]]


def ssm_config(config: Mapping) -> SSMConfig:
    """What the mixers compute beyond their weights; dt is clamped to [time_step_min, inf), as
    transformers' ``NemotronHMamba2Mixer`` does (its config's ``time_step_limit`` goes unread)."""
    return SSMConfig(config["mamba_num_heads"], config["n_groups"], config["conv_kernel"], config["layer_norm_epsilon"],
                     config["chunk_size"], (float(config.get("time_step_min", 0.0)), math.inf),
                     config["mamba_head_dim"], config["ssm_state_size"])


_POSITIVE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "head_dim", "intermediate_size", "mamba_num_heads", "mamba_head_dim", "n_groups", "ssm_state_size",
             "conv_kernel", "chunk_size")


def check_nemotron_h_config(config: Mapping) -> None:
    """Refuse a Nemotron-H config dict whose fields that elastiq reads are missing, of the wrong type
    or out of range, naming the field and what is accepted (a config inside a checkpoint is untrusted)."""
    from .. import ElastiqError

    def bad(key: str, expected: str):
        raise ElastiqError(f"config field {key} is {config.get(key)!r}; expected {expected}")

    types = config.get("layers_block_type")
    if not (isinstance(types, list) and types and all(isinstance(t, str) for t in types)):
        bad("layers_block_type", f"a list of {', '.join(KINDS)}")
    if "moe" in types:
        raise ElastiqError("config field layers_block_type has mixture-of-experts layers (moe); elastiq runs "
                           f"Nemotron-H of {', '.join(KINDS)} layers only")
    if set(types) - set(KINDS):
        bad("layers_block_type", f"a list of {', '.join(KINDS)}")
    for key in _POSITIVE:
        v = config.get(key)
        if not (isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 2 ** 31):
            bad(key, "a positive integer")
    if config["num_hidden_layers"] != len(types):
        bad("num_hidden_layers", f"the length of layers_block_type ({len(types)})")
    if config["num_attention_heads"] % config["num_key_value_heads"]:
        bad("num_key_value_heads", f"a divisor of num_attention_heads ({config['num_attention_heads']})")
    if config["mamba_num_heads"] % config["n_groups"]:
        bad("n_groups", f"a divisor of mamba_num_heads ({config['mamba_num_heads']})")
    eps, floor = config.get("layer_norm_epsilon"), config.get("time_step_min", 0.0)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
        bad("layer_norm_epsilon", "a number in (0, 1)")
    if not isinstance(floor, (int, float)) or isinstance(floor, bool) or not 0 <= floor < 1:
        bad("time_step_min", "a number in [0, 1)")
    if config.get("mamba_hidden_act", "silu") != "silu":
        bad("mamba_hidden_act", "silu")
    for key in ("tie_word_embeddings", "use_bias", "use_conv_bias", "mlp_bias", "attention_bias"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            bad(key, "true or false")
    if config.get("attention_bias"):
        bad("attention_bias", "false (transformers' Nemotron-H attention has no biases)")
    check_token_ids(config)


NEMOTRON_H = Family("nemotron_h", model_types=("nemotron_h",), gguf_architectures=(), parts=PARTS,
                    top={EMBED: "model.embeddings", FINAL_NORM: "model.norm_f", HEAD: "lm_head"},
                    bias_flags={"use_bias": (*SSM_IN, SSM_OUT), "use_conv_bias": SSM_CONV,
                                "mlp_bias": (FFN_UP, FFN_DOWN)},
                    offers=(MLP, QK, VO, SSM_P, SSM_N), gguf=("nemotron_h", None), convert=split_mixers,
                    unconvert=fuse_mixers, activations=("relu2",), act_key="mlp_hidden_act",
                    unrotatable="rotating the residual stream is not built for SSM blocks",
                    kinds_of=layer_kinds, ssm_of=ssm_config, rotary=False, eps_key="layer_norm_epsilon",
                    check_fields=check_nemotron_h_config)
