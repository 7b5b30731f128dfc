"""How much memory the device has free (``elastiq.machine``), and what each offered rate would
take on torch. A rate's footprint is predicted from the checkpoint's shapes alone, counting
what the runtime will hold:

- weights: each tensor in the form the model keeps it (``modeling.model.resident``: floats in the
  compute dtype, 4-bit matrices in their kernel's packed layout, ``kernels.q4_layout.q4_nbytes``),
  and the indices of the matrices held in unit order (``held_orders``);
- KV cache: ``ctx`` positions of the kept key and value channels of every block that holds
  attention, and every Mamba2 block's recurrent state (``modeling.ssm.state_bytes``: its widths',
  whatever the context); a hybrid's MLP-only blocks hold neither;
- workspace: the larger of loading's transient copies and the activations of a prefill chunk
  through the block that needs the most (attention, its MLP if it has one, or a Mamba2 mixer);
- baseline: the process's own resident memory before loading (Python, torch, the tokenizer).

The benchmark ``benchmarks/runtime.py`` compares this prediction with the measured peak RSS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from .. import ElastiqError
from ..checkpoint import Checkpoint, Heads
from ..families import checkpoint_family
from ..families.base import EMBED, HEAD, ROPE_PAIRS, SSM_IN_B, SSM_OUT, SSMConfig, is_norm
from ..kernels import q4_path
from ..kernels.q4 import REPACK_BYTES
from ..kernels.q4_layout import q4_nbytes
from ..modeling.model import (SSM_SCALARS, LayerArgs, SSMLayerArgs, attends, block_weights, layer_args,
                              layer_attention)
from ..modeling.ssm import state_bytes
from ..quants import BLOCK, BLOCK_BYTES
from .generate import PREFILL_CHUNK

SAFETY_MARGIN = 0.9  # use at most this share of the free memory


@dataclass(frozen=True)
class Footprint:
    """Predicted bytes of running one rate."""

    rate: float
    weights: int
    kv_cache: int  # the KV caches and the Mamba2 blocks' recurrent states
    workspace: int
    baseline: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.workspace + self.baseline


def runtime_shapes(ckpt: Checkpoint, rate: float) -> dict[str, tuple[tuple[int, ...], torch.dtype, str | None]]:
    """``Checkpoint.shapes`` of ``rate`` under the elastic model's names (``runtime_weights``)."""
    shapes = ckpt.shapes(rate)
    names = checkpoint_family(ckpt).runtime_names(shapes)
    return {names[name]: value for name, value in shapes.items()}


def held_orders(ckpt: Checkpoint, rate: float,
                device: torch.device | str = "cpu") -> dict[str, tuple[int, torch.Tensor]]:
    """{``layers.{i}.{slot}``: (axis, order)} of the block matrices the runtime holds with their
    pruned axis in unit order, at ``rate`` (``Checkpoint.unit_order``; a matrix whose unit order
    is its own, as an MLP's, is left out): the model gathers to and from that order
    (``modeling.model.UnitOrdered``), and holds each order as an int64 index."""
    names = checkpoint_family(ckpt).runtime_names(ckpt.names)
    orders = {}
    for name, runtime in names.items():
        slot, _, param = runtime.rpartition(".")
        if runtime.startswith("layers.") and param == "weight" and (order := ckpt.unit_order(name, rate)) is not None:
            orders[slot] = (ckpt.unit_axis(name), order.to(device))
    return orders


def layer_widths(shapes: Mapping[str, tuple], heads: Heads | None,
                 ssm: SSMConfig | None = None) -> list[LayerArgs | SSMLayerArgs]:
    """The widths of each block, read off runtime-named ``shapes`` without reading a weight
    (``modeling.model.layer_args``): a Mamba2 block's ``SSMLayerArgs`` (with a hybrid's MLP after the
    mixer, if any; ``ssm``, the model's mixer config, must then be given), else a ``LayerArgs`` of
    attention and an MLP or of either alone (a hybrid's). ``heads`` is None for a model without
    attention."""
    layers = sorted({int(name.split(".")[1]) for name in shapes if name.startswith("layers.")})
    kv_heads = heads.num_kv_heads if heads is not None else 0
    return [layer_args({k: torch.empty(v[0], device="meta") for k, v in block_weights(shapes, i).items()},
                       kv_heads, ssm, i) for i in layers]


def widest_mlp(shapes: Mapping[str, tuple], heads: Heads | None, ssm: SSMConfig | None = None) -> int:
    """The widest MLP's channels over the blocks of runtime-named ``shapes`` (a block without an MLP
    counts 0; a hybrid's Mamba2 block may hold one): what sizes a forward pass's activations."""
    return max((layer.intermediate_size for layer in layer_widths(shapes, heads, ssm)), default=0)


def rotary_bytes(config: Mapping, layers: list[LayerArgs | SSMLayerArgs], shapes: Mapping[str, tuple],
                 heads: Heads | None) -> int:
    """Bytes of what the attention blocks' RoPE holds beside the checkpoint's tensors: each set of
    rotary frequencies once (float32; blocks of one layer type share one, ``layer_attention``), and
    the rotary pair indices [G, u] (int64) of every block whose checkpoint stores none (a family
    or group that keeps every pair). Attention without RoPE
    (Nemotron-H) holds neither."""
    attending = [i for i, layer in enumerate(layers) if attends(layer) is not None]
    if not attending:
        return 0
    rope = layer_attention(config)
    frequencies = {id(rope[i].inv_freq): rope[i].inv_freq for i in attending if rope[i].inv_freq is not None}
    total = sum(f.nbytes for f in frequencies.values())
    for i in attending:
        if rope[i].inv_freq is not None and f"layers.{i}.{ROPE_PAIRS}" not in shapes:
            total += heads.num_kv_heads * attends(layers[i]).rope_pairs * 8
    return total


def block_cache_bytes(layer: LayerArgs | SSMLayerArgs, heads: Heads | None, ssm: SSMConfig | None, ctx: int,
                      itemsize: int) -> int:
    """What one block holds to decode: a Mamba2 block its recurrent state (float32, whatever
    ``ctx``; an MLP after the mixer adds none), a block with attention (beside a mixer, too) ``ctx``
    positions of its kept key (2 channels per rotary pair) and value (V rank) channels per KV head
    in the activations' dtype, an MLP alone nothing."""
    state = state_bytes(ssm, layer.head_dim, layer.state_size, 1) if isinstance(layer, SSMLayerArgs) else 0
    attention = attends(layer)
    if attention is None:
        return state
    return state + ctx * heads.num_kv_heads * (2 * attention.rope_pairs + attention.v_rank) * itemsize


def block_workspace(layer: LayerArgs | SSMLayerArgs, heads: Heads | None, ssm: SSMConfig | None, chunk: int,
                    ctx: int, hidden: int, itemsize: int) -> int:
    """Bytes a forward pass of ``chunk`` tokens through one block holds at once: per chunk token the
    residual, norm output, q, k, v, attention output, o (hidden each), the MLP's gate, up and
    product (up and its activation where it is ungated), plus, with attention, its scores and
    probabilities over the context (float32); a Mamba2 block's ``ssm_workspace``, or that of the
    gated MLP after its mixer (a hybrid's) where it is larger."""
    if isinstance(layer, SSMLayerArgs):
        mlp = chunk * (8 * hidden + 3 * layer.intermediate_size) * itemsize if layer.intermediate_size else 0
        scores = 2 * heads.num_heads * ctx * 4 if layer.attention else 0  # attention beside the mixer
        return max(ssm_workspace(ssm, layer.head_dim, layer.state_size, chunk, hidden, itemsize), mlp + chunk * scores)
    mlp = (3 if layer.gated else 2) * layer.intermediate_size if layer.mlp else 0
    scores = 2 * heads.num_heads * ctx * 4 if layer.attention else 0
    return chunk * ((8 * hidden + mlp) * itemsize + scores)


def predict_footprint(ckpt: Checkpoint, rate: float, ctx: int, dtype: torch.dtype, int4: bool,
                      baseline: int, path: str | None = None) -> Footprint:
    """The footprint of ``rate`` run with ``ctx`` positions of KV cache, activations in ``dtype``,
    4-bit matrices kept packed for the kernel ``path`` ("cpu", "torch" or "triton") when ``int4``, on top of
    a process that already holds ``baseline`` bytes. Without ``path``, the CPU's (``kernels.q4_path``)."""
    path = path or q4_path("cpu")
    itemsize = torch.empty((), dtype=dtype).element_size()
    config = ckpt.config
    tied = bool(config.get("tie_word_embeddings"))
    shapes = runtime_shapes(ckpt, rate)
    family = checkpoint_family(ckpt)
    weights, transient = 0, 0
    for name, (shape, stored_dtype, fmt) in shapes.items():
        if name.endswith(ROPE_PAIRS) and not family.rotary:
            continue  # the pair indices of q/k cut without RoPE: nothing to turn, the model holds none
        numel = math.prod(shape)
        quantized = fmt is not None
        repack = min(4 * numel, REPACK_BYTES) if path == "torch" else 0  # torch's int4pack repacks int32 codes
        stored = numel // BLOCK * BLOCK_BYTES[fmt] if quantized else numel * stored_dtype.itemsize
        # held: the form the model keeps; load: what loading it holds at once
        if fmt == "q8_0" and int4 and name in (f"{EMBED}.weight", f"{HEAD}.weight"):
            held = numel + numel // BLOCK * itemsize  # int8 codes and scales in the activations' dtype
            load = stored + held
        elif fmt == "q8_0" and int4:  # a block matrix: two 4-bit halves (CPU), or dequantized (Triton)
            held = 2 * q4_nbytes(*shape, path) if path in ("cpu", "torch") else numel * itemsize
            load = repack + stored + 2 * held
        elif quantized and int4:  # torch's repack of a row block as int32, the packed blocks and their
            # concatenation; elastiq's CPU kernel holds the blocks as read
            held = stored if name == "embed_tokens.weight" else q4_nbytes(*shape, path)
            load = stored if path == "cpu" else repack + 2 * held
        else:  # floats in the activations' dtype (norms and a mixer's dt_bias, A_log, D in float32),
            # integers (rope pair indices) as int64 (``modeling.model.resident``)
            wide = is_norm(name) or name.rpartition(".")[2] in SSM_SCALARS
            held = numel * (4 if wide else itemsize) if quantized or stored_dtype.is_floating_point \
                else numel * 8
            load = 2 * stored + held  # and their re-laid copy
        weights += held
        transient = max(transient, load)
    ssm = family.ssm_config(config)
    layers = layer_widths(shapes, ckpt.heads, ssm)
    weights += rotary_bytes(config, layers, shapes, ckpt.heads)
    weights += sum(order.numel() * 8 for _, order in held_orders(ckpt, rate, "meta").values())
    embed_shape, _, embed_format = shapes["embed_tokens.weight"]
    if tied and embed_format == "q4_0" and int4 and path != "cpu":
        weights += q4_nbytes(*embed_shape, path)  # the head multiplies by its own packed copy (Q8_0, and
        # elastiq's CPU kernel, which multiplies by the checkpoint's blocks as stored, share the embedding's)
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    chunk = min(PREFILL_CHUNK, ctx)
    # each block kind holds its own: a KV cache (attention), a recurrent state (Mamba2) or nothing (an MLP alone)
    kv = sum(block_cache_bytes(layer, ckpt.heads, ssm, ctx, itemsize) for layer in layers)
    activations = max(block_workspace(layer, ckpt.heads, ssm, chunk, ctx, hidden, itemsize) for layer in layers)
    activations += vocab * 4  # the last position's logits
    return Footprint(rate, weights, kv, max(activations, transient), baseline)


def ssm_widths(shapes: Mapping[str, tuple], ssm: SSMConfig) -> list[tuple[int, int]]:
    """(P, N) of each Mamba2 block in runtime-named ``shapes`` (``runtime_shapes``)."""
    out = []
    for name, (shape, *_) in sorted(shapes.items()):
        if name.endswith(f".{SSM_OUT}.weight"):
            states = shapes[name.replace(f".{SSM_OUT}.", f".{SSM_IN_B}.")][0]
            out.append((shape[1] // ssm.num_heads, states[0] // ssm.n_groups))
    return out


def widest_ssm(shapes: Mapping[str, tuple], ssm: SSMConfig) -> tuple[int, int]:
    """The widest P and the widest N over the Mamba2 blocks of ``shapes``: what an export that holds
    one P and one N (llama.cpp's ``mamba2``) widens every block to."""
    P, N = zip(*ssm_widths(shapes, ssm))
    return max(P), max(N)


def ssm_workspace(ssm: SSMConfig, head_dim: int, state_size: int, tokens: int, hidden: int, itemsize: int) -> int:
    """Bytes a Mamba2 block's forward pass over ``tokens`` holds at once (``modeling.ssm.ssd_scan``):
    its projections' outputs and the residual in the activations' dtype; in float32 the scan's
    inputs (x dt, and B and C per head), its output twice, the within-chunk scores (and their
    segment sums) of every chunk, and each chunk's local and entering states."""
    H, G, L = ssm.num_heads, ssm.n_groups, min(ssm.chunk_size, tokens)  # a short run is one chunk of its length
    P, N = head_dim, state_size
    chunks = -(-tokens // L)
    padded = chunks * L
    projections = tokens * (2 * H * P + 2 * G * N + H + 2 * hidden) * itemsize
    scan = 4 * (padded * (3 * H * P + 2 * H * N) + 4 * chunks * H * L * L + 2 * chunks * H * P * N)
    return projections + scan


def parse_size(text: str) -> int:
    """Bytes of a size such as ``1.5GiB``, ``800MB``, ``512MiB`` or a plain number of bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
             "K": 2**10, "M": 2**20, "G": 2**30}
    number = text.strip().upper().rstrip()
    unit = ""
    while number and not (number[-1].isdigit() or number[-1] == "."):
        unit = number[-1] + unit
        number = number[:-1]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit.strip() not in units or value <= 0:
        raise ElastiqError(f"memory size {text!r} is not understood; write e.g. 1.5GiB, 800MB, 512MiB or bytes")
    return int(value * units[unit.strip()])
