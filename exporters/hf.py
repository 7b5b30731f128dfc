"""One rate of a nested checkpoint as a Hugging Face folder that stock transformers loads.

A stock config of every supported family has one head size and one MLP width for every layer, and
RoPE that turns pair p of a head at frequency p. A pruned rate has per-layer widths and permuted
rotary pairs, so it is written back at the original sizes with zeros where units were pruned:

- q/k rows: kept pair i of KV group g returns to its original pair p = ``rope_pairs[g, i]``,
  channels p and p + d/2 of the head (Hugging Face's rotate-half layout), so stock RoPE turns it
  at its own frequency; pruned pairs are zero rows and add nothing to q.k. The attention scale is
  that of the original head size, as in the elastic runtime;
- v rows and the output projection's columns: a head's kept V/O rank r takes its first r channels, the rest are
  zero (zero values times zero columns add nothing);
- MLP: the kept channels take the first rows of gate/up and columns of down, the rest are zero
  (silu(0) * 0 = 0). transformers 5 has no stock causal LM with per-layer MLP widths that loads
  without ``trust_remote_code`` (DeciLM / Nemotron-NAS are remote code; Gemma3n's per-layer widths
  belong to another architecture), so zero-filling is the one stock form.

The folder therefore holds the full-size model: it does not save memory or compute (use the ONNX
or GGUF export for that), it is exact, and anything that reads a Hugging Face folder can read it.

A Mamba2 model is written as stock ``Mamba2ForCausalLM`` at the widest block's channels per head
and states per group (``padding.ssm_widest``; P raised where needed so that the inner size stays a
whole multiple, ``expand``, of the hidden size), its split mixers fused back (the family's
``unconvert``): smaller than the source where every block was pruned alike, exact where only states
were pruned, and equal up to the gated norm's epsilon in a block whose channels were widened.
A Bamba model is written as stock ``BambaForCausalLM`` alike (``mamba_d_head``, ``mamba_d_state``,
``mamba_expand``), every MLP, its Mamba2 blocks' included, zero-padded to the rate's widest.
A Nemotron-H model is written as stock ``NemotronHForCausalLM``, whose config also has one
width of each kind: its Mamba2 blocks widened as Mamba2's are, each attention block's V/O rank
back at the full head size, and every MLP block (ungated) zero-padded to the rate's widest one,
which becomes its ``intermediate_size`` (exact). transformers clamps Nemotron-H's time steps
below at ``time_step_min`` as the runtime does, so the folder computes the runtime's model.
A Falcon-H1 model is written as stock ``FalconH1ForCausalLM`` with the multipliers of 1 that its
checkpoint's config says (intake folded them into the weights): every block's attention at full
head size as a Llama's, its mixer at the rate's widest P and N (``mamba_d_head``, ``mamba_d_state``
and ``mamba_d_ssm`` = heads x P, which its config states itself, so P is not raised: exact where the
mixers are gated without a norm, as most Falcon-H1s are) and its MLP at the rate's widest.
Weights are float (4-bit matrices dequantized), in safetensors; the tokenizer and its chat
template are saved beside them. The folder is assembled under a temporary name and renamed into
place.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Mapping

import torch

from .. import ElastiqError
from ..atomic import atomic_path
from ..checkpoint import Checkpoint
from ..families import checkpoint_family
from ..families.base import ATTN_K, ATTN_OUT, ATTN_Q, ATTN_V, FFN_DOWN, FFN_GATE, FFN_UP, ROPE_PAIRS
from ..families.partial_rope import partial_heads_back
from ..modeling.model import LayerArgs, ModelArgs, SSMLayerArgs, attends, runtime_weights
from ..quants import Quantized
from .padding import head_prefix, scatter_rows, ssm_widest, widest_mlp

WEIGHTS = "model.safetensors"


class HfExportError(ElastiqError):
    """A checkpoint, rate or output folder that cannot be exported as a Hugging Face folder."""


def write_hf(checkpoint: Path | str, rate: float, output: Path | str) -> Path:
    """Write rate ``rate`` of the nested checkpoint ``checkpoint`` as the Hugging Face folder
    ``output`` (replacing an earlier export there, never another folder) and return its path."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    output = Path(output)
    if output.exists() and not (output.is_dir() and (not any(output.iterdir()) or (output / "config.json").is_file())):
        raise HfExportError(f"{output} exists and is not an earlier Hugging Face export (no config.json); "
                            "give a new folder, an empty one, or an earlier export to replace")
    ckpt = Checkpoint(checkpoint)
    ckpt.rate_entry(rate)  # a rate that is not offered fails here, listing the offered ones
    source = ckpt.config
    family = checkpoint_family(ckpt)
    weights = runtime_weights({k: v.dequantize() if isinstance(v, Quantized) else v
                               for k, v in ckpt.read_rate(rate).items()}, source)
    args = ModelArgs.from_weights(weights, source)
    state = dict(weights)
    mixers = [layer for layer in args.layers if isinstance(layer, SSMLayerArgs)]
    if mixers:  # one head size and state size for every Mamba2 block: the widest (that the config can say)
        state, P, N = ssm_widest(state, args, _ssm_head_dim(family.name, args))
        source = {**source, **_ssm_fields(family.name, args, P, N)}
    blocks = [layer for layer in args.layers if isinstance(layer, LayerArgs)]
    # a Mamba2 block's MLP (Bamba's, Falcon-H1's) by layer; held by its weights, since one pruned to no channel is
    # still there
    mixer_mlps = {i: layer.intermediate_size for i, layer in enumerate(args.layers)
                  if isinstance(layer, SSMLayerArgs) and f"layers.{i}.{FFN_DOWN}.weight" in state}
    if blocks or mixer_mlps:  # attention and MLP blocks at the config's head size, every MLP at one width
        size = source["intermediate_size"]
        if mixers or any(not (layer.attention and layer.mlp) for layer in blocks):  # a hybrid's: the rate's widest
            size = max([layer.intermediate_size for layer in blocks if layer.mlp] + list(mixer_mlps.values()),
                       default=size)
            source = {**source, "intermediate_size": size}
        state = full_size(state, args, size)
        state = widest_mlp(state, [mixer_mlps.get(i, size) for i in range(len(args.layers))], size)
    if args.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    state = {family.checkpoint_name(name): family.checkpoint_tensor(name, t) for name, t in state.items()}
    if family.unconvert is not None:
        state = _unconvert(family, state)
    if family.partial_rope:
        state = partial_heads_back(state, source, family)
    config = AutoConfig.for_model(**source)
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]

    try:
        with atomic_path(output, directory=True) as tmp:
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / WEIGHTS), metadata={"format": "pt"})
            config.save_pretrained(tmp)
            GenerationConfig.from_model_config(config).save_pretrained(tmp)
            ckpt.tokenizer().save_pretrained(tmp)
    except OSError as err:
        raise HfExportError(f"cannot write {output}: {err.strerror or err}") from None
    return output


def full_size(weights: Mapping[str, torch.Tensor], args: ModelArgs, intermediate_size: int) -> dict[str, torch.Tensor]:
    """``weights`` (float, runtime names, one rate) at the original head size and MLP width
    ``intermediate_size``: kept units at the positions above, zeros elsewhere, and the
    ``rope_pairs`` tensors consumed. Only the branches a block has are widened (a hybrid's block
    may hold attention alone or an MLP alone, its MLP ungated); of a Mamba2 block, only the attention
    beside its mixer (Falcon-H1's), its mixer and MLP left as they are (``padding``)."""
    H, G, d = args.num_heads, args.num_kv_heads, args.head_dim
    out = dict(weights)
    for i, layer in enumerate(args.layers):
        attention = attends(layer)
        if not (isinstance(layer, LayerArgs) or attention):
            continue
        p = f"layers.{i}."
        rows, columns = {}, {}
        if attention:
            u, r = attention.rope_pairs, attention.v_rank
            pairs = out.pop(p + ROPE_PAIRS, None)
            pairs = torch.arange(u).expand(G, u) if pairs is None else pairs.long()
            if (pairs < 0).any() or (pairs >= d // 2).any() or any(len(set(row.tolist())) != u for row in pairs):
                raise HfExportError(f"layer {i}: rope_pairs must hold {u} distinct pair indices below {d // 2} for "
                                    f"each of the {G} KV heads, got {pairs.tolist()}")
            rows.update({ATTN_Q: (qk_rows(pairs, H // G, d), H * d), ATTN_K: (qk_rows(pairs, 1, d), G * d),
                         ATTN_V: (head_prefix(G, r, d), G * d)})
            columns[ATTN_OUT] = (head_prefix(H, r, d), H * d)
        if isinstance(layer, LayerArgs) and layer.mlp:
            kept = torch.arange(layer.intermediate_size)
            rows.update({FFN_GATE: (kept, intermediate_size), FFN_UP: (kept, intermediate_size)})
            columns[FFN_DOWN] = (kept, intermediate_size)
        for proj, (index, total) in rows.items():
            for kind in ("weight", "bias"):
                if (name := f"{p}{proj}.{kind}") in out:
                    out[name] = scatter_rows(out[name], index, total)
        for proj, (index, total) in columns.items():
            name = f"{p}{proj}.weight"
            out[name] = scatter_rows(out[name].T, index, total).T.contiguous()
    return out


# transformers' config keys of the Mamba2 mixers' channels per head P and states per group N
SSM_FIELDS = {"mamba2": ("head_dim", "state_size"), "nemotron_h": ("mamba_head_dim", "ssm_state_size"),
              "bamba": ("mamba_d_head", "mamba_d_state"), "falcon_h1": ("mamba_d_head", "mamba_d_state")}
# the config key of a family whose config states the mixers' inner size H x P itself (FalconH1Config's
# ``mamba_d_ssm``, which must be mamba_n_heads x mamba_d_head)
INNER = {"falcon_h1": "mamba_d_ssm"}
# the config key of a family whose config also derives the mixers' inner size H x P from an integer
# multiple of the hidden size (Mamba2Config and BambaConfig: ``int(expand * hidden_size)``)
EXPAND = {"mamba2": "expand", "bamba": "mamba_expand"}


def _ssm_head_dim(family: str, args: ModelArgs) -> int:
    """The channels per head P of every Mamba2 block of the stock model: the rate's widest block's,
    raised, where the config derives the inner size from an integer ``expand`` (``EXPAND``), to the
    next P whose inner size H x P is a whole multiple of the hidden size (more zero channels; the
    unpruned P is such a one, so P never passes it)."""
    P = max(layer.head_dim for layer in args.layers if isinstance(layer, SSMLayerArgs))
    if family in EXPAND:
        step = args.hidden_size // math.gcd(args.ssm.num_heads, args.hidden_size)
        P = -(-P // step) * step
    return P


def _ssm_fields(family: str, args: ModelArgs, P: int, N: int) -> dict:
    """The config fields of a stock model whose Mamba2 blocks all keep P channels per head and N
    states per group (and, for ``EXPAND``'s, the inner size's multiple of the hidden size)."""
    if family not in SSM_FIELDS:
        raise HfExportError(f"a {family} model with Mamba2 blocks has no Hugging Face export; "
                            f"exported: {', '.join(SSM_FIELDS)}")
    fields = dict(zip(SSM_FIELDS[family], (P, N)))
    if family in EXPAND:
        fields[EXPAND[family]] = args.ssm.num_heads * P // args.hidden_size  # whole: ``_ssm_head_dim``
    if family in INNER:
        fields[INNER[family]] = args.ssm.num_heads * P
    return fields


def _unconvert(family, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The family's ``unconvert`` of ``state`` (a checkpoint's names: the split Mamba2 mixers fused
    back). Refuses a state that still holds a split part, which transformers would not load."""
    state = family.unconvert(state)
    left = [name for name in state if re.search(r"\.(in_proj|conv1d)\.(z|x|b|c|dt)\.(weight|bias)$", name)]
    if left:
        raise HfExportError(f"the {family.name} mixers' split parts ({', '.join(left[:3])}) were not fused back; "
                            "transformers would not load them")
    return state


def qk_rows(pairs: torch.Tensor, heads_per_group: int, head_dim: int) -> torch.Tensor:
    """Full-size row of each q (or k, with ``heads_per_group`` 1) row of a pruned head: row
    h*2u + s*u + i (half s of kept pair i of head h, KV group g = h // heads_per_group) goes to
    channel s*d/2 + pairs[g, i] of head h."""
    G, u = pairs.shape
    h = torch.arange(G * heads_per_group)
    half = torch.arange(2)[:, None] * (head_dim // 2)
    rows = h[:, None, None] * head_dim + half + pairs.long()[h // heads_per_group][:, None, :]
    return rows.reshape(-1)
