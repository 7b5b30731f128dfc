"""A model read and run one block at a time, so that quantization (``quantize.py``) and the
measure of each rate (``quality.py``) hold one block of a model larger than memory, besides its
embedding and head.

``BlockReader`` gives the tensors of one block, or of the model's ends (embedding, final norm,
head), at one rate, on the device the stage computes on: read from a checkpoint as
``Checkpoint.iter_rate`` reads them (the rate's byte prefix of each stored part, verified, in the
tensor's own form), or taken from a mapping already in memory.
``modeling.model.block_from_weights`` and ``Transformer.ends_from_weights`` build what they hold,
computing what the whole model computes.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Mapping, Sequence

import torch

from .. import ElastiqError
from ..checkpoint import Checkpoint
from ..families import family_for
from ..modeling.model import Block, SSMBlock, Weight
from .devices import to_device


class BlockReader:
    """The tensors of a model by block: ``source``'s at ``rate`` (a checkpoint), or ``source``
    itself (a mapping, any names the family of ``config`` knows), on ``device``. ``blocks[i]``
    names block i's tensors, ``top`` the others; a tied head is the same object as the embedding
    it names."""

    def __init__(self, source: Checkpoint | Mapping[str, Weight], config: Mapping, rate: float = 0.0,
                 device: torch.device | str = "cpu"):
        self.source, self.device = source, torch.device(device)
        checkpoint = isinstance(source, Checkpoint)
        names = [*source.names, *source.aliases] if checkpoint else list(source)
        layers = config["num_hidden_layers"]
        self.blocks: list[list[str]] = [[] for _ in range(layers)]
        self.top: list[str] = []
        for name, runtime in family_for(config).runtime_names(names).items():
            kind, _, rest = runtime.partition(".")
            if kind != "layers":
                self.top.append(name)
                continue
            index = int(rest.partition(".")[0])
            if index >= layers:
                raise ElastiqError(f"tensor {name} belongs to block {index}; the config describes {layers} blocks")
            self.blocks[index].append(name)
        self.rate = rate

    def block(self, index: int) -> dict[str, Weight]:
        """Block ``index``'s tensors."""
        return self.read(self.blocks[index])

    def ends(self) -> dict[str, Weight]:
        """The tensors outside the blocks: token embedding, final norm, LM head (or its alias)."""
        return self.read(self.top)

    def read(self, names: Sequence[str]) -> dict[str, Weight]:
        """Tensors ``names`` by name; an alias is the same object as the tensor it names."""
        if not isinstance(self.source, Checkpoint):
            return to_device({name: self.source[name] for name in names}, self.device)
        aliases, read = self.source.aliases, {}
        for name in names:
            stored = aliases.get(name, name)
            if stored not in read:
                read[stored] = self._read(stored)
            read[name] = read[stored]
        return {name: read[name] for name in names}

    def _read(self, name: str) -> Weight:
        """Stored model tensor ``name`` at the reader's rate, as ``Checkpoint.iter_rate`` reads it."""
        return self.source.read_tensor(name, self.rate).to(self.device)


def block_runner(block: Block | SSMBlock, positions: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``block`` (``block_from_weights``) as a function of its input [B, T, hidden] at positions
    ``positions`` [T]: an attention block (or a mixer with attention beside it) on RoPE tables
    computed once (none without RoPE), a Mamba2 block as it is."""
    tables = block.rope_tables(positions) if block.rope is not None else None
    return partial(block, tables=tables)
