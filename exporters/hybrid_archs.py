"""llama.cpp's architectures of Mamba2 blocks, and what each can hold per layer.

One description for the two places that must agree on it: the GGUF exporter, which writes a
rate at the widths the architecture can say (``gguf._write_hybrid``), and the llama.cpp backend,
which plans the memory of the file it will run and refuses what llama.cpp cannot run.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..families.base import ATTENTION, ATTENTION_ONLY, MLP_ONLY, PARALLEL, SSM, SSM_MLP


@dataclass(frozen=True)
class HybridArch:
    """The block kinds an architecture holds; whether it has one MLP width for every block (MLPs
    then zero-padded to the rate's widest); whether it loads Mamba2 blocks of inner size 2 x hidden
    only (P then zero-padded to 2 x hidden / heads, whatever the rate keeps)."""

    kinds: frozenset[str]
    one_mlp_width: bool = False
    inner_twice_hidden: bool = False


HYBRID_ARCHITECTURES = {
    "mamba2": HybridArch(frozenset({SSM})),
    "nemotron_h": HybridArch(frozenset({SSM, ATTENTION_ONLY, MLP_ONLY})),  # every MLP keeps its own width
    # Bamba, as llama.cpp's converter writes BambaForCausalLM
    "granitehybrid": HybridArch(frozenset({SSM_MLP, ATTENTION}), one_mlp_width=True, inner_twice_hidden=True),
    "falcon-h1": HybridArch(frozenset({PARALLEL}), one_mlp_width=True),
}


def written_head_dim(arch: str, hidden_size: int, num_heads: int, widest: int) -> int:
    """P of every Mamba2 block in a file of ``arch``: the rate's ``widest``, or 2 x hidden / heads
    where the architecture loads that inner size only (N is always the rate's widest)."""
    return 2 * hidden_size // num_heads if HYBRID_ARCHITECTURES[arch].inner_twice_hidden else widest
