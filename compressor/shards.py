"""A model's weights read one module at a time from a Hugging Face folder's safetensors files.

The compressor holds the model as a skeleton whose parameters lie on the meta device (they take
no memory), fills one block from the files when it reaches it (``ShardWeights.load``) and empties
it again once the block is written (``release``). Peak memory is then one block, the embeddings
and the calibration activations, whatever the model's size; safetensors reads each tensor through
a memory map, so a shard is never read whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn


class ShardWeights:
    """The tensors of a folder's safetensors files, loaded into a module on request; ``files``
    maps every tensor's name to its file."""

    def __init__(self, files: Mapping[str, Path]):
        self.files = dict(files)

    def load(self, module: nn.Module, prefix: str) -> None:
        """Give every parameter and persistent buffer of ``module`` (named ``prefix`` + its own
        name in the files) its stored values, in the dtype it was created with."""
        from safetensors import safe_open

        wanted = {f"{prefix}{name}": (owner, attr) for name, owner, attr in module_tensors(module)}
        by_file: dict[Path, list[str]] = {}
        for name in wanted:
            by_file.setdefault(self.files[name], []).append(name)
        for file, names in by_file.items():
            with safe_open(file, "pt") as st:
                for name in names:
                    owner, attr = wanted[name]
                    old = getattr(owner, attr)
                    value = st.get_tensor(name).to(old.dtype)
                    if attr in owner._parameters:
                        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
                    else:
                        owner._buffers[attr] = value

    @staticmethod
    def release(module: nn.Module) -> None:
        """Put ``module``'s parameters and persistent buffers back on the meta device, freeing them."""
        for _, owner, attr in module_tensors(module):
            old = getattr(owner, attr)
            meta = torch.empty(old.shape, dtype=old.dtype, device="meta")
            if attr in owner._parameters:
                owner._parameters[attr] = nn.Parameter(meta, requires_grad=False)
            else:
                owner._buffers[attr] = meta


def module_tensors(module: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name within ``module``, owning submodule, attribute) of each parameter and persistent buffer."""
    found = []
    for path, owner in module.named_modules():
        stem = f"{path}." if path else ""
        for attr, p in owner._parameters.items():
            if p is not None:
                found.append((stem + attr, owner, attr))
        for attr, b in owner._buffers.items():
            if b is not None and attr not in owner._non_persistent_buffers_set:
                found.append((stem + attr, owner, attr))
    return found
