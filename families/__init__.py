"""Model families, one module each; ``FAMILIES`` is the one list of what elastiq supports."""

from __future__ import annotations

from typing import Mapping

from .. import ElastiqError
from ..checkpoint import MLP, QK, SSM_N, SSM_P, VO, Checkpoint
from .bamba import BAMBA
from .base import Family
from .falcon_h1 import FALCON_H1
from .gemma3 import GEMMA3, GEMMA3_VISION
from .llama import LLAMA
from .mamba2 import MAMBA2
from .nemotron_h import NEMOTRON_H
from .phi3 import PHI3
from .qwen2 import QWEN2
from .qwen3 import QWEN3

FAMILIES: tuple[Family, ...] = (LLAMA, QWEN2, QWEN3, GEMMA3, GEMMA3_VISION, PHI3, MAMBA2, NEMOTRON_H, BAMBA, FALCON_H1)
MODEL_TYPES: dict[str, Family] = {t: f for f in FAMILIES for t in f.model_types}
GGUF_ARCHITECTURES: dict[str, Family] = {a: f for f in FAMILIES for a in f.gguf_architectures}
GROUP_KINDS = {MLP: "MLP channels", QK: "rotary pairs of q/k per KV head", VO: "V/O rank per KV head",
               SSM_P: "channels per SSM head", SSM_N: "states per SSM group"}


def family_for(config: Mapping) -> Family:
    """The family of a Hugging Face config dict (its ``model_type``), or an error naming the supported ones."""
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ElastiqError(f"model_type {model_type!r} is not supported; supported: {', '.join(MODEL_TYPES)}")
    return MODEL_TYPES[model_type]


def config_dict(config) -> dict:
    """A transformers config as the dict every stage reads (``to_dict()``), with ``num_hidden_layers``
    even where the config derives it (Nemotron-H's, from ``layers_block_type``), so that the dict
    travels whole inside a checkpoint."""
    out = config.to_dict()
    out.setdefault("num_hidden_layers", config.num_hidden_layers)
    return out


def checkpoint_family(ckpt: Checkpoint) -> Family:
    """The family of a checkpoint's model, once its config is checked (``Family.check``) and its
    stored tensors are the ones that config describes: what every stage that reads a checkpoint
    asks first, since a checkpoint is untrusted input."""
    family = family_for(ckpt.config)
    family.check(ckpt.config)
    try:
        family.check_tensors(ckpt.config, ckpt.full_shapes(), ckpt.aliases)
    except ElastiqError as err:
        raise ElastiqError(f"{ckpt.path}: {err}") from None
    return family


__all__ = ["FAMILIES", "Family", "GGUF_ARCHITECTURES", "GROUP_KINDS", "MODEL_TYPES", "checkpoint_family",
           "config_dict", "family_for"]
