"""Quantization stage: a float nested checkpoint in, the same checkpoint with Q4_0 matrices out
(and Q8_0 ones where a few more bits pay for their bytes).

The full sorted model runs in elastiq's own elastic model (a sorted model needs the RoPE gather),
block by block over C4 windows, and each block's matrices are quantized with the Hessians of
inputs that came through the already-quantized earlier blocks (GPTQ's sequential pass). One block
is held at a time: read from the float checkpoint, quantized, written (``CheckpointWriter``) and
freed before the next is read, so a model larger than memory is quantized. Every
rate is then a prefix of whole blocks of the same codes: slicing never re-quantizes. The token
embedding and the LM head are quantized round-to-nearest, to Q4_0 or, with ``embedding_bits=8``,
to Q8_0 (stored once when tied).

``q8`` names the block matrices that GPTQ puts on the Q8_0 grid instead: slots (by default
``attn_v``, the value projections) and ``first-last`` (every matrix of the first and the last
block). Measured per kind on SmolLM2 (benchmarks/results/precision_per_kind.md), the value
projections buy the most KL to the dense model per added byte at every rate, by far: llama.cpp's
own 4-bit mixes also give ``attn_v`` more bits.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
from tqdm.auto import tqdm

from .. import ElastiqError
from ..checkpoint import (MANIFEST, MLP, SSM_P, VO, Checkpoint, CheckpointWriter, RateSpec, checkpoint_output,
                          record_quality)
from ..families import checkpoint_family
from ..families.base import (ATTN_OUT, ATTN_V, BLOCK_READS, EMBED, HEAD, MATRICES, PRUNED_INPUTS, SSM_MATRICES,
                             SSM_OUT, Family)
from ..modeling.model import Transformer, block_from_weights
from ..quants import BLOCK, Quantized, QuantizedTensor, quantize_q8_0, quantize_rtn
from .blockwise import BlockReader, block_runner
from .calibrate import calibration_file, calibration_samples, describe_calibration
from .devices import compute_device
from .gptq import ORDERS, act_order, gptq, sorted_axis_order
from .progress import BlockProgress, stage_settings, staging
from .quality import QUALITY_WINDOWS, rate_quality

METHODS = ("gptq", "rtn")
EMBEDDING_FORMATS = {4: "q4_0", 8: "q8_0"}  # bits of the token embedding and LM head: their format
FIRST_LAST = "first-last"  # every matrix of the first and the last block
Q8_KINDS = (*MATRICES, *SSM_MATRICES, FIRST_LAST)  # what ``q8`` may name
DEFAULT_Q8 = (ATTN_V,)


@dataclass
class QuantizeOptions:
    """How to quantize (recorded in the manifest's ``quantization``)."""

    method: str = "gptq"
    order: str = "forward"
    bits: int = 4
    block_size: int = BLOCK
    embedding_bits: int = 4
    q8: tuple[str, ...] = DEFAULT_Q8  # block matrices on the Q8_0 grid (Q8_KINDS)
    calib_samples: int = 32
    calib_seqlen: int = 512
    calib_data: Path | None = None  # a text, JSON lines or parquet file; None: the packaged C4 sample
    quality_windows: int = QUALITY_WINDOWS  # held-out windows on which each rate is measured (0: none)
    seed: int = 0
    damp: float = 0.01
    device: str = "auto"  # where GPTQ and the quality measure compute (devices.py)
    timings: dict = field(default_factory=dict)


def _check(options: QuantizeOptions, ckpt: Checkpoint) -> None:
    if options.bits != 4 or options.block_size != BLOCK:
        raise ElastiqError(f"only {BLOCK}-weight blocks of 4 bits (GGUF Q4_0) are supported; "
                           f"got {options.bits} bits in blocks of {options.block_size}")
    if options.embedding_bits not in EMBEDDING_FORMATS:
        raise ElastiqError(f"the token embedding and LM head are quantized to 4 or 8 bits (GGUF Q4_0 or Q8_0); "
                           f"got {options.embedding_bits}")
    if unknown := [k for k in options.q8 if k not in Q8_KINDS]:
        raise ElastiqError(f"--q8 names {', '.join(map(repr, unknown))}; it takes block matrices by slot or "
                           f"{FIRST_LAST!r}: {', '.join(Q8_KINDS)}")
    if options.method not in METHODS:
        raise ElastiqError(f"unknown quantization method {options.method!r}; known: {', '.join(METHODS)}")
    if options.order not in ORDERS:
        raise ElastiqError(f"unknown column order {options.order!r}; known: {', '.join(ORDERS)}")
    if options.quality_windows < 0:
        raise ElastiqError(f"--quality-windows must be 0 (measure nothing) or more, got {options.quality_windows}")
    if ckpt.quantization:
        raise ElastiqError(f"{ckpt.path} is already quantized ({ckpt.quantization['format']}); "
                           "quantize the float checkpoint that `elastiq compress` wrote")
    for g in ckpt.groups:
        if g.kind in (MLP, VO, SSM_P) and g.width % BLOCK:
            raise ElastiqError(f"group {g.name} has {g.width} channels on a matrix's input axis, not a multiple "
                               f"of the {BLOCK}-weight block")


def _order(slot: str, h: torch.Tensor, in_features: int, heads: int, least_important_first: bool) -> torch.Tensor:
    """Column order: sorted (pruned) input axes by the chosen order (one run for MLP channels,
    one per head for V/O rank and SSM head channels: ``heads`` runs), the hidden axis by act-order."""
    if slot in PRUNED_INPUTS:
        runs = 1 if PRUNED_INPUTS[slot] == MLP else heads
        return sorted_axis_order(in_features, runs, least_important_first)
    return act_order(h)


@torch.no_grad()
def quantize_checkpoint(source: str | Path, output: str | Path, options: QuantizeOptions | None = None,
                        overwrite: bool = False, data: Path | None = None, progress: bool = True,
                        dense: str | Path | None = None, resume: Path | None = None) -> Path:
    """Quantize the float nested checkpoint ``source`` into ``output``; each rate's quality is
    measured against rate 0 of ``dense`` (a float checkpoint of the same model: the sorted one
    before recovery), or of ``source`` itself. One block is read, quantized and written at a time
    (besides the embedding, the head and the calibration activations), so that a model larger
    than memory is quantized. With ``resume``, a folder, a stopped run goes on from the last block
    it finished when run again with the same source and options (``compress`` says how)."""
    options = options or QuantizeOptions()
    ckpt = Checkpoint(source)
    family = checkpoint_family(ckpt)
    _check(options, ckpt)
    device = compute_device(options.device)
    output = checkpoint_output(output, overwrite)

    start = time.perf_counter()
    config = ckpt.config
    reader = BlockReader(ckpt, config, device=device)
    tokenizer = ckpt.tokenizer()
    heldout = torch.empty(0)
    calib_file = calibration_file(options.calib_data, data)
    if options.method == "gptq" or options.quality_windows:
        drawn = calibration_samples(tokenizer, calib_file, options.calib_samples, options.calib_seqlen,
                                    options.seed, heldout=options.quality_windows)
        samples, heldout = drawn[:options.calib_samples], drawn[options.calib_samples:]
    formats, applied = _formats(ckpt, family, options)
    spec = {"format": "q4_0", "bits": 4, "block": BLOCK, "scale_dtype": "float16", "method": options.method,
            "order": options.order, "calib_samples": options.calib_samples if options.method == "gptq" else 0,
            "calib_data": describe_calibration(calib_file, data) if options.method == "gptq" else None,
            "quality_windows": options.quality_windows,
            "calib_seqlen": options.calib_seqlen,
            "seed": options.seed, "damp": options.damp, "embeddings": "rtn",
            "embedding_format": EMBEDDING_FORMATS[options.embedding_bits],
            "q8_0_matrices": [k for k in options.q8 if k in applied]}
    rates = [RateSpec(r["rate"], r["widths"]) for r in ckpt.rate_table]  # the float quality no longer holds
    blocks_done = None
    if resume is not None:  # rank 0 quantizes alone in a distributed run
        blocks_done = BlockProgress(resume / "blocks", stage_settings(ckpt.path.resolve(), options), alone=True)
    first, _, saved = blocks_done.restore() if blocks_done is not None else (0, {}, {})
    with staging(output, resume) as staged:  # measured before it takes its name: a kill leaves nothing
        if not (staged / MANIFEST).is_file():  # else a resumed run that was stopped while measuring
            writing = resume / "writing" if resume is not None else None
            with CheckpointWriter(staged, _plan(ckpt, formats), ckpt.groups, ckpt.heads, ckpt.aliases, True,
                                  writing) as writer:
                ends = reader.ends()
                hidden, positions = [], None  # round-to-nearest needs no calibration activations
                if options.method == "gptq":
                    positions = torch.arange(samples.shape[1], device=device)
                    embed_tokens = Transformer.ends_from_weights(ends, config).embed_tokens
                    hidden = [saved[c].to(device) for c in sorted(saved)] if first else \
                        [embed_tokens(chunk.to(device)) for chunk in samples.split(4)]
                    del embed_tokens
                for name, t in ends.items():  # a tied head is the embedding's alias, written with it
                    if name in formats:
                        writer.put(name, _round_to_nearest(t, formats[name]))
                    elif name not in ckpt.aliases:
                        writer.put(name, t)
                del ends
                for index in tqdm(range(first, len(reader.blocks)), desc="quantize", disable=not progress,
                                  leave=False, initial=first, total=len(reader.blocks)):
                    hidden = _quantize_block(reader, index, family, options, formats, hidden, positions, writer)
                    if blocks_done is not None:
                        blocks_done.save(index, {}, dict(enumerate(hidden)))
                options.timings["quantize"] = time.perf_counter() - start
                writer.finish(rates, ckpt.source.record, tokenizer, quantization=spec)
            del hidden
        if len(heldout):
            t = time.perf_counter()
            written = Checkpoint(staged)
            reference = Checkpoint(dense) if dense is not None else ckpt
            record_quality(written, rate_quality(written, reference, heldout, progress, device))
            options.timings["quality"] = time.perf_counter() - t
    if resume is not None:
        shutil.rmtree(resume)
    return output


def _formats(ckpt: Checkpoint, family: Family, options: QuantizeOptions) -> tuple[dict[str, str], set[str]]:
    """The code format of every matrix to quantize, by name ("q4_0", or "q8_0" where ``options``
    asks for it), and the ``q8`` names that chose a matrix (a Mamba2 has no ``attn_v``). The
    embedding and the head are those stored: a tied head is the embedding's alias."""
    formats, applied = {}, set()
    kinds = family.layer_kinds(ckpt.config)
    last = len(kinds) - 1
    for index, kind in enumerate(kinds):
        for slot in BLOCK_READS[kind]:
            chosen_by = [k for k in (slot, FIRST_LAST if index in (0, last) else None) if k in options.q8]
            applied.update(chosen_by)
            formats[family.name_of(index, slot)] = "q8_0" if chosen_by else "q4_0"
    for slot in (EMBED, HEAD):
        name = f"{family.top[slot]}.weight"
        if name in ckpt.names:
            formats[name] = EMBEDDING_FORMATS[options.embedding_bits]
    return formats, applied


def _plan(ckpt: Checkpoint, formats: Mapping[str, str]) -> dict[str, torch.Tensor | Quantized]:
    """The quantized checkpoint's tensors on the meta device, in ``ckpt``'s order (its writer lays
    the weights file out so): the matrices named in ``formats`` as their codes and scales, the
    others as ``ckpt`` stores them at rate 0."""
    plan = {}
    for name, (shape, dtype, _) in ckpt.shapes(0.0).items():
        if name not in formats:
            plan[name] = torch.empty(shape, dtype=dtype, device="meta")
            continue
        if shape[1] % BLOCK:
            raise ElastiqError(f"{name} has an input axis of {shape[1]}, not a multiple of the Q4_0 block of {BLOCK}")
        plan[name] = _round_to_nearest(torch.empty(shape, device="meta"), formats[name])  # its parts' shapes
    return plan


def _quantize_block(reader: BlockReader, index: int, family: Family, options: QuantizeOptions,
                    formats: Mapping[str, str], hidden: list[torch.Tensor], positions: torch.Tensor | None,
                    writer: CheckpointWriter) -> list[torch.Tensor]:
    """Read block ``index`` at rate 0, quantize its matrices (GPTQ on the Hessians of ``hidden``,
    its inputs through the already-quantized earlier blocks, or round-to-nearest), write them and
    its float tensors, and return ``hidden`` through the quantized block; the block is freed on return."""
    tensors = reader.block(index)
    block = block_from_weights(tensors, reader.source.config, index)
    matrices = BLOCK_READS[family.layer_kinds(reader.source.config)[index]]
    run, hessians = None, {}
    if options.method == "gptq":
        run = block_runner(block, positions)
        hessians = _block_hessians(block, run, hidden, set(matrices.values()))
    for slot, reads in matrices.items():
        name = family.name_of(index, slot)
        linear = block.get_submodule(slot)
        if options.method == "gptq":
            h = hessians[reads]
            # runs of a pruned input axis: per attention query head (attn_output), or per SSM head (ssm_out);
            # Falcon-H1's block has both, each its own count
            heads = block.attn_heads if slot == ATTN_OUT else block.num_heads if slot == SSM_OUT else 1
            order = _order(slot, h, linear.in_features, heads, options.order == "least-important-first")
            t = gptq(linear.weight, h, order, options.damp, fmt=formats[name])
        else:
            t = _round_to_nearest(linear.weight, formats[name])
        linear.weight.copy_(t.dequantize())  # later blocks see this block quantized
        writer.put(name, t)
    for name, t in tensors.items():
        if name not in formats:
            writer.put(name, t)
    return [run(x) for x in hidden] if run is not None else hidden


def _round_to_nearest(w: torch.Tensor, fmt: str) -> Quantized:
    """Round-to-nearest of the matrix ``w`` to ``fmt`` ("q4_0" or "q8_0")."""
    return QuantizedTensor(*quantize_rtn(w)) if fmt == "q4_0" else quantize_q8_0(w)


def _block_hessians(block: torch.nn.Module, run: Callable[[torch.Tensor], torch.Tensor], hidden: list[torch.Tensor],
                    inputs: set[str]) -> dict[str, torch.Tensor]:
    """Sum of x x^T (float64) over the calibration tokens of each of ``inputs``, the slots whose
    input the block's matrices read, as ``run`` passes ``hidden`` through ``block``."""
    sums: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def collect(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
        return collect

    handles = [block.get_submodule(name).register_forward_pre_hook(hook(name)) for name in inputs]
    try:
        for x in hidden:
            run(x)
    finally:
        for h in handles:
            h.remove()
    return sums
