"""What every stage asks of a model family, answered as data (after gguf-py's per-architecture
tensor lists and SliceGPT's adapters).

A family names the parts of its blocks; everything else in elastiq speaks of *slots*, the
parts' family-free names (which are llama.cpp's: ``attn_q``, ``ffn_down``, ...). The block
structure the stages rely on (which norm feeds which matrices, which matrices write the residual
stream, which input each matrix reads, which matrices a prunable group spans and along which
axis) is stated here once, in slots, for the pre-norm attention + gated-MLP decoder block that
every supported family shares; a family changes only what differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

from torch import nn

from ..checkpoint import MLP, QK, SSM_N, SSM_P, VO, Group, Heads
from ..layouts import per_unit_of
from ..quants import BLOCK

# Slots: the parts of a block, by llama.cpp's tensor names.
ATTN_NORM, ATTN_Q, ATTN_K, ATTN_V, ATTN_OUT = "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output"
ATTN_Q_NORM, ATTN_K_NORM, ATTN_POST_NORM = "attn_q_norm", "attn_k_norm", "post_attention_norm"
FFN_NORM, FFN_GATE, FFN_UP, FFN_DOWN, FFN_POST_NORM = "ffn_norm", "ffn_gate", "ffn_up", "ffn_down", "post_ffw_norm"
ROPE_PAIRS = "rope_pairs"  # elastiq's own: the sorted rotary pairs' original indices [G, d/2]
# The Mamba2 mixer, by llama.cpp's mamba2 names where it has them. llama.cpp's fused ssm_in
# ([z, x, B, C, dt] rows) and ssm_conv1d ([x, B, C] channels) are held split, one tensor per part,
# so that each tensor belongs to one prunable group; ssm_a holds A_log (llama.cpp: -exp(A_log)).
SSM_IN_Z, SSM_IN_X, SSM_IN_B, SSM_IN_C, SSM_IN_DT = "ssm_in_z", "ssm_in_x", "ssm_in_b", "ssm_in_c", "ssm_in_dt"
SSM_CONV_X, SSM_CONV_B, SSM_CONV_C = "ssm_conv1d_x", "ssm_conv1d_b", "ssm_conv1d_c"
SSM_DT, SSM_A, SSM_D = "ssm_dt", "ssm_a", "ssm_d"  # per SSM head [H]: dt_bias, A_log, D
SSM_NORM, SSM_OUT = "ssm_norm", "ssm_out"
SSM_IN = (SSM_IN_Z, SSM_IN_X, SSM_IN_B, SSM_IN_C, SSM_IN_DT)
SSM_CONV = (SSM_CONV_X, SSM_CONV_B, SSM_CONV_C)
# Slots that are one bare tensor (no .weight / .bias): runtime name layers.{i}.{slot}.
BARE = (ROPE_PAIRS, SSM_DT, SSM_A, SSM_D)
MATRICES = (ATTN_Q, ATTN_K, ATTN_V, ATTN_OUT, FFN_GATE, FFN_UP, FFN_DOWN)  # of an attention block
SSM_MATRICES = (*SSM_IN, SSM_OUT)
NORMS = (ATTN_NORM, ATTN_Q_NORM, ATTN_K_NORM, ATTN_POST_NORM, FFN_NORM, FFN_POST_NORM, SSM_NORM)
# The kinds of block: attention + gated MLP (every transformer family), a Mamba2 mixer alone, and
# the blocks of hybrids: a Mamba2 mixer + gated MLP (Bamba), attention and a mixer side by side +
# gated MLP (Falcon-H1), and single branches (Nemotron-H): attention alone, an MLP alone (ungated).
# A block reads its first (or only) branches through ``attn_norm`` (llama.cpp's name for it,
# whatever the branch) and an MLP after them through ``ffn_norm``.
ATTENTION, SSM, SSM_MLP, PARALLEL = "attention", "ssm", "ssm_mlp", "parallel"
ATTENTION_ONLY, MLP_ONLY = "attention_only", "mlp_only"
SSM_KINDS = (SSM, SSM_MLP, PARALLEL)  # the kinds of block with a Mamba2 mixer
ATTENTION_KINDS = (ATTENTION, ATTENTION_ONLY, PARALLEL)  # those with attention
MLP_KINDS = (ATTENTION, SSM_MLP, PARALLEL, MLP_ONLY)  # those with an MLP

# The decoder block: each norm and the matrices that read its output (rotation folds the norm
# into them), the matrices that write the residual stream, and the input each matrix reads
# (matrices that read one input share its Hessian).
NORM_READERS = {ATTN_NORM: (ATTN_Q, ATTN_K, ATTN_V), FFN_NORM: (FFN_GATE, FFN_UP)}
WRITERS = (ATTN_OUT, FFN_DOWN)
READS = {ATTN_Q: ATTN_Q, ATTN_K: ATTN_Q, ATTN_V: ATTN_Q, ATTN_OUT: ATTN_OUT,
         FFN_GATE: FFN_GATE, FFN_UP: FFN_GATE, FFN_DOWN: FFN_DOWN}
# The same of an SSM block: its input projections read the normed block input, its output
# projection the gated norm's output.
SSM_READS = {**{slot: SSM_IN_Z for slot in SSM_IN}, SSM_OUT: SSM_OUT}
BLOCK_READS = {ATTENTION: READS, SSM: SSM_READS,
               SSM_MLP: {**SSM_READS, **{slot: READS[slot] for slot in (FFN_GATE, FFN_UP, FFN_DOWN)}},
               PARALLEL: {**SSM_READS, **READS},
               ATTENTION_ONLY: {slot: READS[slot] for slot in (ATTN_Q, ATTN_K, ATTN_V, ATTN_OUT)},
               MLP_ONLY: {FFN_UP: FFN_UP, FFN_DOWN: FFN_DOWN}}  # an MLP alone is ungated
# Matrices whose pruned axis is their input (whole quantization blocks are pruned there).
PRUNED_INPUTS = {FFN_DOWN: MLP, ATTN_OUT: VO, SSM_OUT: SSM_P}
# Where recovery masks each group: (slot, what of the module): its input or output channels, its
# bias, or the channels a gated norm normalises (masked, and the norm's mean taken over the kept ones).
MASKS = {MLP: ((FFN_DOWN, "input"),), QK: ((ATTN_Q, "output"), (ATTN_K, "output")), VO: ((ATTN_V, "output"),),
         SSM_P: ((SSM_NORM, "gated_norm"),),
         SSM_N: ((SSM_IN_B, "output"), (SSM_IN_C, "output"), (SSM_CONV_B, "bias"), (SSM_CONV_C, "bias"))}
# The top-level tensors, by the runtime's names.
EMBED, FINAL_NORM, HEAD = "embed_tokens", "norm", "lm_head"


@dataclass(frozen=True)
class SSMConfig:
    """What a Mamba2 mixer computes beyond its weights; pruning changes none of it."""

    num_heads: int
    n_groups: int
    conv_kernel: int
    layer_norm_epsilon: float
    chunk_size: int
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    head_dim: int = 0  # the unpruned channels per head P and states per group N (a block's own are in its tensors)
    state_size: int = 0
    gated_norm: bool = True  # y normalised per group after its gate (Mamba2's); else gated alone, y * silu(z)

    @classmethod
    def from_config(cls, config: Mapping) -> "SSMConfig":
        """From a transformers Mamba2 config dict (``Mamba2Config.to_dict()``)."""
        limit = config.get("time_step_limit", (0.0, math.inf))
        return cls(config["num_heads"], config["n_groups"], config["conv_kernel"], config["layer_norm_epsilon"],
                   config["chunk_size"], (float(limit[0]), float(limit[1])), config["head_dim"], config["state_size"])


@dataclass(frozen=True)
class Family:
    """A model family: where its parts are, which groups it offers, what its blocks compute.

    ``parts`` maps each slot to the module path inside a block, ``top`` the embedding, final norm
    and head to their paths in the model. ``biases`` are the slots that always have a bias,
    ``bias_flags`` the config flags that give more slots one (Llama's ``attention_bias``).
    ``offers`` are the group kinds sorted and pruned (a family whose q and k are normalised per
    head before RoPE offers no ``qk`` group: cutting rotary pairs would change what that norm
    averages over). ``gguf`` names llama.cpp's architecture for a rate of uniform MLP width and
    for one of per-layer widths (None: the GGUF export pads every MLP to the widest), and
    ``gguf_neox`` whether that architecture rotates halves (no q/k row permutation) or pairs.
    """

    name: str
    model_types: tuple[str, ...]
    gguf_architectures: tuple[str, ...]  # GGUF ``general.architecture`` values intake reads
    parts: Mapping[str, str]
    layers: str = "model.layers"
    top: Mapping[str, str] = field(default_factory=lambda: {EMBED: "model.embed_tokens", FINAL_NORM: "model.norm",
                                                            HEAD: "lm_head"})
    biases: frozenset[str] = frozenset()
    bias_flags: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    offers: tuple[str, ...] = (MLP, QK, VO)
    gguf: tuple[str, str | None] = ("llama", "deci")
    gguf_neox: bool = False
    gguf_swa: tuple[int, float] | None = None  # llama.cpp's sliding layout: every n-th layer global; local RoPE base
    kept: str = ""  # why a kind of group is not offered, for ``inspect`` and errors
    norm_offset: float = 0.0  # a stored norm weight w scales by w + norm_offset (Gemma: 1 + w)
    scaled_embeddings: bool = False  # embeddings times sqrt(hidden size) (Gemma)
    attention_scalar: str | None = None  # the config key whose value^-1/2 scales q.k; None: the head size
    unrotatable: str = ""  # why the residual stream cannot be rotated (``--rotate``); empty: it can
    # A model of this family as an equivalent model of another family (Phi-3's fused projections
    # split into Mistral's): intake applies it, and every stage then asks the other family.
    convert: Callable[[nn.Module], nn.Module] | None = None
    # The inverse of ``convert`` on a state dict, where the converted model is not a stock one
    # (Mamba2's split mixers): what an export in the source's own form writes.
    unconvert: Callable[[Mapping], dict] | None = None
    activations: tuple[str, ...] = ("silu",)  # the MLP's accepted activations (config key ``act_key``)
    act_key: str = "hidden_act"
    block_kind: str = ATTENTION  # what every block is, where all are alike: ATTENTION (attention + MLP) or SSM
    # each block's kind from the config, for a family whose blocks differ (hybrids); None: ``block_kind``
    kinds_of: Callable[[Mapping], list[str]] | None = None
    ssm_of: Callable[[Mapping], SSMConfig] = SSMConfig.from_config  # the mixers' config, where there are any
    rotary: bool = True  # whether attention rotates q and k (RoPE); Nemotron-H's has no position encoding
    # whether intake lays heads of partial RoPE out for whole-head RoPE (``partial_rope``); a family
    # without it refuses a config whose RoPE turns part of each head
    partial_rope: bool = False
    returns_pair: bool = False  # a transformers block returns (hidden states, attention weights) (Bamba)
    eps_key: str = "rms_norm_eps"  # the config key of the norms' epsilon
    check_fields: Callable[[Mapping], None] | None = None  # the config check; None: ``check_config``

    # --- names ---------------------------------------------------------------------------------

    def name_of(self, layer: int, slot: str, param: str = "weight") -> str:
        """The model's (and the checkpoint's) name of a block tensor: (3, "ffn_down") ->
        model.layers.3.mlp.down_proj.weight; a bare tensor (``BARE``: the rotary pair indices, the
        SSM heads' dt_bias, A_log and D) has no param."""
        if slot in BARE:
            return f"{self.layers}.{layer}.{self.parts[slot]}"
        return f"{self.layers}.{layer}.{self.parts[slot]}.{param}"

    def runtime_names(self, names) -> dict[str, str]:
        """{model name: the elastic model's name} for ``names``: layers.{i}.{slot}.{param} for block
        tensors (layers.{i}.{slot} for a bare one), embed_tokens / norm / lm_head .weight for the others; names it does not know
        raise an error naming them."""
        known = {f"{path}.weight": f"{slot}.weight" for slot, path in self.top.items()}
        by_part = {path: slot for slot, path in self.parts.items() if slot not in BARE}
        bare = {self.parts[slot]: slot for slot in BARE if slot in self.parts}
        out, unknown = {}, []
        prefix = self.layers + "."
        for name in names:
            if name in known:
                out[name] = known[name]
                continue
            layer, _, rest = name.removeprefix(prefix).partition(".")
            if name.startswith(prefix) and layer.isdigit():
                if rest in bare:
                    out[name] = f"layers.{layer}.{bare[rest]}"
                    continue
                part, _, param = rest.rpartition(".")
                if part in by_part:
                    out[name] = f"layers.{layer}.{by_part[part]}.{param}"
                    continue
            unknown.append(name)
        if unknown:
            raise ValueError(f"tensors that are not part of a {self.name} model: {', '.join(unknown[:5])}")
        return out

    def checkpoint_name(self, runtime_name: str) -> str:
        """The inverse of ``runtime_names`` for one name."""
        for slot, path in self.top.items():
            if runtime_name == f"{slot}.weight":
                return f"{path}.weight"
        _, layer, slot, *param = runtime_name.split(".")
        return self.name_of(int(layer), slot, *param)

    # --- shape -----------------------------------------------------------------------------------

    def layer_kinds(self, config: Mapping) -> list[str]:
        """What each block of a model of ``config`` is: ``ATTENTION``, ``SSM``, ``SSM_MLP``,
        ``ATTENTION_ONLY`` or ``MLP_ONLY``."""
        if self.kinds_of is not None:
            return self.kinds_of(config)
        return [self.block_kind] * config["num_hidden_layers"]

    def heads(self, config: Mapping) -> Heads | None:
        """Attention heads of a Hugging Face config dict; None for a model without attention."""
        if not set(ATTENTION_KINDS) & set(self.layer_kinds(config)):
            return None
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        return Heads(config["num_attention_heads"], config.get("num_key_value_heads") or
                     config["num_attention_heads"], head_dim)

    def ssm_config(self, config: Mapping) -> SSMConfig | None:
        """What the Mamba2 mixers of a config dict compute beyond their weights; None for a model without them."""
        if not set(SSM_KINDS) & set(self.layer_kinds(config)):
            return None
        return self.ssm_of(config)

    def activation(self, config: Mapping) -> str:
        """The MLP's activation, by transformers' names (``silu``, ``gelu_pytorch_tanh``, ``relu2``)."""
        return config.get(self.act_key) or config.get("hidden_activation") or "silu"

    def norm_eps(self, config: Mapping) -> float:
        """The epsilon of every RMSNorm of the model."""
        return config[self.eps_key]

    def biased(self, config: Mapping) -> frozenset[str]:
        """The slots whose projection has a bias in a model of ``config``."""
        return self.biases | {slot for flag, slots in self.bias_flags.items() if config.get(flag) for slot in slots}

    def groups(self, config: Mapping, layer: int) -> list[Group]:
        """The prunable groups of block ``layer`` that this family offers."""
        biased = self.biased(config)
        name = lambda slot: self.name_of(layer, slot)  # noqa: E731
        bias = lambda *slots: tuple((self.name_of(layer, s, "bias"), r) for s, r in slots if s in biased)  # noqa: E731
        kind = self.layer_kinds(config)[layer]
        gate = ((FFN_GATE, "rows"),) if kind in (ATTENTION, SSM_MLP, PARALLEL) else ()  # an MLP alone is ungated
        # The down projection's input axis is pruned: whole quantization blocks.
        mlp = lambda: Group(MLP, layer, config["intermediate_size"], BLOCK,  # noqa: E731
                            (*((name(s), r) for s, r in gate), (name(FFN_UP), "rows"), (name(FFN_DOWN), "cols"),
                             *bias(*gate, (FFN_UP, "rows"))))
        every = {MLP: mlp}
        if kind in SSM_KINDS:
            ssm = self.ssm_config(config)
            P, N = ssm.head_dim, ssm.state_size
            heads, groups = per_unit_of("rows", ssm.num_heads), per_unit_of("rows", ssm.n_groups)
            norm = ((name(SSM_NORM), heads),) if ssm.gated_norm else ()
            # Channels of each SSM head; the output projection's input axis is pruned: whole blocks.
            every[SSM_P] = lambda: Group(SSM_P, layer, P, BLOCK,
                                         ((name(SSM_IN_Z), heads), (name(SSM_IN_X), heads), (name(SSM_CONV_X), heads),
                                          *norm, (name(SSM_OUT), per_unit_of("cols", ssm.num_heads)),
                                          *bias((SSM_IN_Z, heads), (SSM_IN_X, heads), (SSM_CONV_X, heads))))
            # States of each group, B and C in one order.
            every[SSM_N] = lambda: Group(SSM_N, layer, N, 1,
                                         ((name(SSM_IN_B), groups), (name(SSM_IN_C), groups),
                                          (name(SSM_CONV_B), groups), (name(SSM_CONV_C), groups),
                                          *bias((SSM_IN_B, groups), (SSM_IN_C, groups), (SSM_CONV_B, groups),
                                                (SSM_CONV_C, groups))))
        if kind in ATTENTION_KINDS:
            d = self.heads(config).head_dim
            # Whole rotary pairs (channel j with j + d/2), shared by a KV head and its query heads;
            # their original indices travel with them.
            every[QK] = lambda: Group(QK, layer, d // 2, 1,
                                      ((name(ATTN_Q), "q"), (name(ATTN_K), "k"), *bias((ATTN_Q, "q"), (ATTN_K, "k")),
                                       (self.name_of(layer, ROPE_PAIRS), "pairs")))
            # V rank per KV head; the output projection's input axis is pruned: whole blocks.
            every[VO] = lambda: Group(VO, layer, d, BLOCK, ((name(ATTN_V), "v"), (name(ATTN_OUT), "o"),
                                                            *bias((ATTN_V, "v"))))
        present = {ATTENTION: (MLP, QK, VO), SSM: (SSM_P, SSM_N), SSM_MLP: (SSM_P, SSM_N, MLP),
                   PARALLEL: (SSM_P, SSM_N, MLP, QK, VO), ATTENTION_ONLY: (QK, VO), MLP_ONLY: (MLP,)}[kind]
        return [every[k]() for k in present if k in self.offers]

    def embedding_scale(self, config: Mapping) -> float:
        return config["hidden_size"] ** 0.5 if self.scaled_embeddings else 1.0

    def attention_scale(self, config: Mapping) -> float:
        """The factor of q.k: fixed by the original model, whatever a rate keeps of q and k."""
        scalar = config[self.attention_scalar] if self.attention_scalar else self.heads(config).head_dim
        return scalar ** -0.5

    def runtime_tensor(self, runtime_name: str, t):
        """A tensor in the elastic model's form: norm weights as the plain scale (``norm_offset`` added)."""
        return t + self.norm_offset if self.norm_offset and is_norm(runtime_name) else t

    def checkpoint_tensor(self, runtime_name: str, t):
        """The inverse of ``runtime_tensor``."""
        return t - self.norm_offset if self.norm_offset and is_norm(runtime_name) else t

    def check(self, config: Mapping) -> None:
        """Refuse a config that is malformed (``check_config``) or whose blocks compute what elastiq
        does not run, saying what it runs."""
        from .. import ElastiqError

        (self.check_fields or check_config)(config)
        if self.rotary and any(kind in ATTENTION_KINDS for kind in self.layer_kinds(config)) and \
                (factor := partial_rotary_factor(config)) != 1:
            if not self.partial_rope:
                raise ElastiqError(f"this {self.name} model's RoPE turns part of each head (partial_rotary_factor "
                                   f"{factor}); elastiq runs {self.name} models whose RoPE turns whole heads")
            rotated_channels(config)  # refuses RoPE types whose passing channels would not stay as they are
        act = self.activation(config)
        if act not in self.activations:
            raise ElastiqError(f"{self.act_key} {act!r} is not supported for {self.name}; the elastic model runs "
                               f"{', '.join(self.activations)}")

    def shapes(self, config: Mapping) -> dict[str, tuple[int, ...]]:
        """Every tensor of the unpruned model of ``config`` and its shape (model names)."""
        hidden, vocab = config["hidden_size"], config["vocab_size"]
        by_kind = {}
        h = self.heads(config)
        if h is not None:
            H, G, d, inter = h.num_heads, h.num_kv_heads, h.head_dim, config["intermediate_size"]
            by_kind[ATTENTION] = {
                ATTN_Q: (H * d, hidden), ATTN_K: (G * d, hidden), ATTN_V: (G * d, hidden), ATTN_OUT: (hidden, H * d),
                FFN_GATE: (inter, hidden), FFN_UP: (inter, hidden), FFN_DOWN: (hidden, inter),
                ATTN_Q_NORM: (d,), ATTN_K_NORM: (d,), ROPE_PAIRS: (G, d // 2),
                **{norm: (hidden,) for norm in (ATTN_NORM, FFN_NORM, ATTN_POST_NORM, FFN_POST_NORM)}}
            by_kind[ATTENTION_ONLY] = {slot: by_kind[ATTENTION][slot] for slot in
                                       (ATTN_NORM, ATTN_Q, ATTN_K, ATTN_V, ATTN_OUT, ROPE_PAIRS)}
        if {MLP_ONLY, SSM_MLP} & set(self.layer_kinds(config)):
            inter = config["intermediate_size"]
            by_kind[MLP_ONLY] = {ATTN_NORM: (hidden,), FFN_UP: (inter, hidden), FFN_DOWN: (hidden, inter)}
        ssm = self.ssm_config(config)
        if ssm is not None:
            HP, GN, H, K = ssm.num_heads * ssm.head_dim, ssm.n_groups * ssm.state_size, ssm.num_heads, ssm.conv_kernel
            by_kind[SSM] = {
                ATTN_NORM: (hidden,), SSM_IN_Z: (HP, hidden), SSM_IN_X: (HP, hidden), SSM_IN_B: (GN, hidden),
                SSM_IN_C: (GN, hidden), SSM_IN_DT: (H, hidden), SSM_CONV_X: (HP, 1, K), SSM_CONV_B: (GN, 1, K),
                SSM_CONV_C: (GN, 1, K), SSM_DT: (H,), SSM_A: (H,), SSM_D: (H,), SSM_OUT: (hidden, HP),
                **({SSM_NORM: (HP,)} if ssm.gated_norm else {})}
            if SSM_MLP in self.layer_kinds(config):
                by_kind[SSM_MLP] = {**by_kind[SSM], **by_kind[MLP_ONLY], FFN_NORM: (hidden,),
                                    FFN_GATE: by_kind[MLP_ONLY][FFN_UP]}
            if PARALLEL in self.layer_kinds(config):
                by_kind[PARALLEL] = {**by_kind[SSM], **{slot: shape for slot, shape in by_kind[ATTENTION].items()
                                                         if slot not in (ATTN_POST_NORM, FFN_POST_NORM)}}
        out = {f"{self.top[EMBED]}.weight": (vocab, hidden), f"{self.top[FINAL_NORM]}.weight": (hidden,),
               f"{self.top[HEAD]}.weight": (vocab, hidden)}
        biased = self.biased(config)
        for layer, kind in enumerate(self.layer_kinds(config)):
            for slot, shape in by_kind[kind].items():
                if slot not in self.parts:
                    continue
                out[self.name_of(layer, slot)] = shape
                if slot in biased:
                    out[self.name_of(layer, slot, "bias")] = shape[:1]
        return out

    def check_tensors(self, config: Mapping, shapes: Mapping[str, tuple[int, ...]], aliases: Mapping[str, str]) -> None:
        """Refuse stored tensors (unpruned ``shapes``, and ``aliases`` of tied ones) that are not the
        model ``config`` describes: a missing or unknown tensor, or a shape the config does not give.
        The rotary pair indices are optional (a family or group that keeps every pair), and so is a
        head the config ties to the embedding."""
        from .. import ElastiqError

        expected = self.shapes(config)
        head = f"{self.top[HEAD]}.weight"
        optional = {name for name in expected if ROPE_PAIRS in self.parts and name.endswith(self.parts[ROPE_PAIRS])}
        if config.get("tie_word_embeddings"):
            optional.add(head)
        elif head in aliases:
            raise ElastiqError(f"its config says tie_word_embeddings false, yet {head} is stored as the embedding "
                               f"{aliases[head]}")
        ssm = self.ssm_config(config)
        mlp = {ATTENTION, SSM_MLP, MLP_ONLY} & set(self.layer_kinds(config))
        widths = ", ".join(([f"MLP {config['intermediate_size']}"] if mlp else []) +
                           ([f"SSM head size {ssm.head_dim}, state size {ssm.state_size}"] if ssm else []))
        described = (f"a {self.name} model of {config['num_hidden_layers']} layers, hidden size "
                     f"{config['hidden_size']}, {widths}, vocabulary {config['vocab_size']}")
        unknown = sorted((set(shapes) | set(aliases)) - set(expected))
        missing = sorted(set(expected) - set(shapes) - set(aliases) - optional)
        if unknown or missing:
            raise ElastiqError(f"its tensors are not those of {described} (its config): "
                               + "; ".join(f"{what} {', '.join(names[:3])}" for what, names in
                                           (("unknown", unknown), ("missing", missing)) if names))
        for name, shape in shapes.items():
            if tuple(shape) != expected[name]:
                raise ElastiqError(f"tensor {name} is {list(shape)}; {described} (its config) has "
                                   f"{list(expected[name])}")

    # --- a transformers model of this family -----------------------------------------------------

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def part(self, block: nn.Module, slot: str) -> nn.Module:
        """The module of ``slot`` inside a transformers block."""
        return block.get_submodule(self.parts[slot])

    def top_module(self, model: nn.Module, slot: str) -> nn.Module:
        """The embedding, final norm or head module (``EMBED``, ``FINAL_NORM``, ``HEAD``)."""
        return model.get_submodule(self.top[slot])


def partial_rotary_factor(config: Mapping) -> float:
    """The fraction of each head's channels that RoPE turns (1: the whole head), as transformers
    reads it: from ``rope_parameters`` (or the older ``rope_scaling``), else the config's own field."""
    factor = _rope_fields(config).get("partial_rotary_factor")
    return float(factor or config.get("partial_rotary_factor") or 1.0)


def _rope_fields(config: Mapping) -> Mapping:
    """The config's RoPE parameters (``rope_parameters``, or the older ``rope_scaling``); {} when none."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return rope if isinstance(rope, Mapping) else {}


# RoPE types of fixed frequencies and cos/sin scale 1, where a passing pair turns at angle 0 with cos 1
FIXED_TYPES = ("default", "linear", "llama3")


def rotated_channels(config: Mapping) -> tuple[int, int]:
    """(R, d): how many channels of a head RoPE turns (as transformers counts them: an even number)
    and the head's size, for a config dict with RoPE. Refuses partial RoPE of a type that scales
    cos/sin or varies its frequencies with the length."""
    from .. import ElastiqError

    d = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    dim = int(d * partial_rotary_factor(config))
    rotated = 2 * len(range(0, dim, 2))
    rope = _rope_fields(config)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if rotated != d and kind not in FIXED_TYPES:
        raise ElastiqError(f"this model turns {rotated} of each head's {d} channels (partial RoPE) with {kind} RoPE; "
                           f"elastiq runs partial RoPE of the types {', '.join(FIXED_TYPES)}")
    if not 0 < rotated <= d or d % 2:
        raise ElastiqError(f"RoPE turns {rotated} channels of heads of {d}; expected an even number up to the head size")
    return rotated, d


def is_norm(runtime_name: str) -> bool:
    """Whether a runtime name (or a block's local one, ``attn_norm.weight``) is a norm's weight."""
    parts = runtime_name.split(".")
    return parts[-1] == "weight" and (parts[-2] in NORMS or runtime_name == f"{FINAL_NORM}.weight")


_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "max_position_embeddings")
_OPTIONAL_POSITIVE_INTS = ("num_key_value_heads", "head_dim", "sliding_window", "original_max_position_embeddings")
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
_LIMIT = 2 ** 31  # no size in a config is larger


def check_config(config: Mapping) -> None:
    """Refuse a Hugging Face config dict whose fields that elastiq reads are missing, of the wrong
    type or out of range, naming the field and what is accepted: a config travels inside a
    checkpoint and is untrusted input."""
    from .. import ElastiqError

    def bad(key: str, expected: str):
        raise ElastiqError(f"config field {key} is {config.get(key)!r}; expected {expected}")

    def positive_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 < v <= _LIMIT

    for key in _POSITIVE_INTS:
        if not positive_int(config.get(key)):
            bad(key, "a positive integer")
    layers = config["num_hidden_layers"]
    for key in _OPTIONAL_POSITIVE_INTS:
        if config.get(key) is not None and not positive_int(config[key]):
            bad(key, "a positive integer or null")
    if config.get("head_dim") and config["head_dim"] % 2:
        bad("head_dim", "an even number (RoPE rotates pairs)")
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    if heads % kv:
        bad("num_key_value_heads", f"a divisor of num_attention_heads ({heads})")
    if not config.get("head_dim") and (config["hidden_size"] % heads or config["hidden_size"] // heads % 2):
        bad("hidden_size", f"an even head size times num_attention_heads ({heads}) when head_dim is not given")
    eps = config.get("rms_norm_eps")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
        bad("rms_norm_eps", "a number in (0, 1)")
    for key in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            bad(key, "true or false")
    for key in ("hidden_act", "hidden_activation", "model_type"):
        if config.get(key) is not None and not isinstance(config[key], str):
            bad(key, "a string")
    check_token_ids(config)
    types = config.get("layer_types")
    if types is not None and not (isinstance(types, list) and len(types) == layers and
                                  all(t in ("full_attention", "sliding_attention") for t in types)):
        bad("layer_types", f"null or a list of {layers} of full_attention / sliding_attention")
    _check_rope(config, types)


def check_token_ids(config: Mapping) -> None:
    """Refuse special token ids outside the vocabulary (``vocab_size`` already checked)."""
    from .. import ElastiqError

    for key in _TOKEN_IDS:
        ids = config.get(key)
        ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < config["vocab_size"] for i in ids):
            raise ElastiqError(f"config field {key} is {config.get(key)!r}; expected a token id below vocab_size "
                               f"({config['vocab_size']}), a list of them, or null")


def _check_rope(config: Mapping, types) -> None:
    """The RoPE parameters (``rope_parameters``, or the older ``rope_theta`` and ``rope_scaling``),
    of each layer type where a config gives them per type."""
    from .. import ElastiqError

    for key in ("rope_parameters", "rope_scaling"):
        if config.get(key) is not None and not isinstance(config[key], Mapping):
            raise ElastiqError(f"config field {key} is {config[key]!r}; expected an object or null")
    theta = config.get("rope_theta", 10000.0)
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not theta > 0:
        raise ElastiqError(f"config field rope_theta is {theta!r}; expected a positive number")
    params = config.get("rope_parameters")
    if not params:
        return
    nested = [t for t in set(types or []) if isinstance(params.get(t), Mapping)]
    for where, rope in ([(f"rope_parameters.{t}", params[t]) for t in nested] or [("rope_parameters", params)]):
        kind = rope.get("rope_type", rope.get("type", "default"))
        value = rope.get("rope_theta")
        if kind != "default":
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            if kind not in ROPE_INIT_FUNCTIONS:
                raise ElastiqError(f"config field {where}.rope_type is {kind!r}; expected default or one of "
                                   f"{', '.join(sorted(ROPE_INIT_FUNCTIONS))}")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise ElastiqError(f"config field {where}.rope_theta is {value!r}; expected a positive number")
