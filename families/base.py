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

from dataclasses import dataclass, field
from typing import Callable, Mapping

from torch import nn

from ..checkpoint import MLP, QK, VO, Group, Heads
from ..quants import BLOCK

# Slots: the parts of a block, by llama.cpp's tensor names.
ATTN_NORM, ATTN_Q, ATTN_K, ATTN_V, ATTN_OUT = "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output"
ATTN_Q_NORM, ATTN_K_NORM, ATTN_POST_NORM = "attn_q_norm", "attn_k_norm", "post_attention_norm"
FFN_NORM, FFN_GATE, FFN_UP, FFN_DOWN, FFN_POST_NORM = "ffn_norm", "ffn_gate", "ffn_up", "ffn_down", "post_ffw_norm"
ROPE_PAIRS = "rope_pairs"  # elastiq's own: the sorted rotary pairs' original indices [G, d/2]
MATRICES = (ATTN_Q, ATTN_K, ATTN_V, ATTN_OUT, FFN_GATE, FFN_UP, FFN_DOWN)
NORMS = (ATTN_NORM, ATTN_Q_NORM, ATTN_K_NORM, ATTN_POST_NORM, FFN_NORM, FFN_POST_NORM)

# The decoder block: each norm and the matrices that read its output (rotation folds the norm
# into them), the matrices that write the residual stream, and the input each matrix reads
# (matrices that read one input share its Hessian).
NORM_READERS = {ATTN_NORM: (ATTN_Q, ATTN_K, ATTN_V), FFN_NORM: (FFN_GATE, FFN_UP)}
WRITERS = (ATTN_OUT, FFN_DOWN)
READS = {ATTN_Q: ATTN_Q, ATTN_K: ATTN_Q, ATTN_V: ATTN_Q, ATTN_OUT: ATTN_OUT,
         FFN_GATE: FFN_GATE, FFN_UP: FFN_GATE, FFN_DOWN: FFN_DOWN}
# Matrices whose pruned axis is their input (whole quantization blocks are pruned there).
PRUNED_INPUTS = {FFN_DOWN: MLP, ATTN_OUT: VO}
# Where recovery masks each group: (slot, the module's input or output).
MASKS = {MLP: ((FFN_DOWN, "input"),), QK: ((ATTN_Q, "output"), (ATTN_K, "output")), VO: ((ATTN_V, "output"),)}
# The top-level tensors, by the runtime's names.
EMBED, FINAL_NORM, HEAD = "embed_tokens", "norm", "lm_head"


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
    rotatable: bool = True  # whether the residual stream can be rotated (no norm on a branch's output)
    # A model of this family as an equivalent model of another family (Phi-3's fused projections
    # split into Mistral's): intake applies it, and every stage then asks the other family.
    convert: Callable[[nn.Module], nn.Module] | None = None
    activations: tuple[str, ...] = ("silu",)  # the gated MLP's accepted hidden_act values

    # --- names ---------------------------------------------------------------------------------

    def name_of(self, layer: int, slot: str, param: str = "weight") -> str:
        """The model's (and the checkpoint's) name of a block tensor: (3, "ffn_down") ->
        model.layers.3.mlp.down_proj.weight; the rotary pair indices (``ROPE_PAIRS``) have no param."""
        if slot == ROPE_PAIRS:
            return f"{self.layers}.{layer}.{self.parts[ROPE_PAIRS]}"
        return f"{self.layers}.{layer}.{self.parts[slot]}.{param}"

    def runtime_names(self, names) -> dict[str, str]:
        """{model name: the elastic model's name} for ``names``: layers.{i}.{slot}.{param} for block
        tensors, embed_tokens / norm / lm_head .weight for the others; names it does not know
        raise an error naming them."""
        known = {f"{path}.weight": f"{slot}.weight" for slot, path in self.top.items()}
        by_part = {path: slot for slot, path in self.parts.items()}
        out, unknown = {}, []
        prefix = self.layers + "."
        for name in names:
            if name in known:
                out[name] = known[name]
                continue
            layer, _, rest = name.removeprefix(prefix).partition(".")
            if name.startswith(prefix) and layer.isdigit():
                if rest == self.parts[ROPE_PAIRS]:
                    out[name] = f"layers.{layer}.{ROPE_PAIRS}"
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

    def heads(self, config: Mapping) -> Heads:
        """Attention heads of a Hugging Face config dict."""
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        return Heads(config["num_attention_heads"], config.get("num_key_value_heads") or
                     config["num_attention_heads"], head_dim)

    def biased(self, config: Mapping) -> frozenset[str]:
        """The slots whose projection has a bias in a model of ``config``."""
        return self.biases | {slot for flag, slots in self.bias_flags.items() if config.get(flag) for slot in slots}

    def groups(self, config: Mapping, layer: int) -> list[Group]:
        """The prunable groups of block ``layer`` that this family offers."""
        d = self.heads(config).head_dim
        biased = self.biased(config)
        name = lambda slot: self.name_of(layer, slot)  # noqa: E731
        bias = lambda *slots: tuple((self.name_of(layer, s, "bias"), r) for s, r in slots if s in biased)  # noqa: E731
        every = {
            # The down projection's input axis is pruned: whole quantization blocks.
            MLP: Group(MLP, layer, config["intermediate_size"], BLOCK,
                       ((name(FFN_GATE), "rows"), (name(FFN_UP), "rows"), (name(FFN_DOWN), "cols"),
                        *bias((FFN_GATE, "rows"), (FFN_UP, "rows")))),
            # Whole rotary pairs (channel j with j + d/2), shared by a KV head and its query heads;
            # their original indices travel with them.
            QK: Group(QK, layer, d // 2, 1,
                      ((name(ATTN_Q), "q"), (name(ATTN_K), "k"), *bias((ATTN_Q, "q"), (ATTN_K, "k")),
                       (self.name_of(layer, ROPE_PAIRS), "pairs"))),
            # V rank per KV head; the output projection's input axis is pruned: whole blocks.
            VO: Group(VO, layer, d, BLOCK, ((name(ATTN_V), "v"), (name(ATTN_OUT), "o"), *bias((ATTN_V, "v")))),
        }
        return [every[kind] for kind in (MLP, QK, VO) if kind in self.offers]

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
        """Refuse a config whose blocks compute what elastiq does not run, saying what it runs."""
        from .. import ElastiqError

        act = config.get("hidden_act") or config.get("hidden_activation") or "silu"
        if act not in self.activations:
            raise ElastiqError(f"hidden_act {act!r} is not supported for {self.name}; the elastic model runs "
                               f"{', '.join(self.activations)}")

    # --- a transformers model of this family -----------------------------------------------------

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def part(self, block: nn.Module, slot: str) -> nn.Module:
        """The module of ``slot`` inside a transformers block."""
        return block.get_submodule(self.parts[slot])

    def top_module(self, model: nn.Module, slot: str) -> nn.Module:
        """The embedding, final norm or head module (``EMBED``, ``FINAL_NORM``, ``HEAD``)."""
        return model.get_submodule(self.top[slot])


def is_norm(runtime_name: str) -> bool:
    """Whether a runtime name (or a block's local one, ``attn_norm.weight``) is a norm's weight."""
    parts = runtime_name.split(".")
    return parts[-1] == "weight" and (parts[-2] in NORMS or runtime_name == f"{FINAL_NORM}.weight")
