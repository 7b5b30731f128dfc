"""A nested checkpoint running at one rate: load only that rate's bytes, generate, switch rate.

``Engine`` opens a checkpoint, loads the chosen rate tensor by tensor (each tensor's raw bytes are
dropped once it is in the form the model holds), and keeps a ``Generator`` whose KV cache serves
the conversation. Pruned tensors are held with their pruned axis in the checkpoint's unit order
(``Checkpoint.iter_rate(unit_order=True)``; the model gathers to and from it, ``UnitOrdered``, and
a Mamba2 mixer's convolutions and gated norm gather their channels back, ``UnitOrderedParams``), so
that every rate's part of a held tensor is a prefix. ``set_rate`` changes every block in place, one
block at a time (attention or Mamba2): a smaller rate is cut from the weights in memory without
reading the file, a larger one reads and verifies only the units it lacks (``Checkpoint.read_span``)
and appends them; 4-bit matrices are cut and grown in their kernel's layout
(``kernels.q4_layout.q4_resize``), never unpacked. The KV caches and recurrent states have the old
widths, so they are emptied and the next turn re-fills the context.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from .. import ElastiqError
from ..checkpoint import Checkpoint
from ..families import checkpoint_family
from ..families.base import ROPE_PAIRS
from ..kernels import Q4Weight
from ..kernels.q4_layout import q4_resize
from ..kernels.q8 import Q8Pair
from ..modeling.model import (KVCache, Q4Linear, Q8PairLinear, RMSNorm, Transformer, UnitOrdered,
                              UnitOrderedParams, block_weights, build_block, layer_args, resident, rope_parameters)
from ..modeling.ssm import GatedRMSNorm, SSMState
from ..quants import Quantized, q8_0_halves
from .generate import Generator
from ..machine import return_freed_memory
from .memory import held_orders


@dataclass(frozen=True)
class Switch:
    """One rate change: from and to, seconds taken, and bytes read from the checkpoint."""

    old_rate: float
    new_rate: float
    seconds: float
    bytes_read: int


class Engine:
    """The model of ``checkpoint`` at ``rate`` on ``device``, with a KV cache of ``ctx`` positions.

    Activations are bfloat16 when the checkpoint is 4-bit (its matrices stay packed and multiply
    through the int4 kernels), float32 for a float checkpoint, unless ``dtype`` says otherwise.
    ``verify`` checks the sha256 of every segment read. ``tokenizer`` is the checkpoint's, loaded
    here unless given: a caller that plans the rate first loads it before measuring its own memory,
    since the tokenizer is part of the runtime's baseline (~60 MB for a 49k vocabulary).
    """

    backend = "torch"

    def __init__(self, checkpoint: str | Path | Checkpoint, rate: float, ctx: int = 2048,
                 dtype: torch.dtype | None = None, device: str | torch.device = "cpu", verify: bool = True,
                 tokenizer=None):
        self.ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
        self.config = self.ckpt.config
        self.family = checkpoint_family(self.ckpt)
        check_ctx(self.config, ctx)
        self.int4 = self.ckpt.quantization is not None
        self.dtype = dtype or (torch.bfloat16 if self.int4 else torch.float32)
        self.device, self.verify, self.ctx = torch.device(device), verify, ctx
        self.ckpt.rate_entry(rate)  # an unoffered rate fails before anything is read
        self.tokenizer = tokenizer or self.ckpt.tokenizer()
        return_freed_memory()
        start, read = time.perf_counter(), self.ckpt.bytes_read
        weights = {}
        runtime = self.family.runtime_names(self.ckpt.names)
        for name, t in self.ckpt.iter_rate(rate, verify, unit_order=True):
            if name not in self.ckpt.aliases:  # a tied head is re-tied from the config
                weights[name] = resident(runtime[name], _to(t, self.device), self.dtype, self.int4)
        orders = held_orders(self.ckpt, rate, self.device)
        self.model = Transformer.from_weights(weights, self.config, self.dtype, self.int4, orders)
        del weights
        return_freed_memory()
        self.rate = rate
        self.load_seconds = time.perf_counter() - start
        self.load_bytes = self.ckpt.bytes_read - read
        self.generator = Generator(self.model, ctx)

    def set_rate(self, rate: float) -> Switch:
        """Move to ``rate``: cut narrower weights from memory, or read only the missing units of
        wider ones; block by block, so at most one block is held twice. If a read fails (a
        corrupted segment), the blocks already switched are cut back and the engine stays at its
        old rate."""
        self.ckpt.rate_entry(rate)
        start, read = time.perf_counter(), self.ckpt.bytes_read
        old = self.rate
        if rate != old:
            self.model.clear_caches()  # KV caches and recurrent states: their widths are the old rate's
            switched = []
            try:
                target = self.ckpt.shapes(rate), held_orders(self.ckpt, rate, self.device)
                for i in range(len(self.model.layers)):
                    self._switch_block(i, *target)
                    switched.append(i)
                self.rate = rate
            except BaseException:
                back = self.ckpt.shapes(old), held_orders(self.ckpt, old, self.device)
                for i in switched:
                    self._switch_block(i, *back)
                raise
            finally:
                return_freed_memory()
                self.generator.reset(self.model)
        return Switch(old, rate, time.perf_counter() - start, self.ckpt.bytes_read - read)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, vocab] (float32) of every position of right-padded ``ids`` [B, T], each row
        run from position 0 without the KV cache: what evaluation scores."""
        with torch.inference_mode():
            return self.model(ids.to(self.device)).float().cpu()

    def _switch_block(self, index: int, shapes: Mapping[str, tuple], orders: Mapping[str, tuple]) -> None:
        """Replace block ``index`` by its weights at the rate of ``shapes`` (``Checkpoint.shapes``)
        and ``orders`` (``held_orders``)."""
        held = _held(self.model.layers[index])
        weights = {}
        for local, t in held.items():
            slot, _, param = local.partition(".")
            name = self.family.name_of(index, slot, param)
            axis = self.ckpt.unit_axis(name) if self.ckpt.holds(name) else None
            if axis is not None:  # else not pruned (or rotary pairs a family keeps whole): as held
                t = self._resize(name, local, t, axis, shapes[name][0][axis])
            weights[local] = resident(local, t, self.dtype, self.int4)
        del held
        args = self.model.args
        layer = layer_args(weights, args.num_kv_heads, args.ssm, index)
        self.model.layers[index] = build_block(args, layer, weights, self.model.attending[index],
                                               block_weights(orders, index))
        layers = list(self.model.args.layers)
        layers[index] = layer
        self.model.args = replace(self.model.args, layers=tuple(layers))

    def _resize(self, name: str, local: str, t: torch.Tensor | Q4Weight | Q8Pair, axis: int,
                size: int) -> torch.Tensor | Q4Weight | Q8Pair:
        """Held tensor ``name`` (``local`` in its block; its pruned axis ``axis`` in unit order) cut
        or grown to ``size`` along that axis."""
        if isinstance(t, Q4Weight):
            def read(start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
                part = self.ckpt.read_span(name, start, end, self.verify)
                return part.codes, part.scales

            return q4_resize(t, size, axis, read)
        if isinstance(t, Q8Pair):  # each half cut or grown as a 4-bit matrix; the span read once
            spans = {}

            def half(i: int):
                def read(start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
                    if (start, end) not in spans:
                        part = self.ckpt.read_span(name, start, end, self.verify)
                        spans[start, end] = q8_0_halves(part.codes, part.scales)
                    return spans[start, end][i]
                return read

            return Q8Pair(q4_resize(t.high, size, axis, half(0)), q4_resize(t.low, size, axis, half(1)))
        current = t.shape[axis]
        if size <= current:
            return t if size == current else t.narrow(axis, 0, size).clone()
        added = self.ckpt.read_span(name, current, size, self.verify)
        return torch.cat((t, resident(local, _to(added, self.device), self.dtype, self.int4)), axis)

    def weight_bytes(self) -> int:
        """Bytes of weights the model holds (each shared tensor once; the KV caches and recurrent
        states are not counted)."""
        seen, total = set(), 0
        for module in self.model.modules():
            if isinstance(module, (KVCache, SSMState)):
                continue
            tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
            if isinstance(module, Q4Linear):
                tensors += [module.weight.packed, module.weight.scales]
            if isinstance(module, Q8PairLinear):
                tensors += [w for half in (module.weight.high, module.weight.low) for w in (half.packed, half.scales)]
            for t in tensors:
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.nbytes
        return total


def check_ctx(config: dict, ctx: int) -> None:
    """Refuse a context the model was not trained for (its ``max_position_embeddings``), or one
    beyond what the runtime computes exactly: a ``longrope`` model (Phi-3's 128k releases) changes
    its frequencies past ``original_max_position_embeddings``, and the runtime keeps the short ones."""
    limit, why = config.get("max_position_embeddings"), "max_position_embeddings of its config"
    if rope_parameters(config).get("rope_type") == "longrope" and config.get("original_max_position_embeddings"):
        limit = config["original_max_position_embeddings"]
        why = ("original_max_position_embeddings: this runtime keeps longrope's short-context frequencies, which "
               "hold up to there")
    if ctx < 2 or (limit and ctx > limit):
        raise ElastiqError(f"--ctx {ctx} is outside what the model supports: 2 to {limit} positions ({why})")


def _to(t: torch.Tensor | Quantized, device: torch.device) -> torch.Tensor | Quantized:
    if isinstance(t, Quantized):
        return type(t)(t.codes.to(device), t.scales.to(device))
    return t.to(device)


def _held(block: nn.Module) -> dict[str, torch.Tensor | Q4Weight | Q8Pair]:
    """A block's tensors as it holds them (an attention ``Block`` or an ``SSMBlock``), by their
    runtime names within the block (``slot.param``; ``rope_pairs``, ``ssm_dt``, ``ssm_a``, ``ssm_d``)."""
    out = {}
    for name, module in block.named_children():
        if isinstance(module, (UnitOrdered, UnitOrderedParams)):
            module = module.inner
        if isinstance(module, (Q4Linear, Q8PairLinear)):
            out[f"{name}.weight"] = module.weight
            if module.bias is not None:
                out[f"{name}.bias"] = module.bias
        elif isinstance(module, (nn.Linear, nn.Conv1d, RMSNorm, GatedRMSNorm)):
            out.update({f"{name}.{p}": t.data for p, t in module.named_parameters(recurse=False)})
    out.update({name: t.data for name, t in block.named_parameters(recurse=False)})  # a mixer's dt_bias, A_log, D
    if getattr(block, "rope", None) is not None:
        out[ROPE_PAIRS] = block.rope_pairs
    return out
