"""A model's weights read one module at a time from a GGUF file, as transformers' GGUF loader reads them.

The streamed compressor (``shards.ShardWeights`` for safetensors) holds the model as a skeleton
on the meta device and fills one block when it reaches it. A GGUF file is memory-mapped by
gguf-py's reader; a tensor is dequantized to float only when its module is loaded, through the
name map and the per-architecture processing (llama.cpp's q/k row permutation undone, Gemma's
norm offsets...) that ``transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint`` applies
to the whole file, so each tensor gets the values loading the file whole gives it.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .shards import ShardWeights, module_tensors


@cache
def dequantizable() -> frozenset:
    """The tensor types gguf-py's ``dequantize`` reads (gguf-py is imported on first use only)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import _type_traits

    return frozenset({GGMLQuantizationType.F32, GGMLQuantizationType.F16, *_type_traits})


class GGUFWeights:
    """The tensors of the GGUF file ``path`` for the model ``skeleton`` (transformers' module,
    its parameters anywhere), by the model's own names; ``missing`` lists the skeleton's tensors
    the file does not hold, or holds in a type gguf-py cannot dequantize (a skeleton with any is
    loaded whole, where transformers says what is wrong before any work is done)."""

    def __init__(self, path: Path, skeleton: nn.Module):
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                              get_gguf_hf_weights_map)

        self.reader = GGUFReader(path)  # a memory map: no tensor is read until asked for
        arch = self.reader.fields["general.architecture"].contents()
        self.processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=skeleton.config.to_dict())
        self.mapping = get_gguf_hf_weights_map(skeleton, self.processor)  # GGUF name -> model name
        by_name = {t.name: t for t in self.reader.tensors}
        self.tensors = {hf: by_name[name] for name, hf in self.mapping.items() if name in by_name}
        wanted = {name for name, _, _ in module_tensors(skeleton)}
        tied = {name for name, p in skeleton.named_parameters(remove_duplicate=False)} - \
            {name for name, _ in skeleton.named_parameters()}
        readable = {hf for hf, t in self.tensors.items() if t.tensor_type in dequantizable()}
        self.missing = sorted(wanted - readable - tied)

    release = staticmethod(ShardWeights.release)

    def load(self, module: nn.Module, prefix: str) -> None:
        """Give every parameter and persistent buffer of ``module`` (named ``prefix`` + its own
        name in the model) its dequantized value from the file, in the dtype it was created with."""
        from gguf import dequantize

        for name, owner, attr in module_tensors(module):
            tensor = self.tensors[prefix + name]
            weights = dequantize(tensor.data, tensor.tensor_type)
            weights = self.processor.process(weights=weights, name=tensor.name, tensor_key_mapping=self.mapping,
                                             parsed_parameters={"tensors": {}}).weights
            old = getattr(owner, attr)
            value = torch.from_numpy(np.array(weights, dtype=np.float32)).to(old.dtype)
            if value.shape != old.shape:
                raise ValueError(f"GGUF tensor {tensor.name} has shape {tuple(value.shape)}; the model's "
                                 f"{prefix + name} is {tuple(old.shape)}")
            if attr in owner._parameters:
                owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
            else:
                owner._buffers[attr] = value
