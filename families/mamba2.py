"""Mamba2 (``Mamba2ForCausalLM``): every block is a pre-norm Mamba2 mixer, no attention, no MLP.

A mixer's prunable axes (UniQL, ``modeling/mamba``) are the head dimension P, the same channels
kept in every SSM head (``ssm_p``), and the state size N, the same states kept in every group,
B and C in one order (``ssm_n``); the number of heads and dt_bias, A_log and D never change.
transformers fuses the parts of each axis into one ``in_proj`` (rows [z, x, B, C, dt]) and one
``conv1d`` (channels [x, B, C]); intake splits them (``split_mixers``) into one module per part,
whose outputs are concatenated, so that the model computes the same and each tensor belongs to
one group. The residual stream cannot be rotated here (``--rotate``): not built for SSM blocks.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

from ..checkpoint import SSM_N, SSM_P
from .base import (ATTN_NORM, EMBED, FINAL_NORM, HEAD, SSM, SSM_A, SSM_CONV_B, SSM_CONV_C, SSM_CONV_X, SSM_D,
                   SSM_DT, SSM_IN_B, SSM_IN_C, SSM_IN_DT, SSM_IN_X, SSM_IN_Z, SSM_NORM, SSM_OUT, Family,
                   check_token_ids)

IN_PARTS = {SSM_IN_Z: "z", SSM_IN_X: "x", SSM_IN_B: "b", SSM_IN_C: "c", SSM_IN_DT: "dt"}  # in_proj's rows, in order
CONV_PARTS = {SSM_CONV_X: "x", SSM_CONV_B: "b", SSM_CONV_C: "c"}  # conv1d's channels, in order

PARTS = {ATTN_NORM: "norm", **{slot: f"mixer.in_proj.{part}" for slot, part in IN_PARTS.items()},
         **{slot: f"mixer.conv1d.{part}" for slot, part in CONV_PARTS.items()},
         SSM_DT: "mixer.dt_bias", SSM_A: "mixer.A_log", SSM_D: "mixer.D", SSM_NORM: "mixer.norm",
         SSM_OUT: "mixer.out_proj"}


class SplitRows(nn.Module):
    """A projection held as named parts whose outputs, concatenated in order, are the whole's."""

    def __init__(self, parts: Mapping[str, nn.Module], dim: int):
        super().__init__()
        self.dim = dim
        for name, module in parts.items():
            self.add_module(name, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.children()], self.dim)

    @property
    def weight(self) -> torch.Tensor:
        """The whole weight (transformers' cached decoding reads ``conv1d.weight``)."""
        return torch.cat([part.weight for part in self.children()])

    @property
    def bias(self) -> torch.Tensor | None:
        biases = [part.bias for part in self.children()]
        return None if biases[0] is None else torch.cat(biases)

    @property
    def kernel_size(self) -> tuple[int, ...]:
        """A split convolution's kernel size, its parts' (transformers' Bamba reads ``conv1d.kernel_size``
        since 5.25)."""
        return next(self.children()).kernel_size


def _split_linear(linear: nn.Linear, sizes: list[int]) -> SplitRows:
    parts = {}
    for name, w, b in zip(IN_PARTS.values(), linear.weight.data.split(sizes),
                          linear.bias.data.split(sizes) if linear.bias is not None else [None] * len(sizes)):
        with torch.device("meta"):
            part = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        part.weight = nn.Parameter(w.clone())
        if b is not None:
            part.bias = nn.Parameter(b.clone())
        parts[name] = part
    return SplitRows(parts, -1)


def _split_conv(conv: nn.Conv1d, sizes: list[int]) -> SplitRows:
    parts = {}
    for name, w, b in zip(CONV_PARTS.values(), conv.weight.data.split(sizes),
                          conv.bias.data.split(sizes) if conv.bias is not None else [None] * len(sizes)):
        with torch.device("meta"):
            part = nn.Conv1d(w.shape[0], w.shape[0], conv.kernel_size[0], groups=w.shape[0],
                             padding=conv.padding[0], bias=b is not None)
        part.weight = nn.Parameter(w.clone())
        if b is not None:
            part.bias = nn.Parameter(b.clone())
        parts[name] = part
    return SplitRows(parts, 1)


def split_mixers(model: nn.Module) -> nn.Module:
    """``model`` (a transformers model with Mamba2 mixers: ``Mamba2ForCausalLM``, or a hybrid's)
    with each mixer's ``in_proj`` and ``conv1d`` split in place into one module per part
    (``in_proj.z`` ... ``in_proj.dt``, ``conv1d.x``, ``conv1d.b``, ``conv1d.c``); it computes the same."""
    for mixer in model.modules():
        if not isinstance(getattr(mixer, "conv1d", None), nn.Conv1d):  # not a mixer, or one split already
            continue
        HP, GN = mixer.num_heads * mixer.head_dim, mixer.n_groups * mixer.ssm_state_size
        mixer.in_proj = _split_linear(mixer.in_proj, [HP, HP, GN, GN, mixer.num_heads])
        mixer.conv1d = _split_conv(mixer.conv1d, [HP, GN, GN])
    return model


def fuse_mixers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``split_mixers`` on a state dict: each mixer's parts (``...in_proj.z.weight``,
    ``...conv1d.b.bias``, whatever the mixer's own name) concatenated back into transformers'
    ``in_proj`` and ``conv1d`` (for exports in the source's own form)."""
    order = {"in_proj": list(IN_PARTS.values()), "conv1d": list(CONV_PARTS.values())}
    out, fused = {}, {}
    for name, t in state.items():
        *path, module, part, param = name.split(".") if name.count(".") >= 2 else ("", "", name)
        if module in order and part in order[module]:
            fused.setdefault(".".join((*path, module, param)), {})[order[module].index(part)] = t
        else:
            out[name] = t
    for name, parts in fused.items():
        out[name] = torch.cat([parts[i] for i in sorted(parts)])
    return out


_POSITIVE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "head_dim", "n_groups", "state_size",
             "conv_kernel", "chunk_size")


def check_mamba2_config(config: Mapping) -> None:
    """Refuse a Mamba2 config dict whose fields that elastiq reads are missing, of the wrong type or
    out of range, naming the field and what is accepted (a config inside a checkpoint is untrusted)."""
    from .. import ElastiqError

    def bad(key: str, expected: str):
        raise ElastiqError(f"config field {key} is {config.get(key)!r}; expected {expected}")

    for key in _POSITIVE:
        v = config.get(key)
        if not (isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 2 ** 31):
            bad(key, "a positive integer")
    if config["num_heads"] % config["n_groups"]:
        bad("n_groups", f"a divisor of num_heads ({config['num_heads']})")
    expand = config.get("expand", 2)
    if not isinstance(expand, (int, float)) or isinstance(expand, bool) or \
            int(expand * config["hidden_size"]) != config["num_heads"] * config["head_dim"]:
        bad("expand", f"num_heads x head_dim / hidden_size ({config['num_heads']} x {config['head_dim']} / "
            f"{config['hidden_size']}), as transformers' Mamba2 requires")
    eps = config.get("layer_norm_epsilon")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
        bad("layer_norm_epsilon", "a number in (0, 1)")
    limit = config.get("time_step_limit", (0.0, math.inf))
    if not (isinstance(limit, (list, tuple)) and len(limit) == 2 and
            all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in limit) and 0 <= limit[0] < limit[1]):
        bad("time_step_limit", "two numbers [low, high] with 0 <= low < high")
    for key in ("tie_word_embeddings", "use_bias", "use_conv_bias", "residual_in_fp32"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            bad(key, "true or false")
    check_token_ids(config)


MAMBA2 = Family("mamba2", model_types=("mamba2",), gguf_architectures=(), parts=PARTS, layers="backbone.layers",
                top={EMBED: "backbone.embeddings", FINAL_NORM: "backbone.norm_f", HEAD: "lm_head"},
                bias_flags={"use_bias": (SSM_IN_Z, SSM_IN_X, SSM_IN_B, SSM_IN_C, SSM_IN_DT, SSM_OUT),
                            "use_conv_bias": (SSM_CONV_X, SSM_CONV_B, SSM_CONV_C)},
                offers=(SSM_P, SSM_N), gguf=("mamba2", None), convert=split_mixers, unconvert=fuse_mixers,
                unrotatable="rotating the residual stream is not built for SSM blocks",
                block_kind=SSM, eps_key="layer_norm_epsilon", check_fields=check_mamba2_config)
