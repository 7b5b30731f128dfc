"""The compression pipeline: intake, calibrate, sort, allocate, write the nested checkpoint."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .. import ElastiqError
from ..checkpoint import MANIFEST, QK, SSM_N, SSM_P, CheckpointWriter, checkpoint_output, Checkpoint, record_quality
from ..families import config_dict, family_for
from ..families.base import ATTENTION_KINDS, EMBED, FINAL_NORM, HEAD, ROPE_PAIRS, SSM_KINDS
from .allocate import ALLOCATIONS, allocate, check_kind_weights, check_rates, default_kind_weights, unit_params
from .calibrate import calibrate, calibration_file, calibration_samples, describe_calibration
from .devices import compute_device
from .distributed import one_process_threads, synchronize, world
from .intake import LoadedModel, load_model
from .needs import check_room, plan
from .progress import BlockProgress, stage_settings, staging
from .quality import QUALITY_WINDOWS, rate_quality
from .rotate import random_orthogonal, rotate_residual
from .sort import METHODS, sort_block
from .ssm_sort import METHODS as SSM_METHODS
from .ssm_sort import sort_block as sort_ssm_block

DEFAULT_RATES = (0.0, 0.15, 0.25, 0.35)


@dataclass
class CompressOptions:
    """Everything that decides the checkpoint's contents (recorded in its manifest)."""

    rates: Sequence[float] = DEFAULT_RATES
    calib_samples: int = 32
    calib_seqlen: int = 512
    calib_data: Path | None = None  # a text, JSON lines or parquet file; None: the packaged C4 sample
    quality_windows: int = QUALITY_WINDOWS  # held-out windows on which each rate is measured (0: none)
    seed: int = 0
    method: str = "uniql"
    allocation: str = "influence"
    ridge: float = 1.0
    temperature: float = 2.0
    kind_weights: dict[str, float] = field(default_factory=default_kind_weights)  # allocate.py
    rotate: bool = False
    device: str = "auto"  # where calibration and sorting compute (devices.py)
    timings: dict = field(default_factory=dict)


def compress(source: str | Path, output: str | Path, options: CompressOptions | None = None,
             overwrite: bool = False, data: Path | None = None, progress: bool = True,
             resume: Path | None = None, room_checked: bool = False) -> Path:
    """Compress ``source`` (a model path or name) into the nested checkpoint ``output``.

    With ``resume``, a folder, the run keeps there what it needs to go on from the last block
    it finished (the checkpoint being written, the calibration activations) when stopped, and a
    run of the same source and options given the same folder goes on from there; the folder is
    removed when the checkpoint is written. A run the machine has no room for is refused first
    (``needs``), unless the caller checked already (``room_checked``: the pipeline, for every stage)."""
    options = options or CompressOptions()
    output = checkpoint_output(output, overwrite)
    if options.method not in (*METHODS, *SSM_METHODS):
        raise ElastiqError(f"unknown sorting method {options.method!r}; known: {', '.join(METHODS)}, and for "
                           f"Mamba2 blocks {', '.join(m for m in SSM_METHODS if m not in METHODS)}")
    if options.allocation not in ALLOCATIONS:
        raise ElastiqError(f"unknown allocation {options.allocation!r}; known: {', '.join(ALLOCATIONS)}")
    kind_weights = check_kind_weights(options.kind_weights)
    if options.quality_windows < 0:
        raise ElastiqError(f"--quality-windows must be 0 (measure nothing) or more, got {options.quality_windows}")
    rates = check_rates(options.rates)
    device = compute_device(options.device)
    if not room_checked:
        check_room(plan(source, options.calib_samples, options.calib_seqlen, options.quality_windows), output,
                   device)

    # streamed (one block in memory at a time) where the source allows; rotation needs the whole model
    loaded = load_model(source, stream=not options.rotate)
    loaded.place(device)
    model, tokenizer = loaded.model, loaded.tokenizer
    config = config_dict(model.config)
    family = family_for(config)
    family.check(config)
    if options.rotate and family.unrotatable:
        raise ElastiqError(f"{family.name} models cannot be rotated (--rotate): {family.unrotatable}; compress "
                           "without --rotate")
    if options.rotate:  # before calibration: the statistics and the sort then see the rotated basis
        rotate_residual(model, family, random_orthogonal(model.config.hidden_size, options.seed))
    heads, kinds = family.heads(config), family.layer_kinds(config)
    if options.method not in METHODS and not set(SSM_KINDS) & set(kinds):
        raise ElastiqError(f"sorting method {options.method!r} orders Mamba2 blocks only; a {family.name} model "
                           f"has none: use {' or '.join(METHODS)}")
    blocks = family.blocks(model)
    layer_groups = [family.groups(config, i) for i in range(len(blocks))]
    unit = {g.name: unit_params(model, g) for layer in layer_groups for g in layer}
    calib_file = calibration_file(options.calib_data, data)
    drawn = calibration_samples(tokenizer, calib_file, options.calib_samples, options.calib_seqlen, options.seed,
                                heldout=options.quality_windows)
    samples, heldout = drawn[:options.calib_samples], drawn[options.calib_samples:]
    source_info = {
        "name": loaded.source, "model_type": loaded.model_type,
        "architectures": model.config.architectures, "config": config_dict(model.config),
        "chat_template": tokenizer.chat_template,
        "compression": {"method": options.method, "allocation": options.allocation, "ridge": options.ridge,
                        "temperature": options.temperature, "kind_weights": kind_weights,
                        "rotation": options.rotate,
                        "calib_data": describe_calibration(calib_file, data), "calib_samples": options.calib_samples,
                        "calib_seqlen": options.calib_seqlen, "quality_windows": options.quality_windows,
                        "seed": options.seed},
    }
    pairs = {family.name_of(i, ROPE_PAIRS): torch.empty(heads.num_kv_heads, heads.head_dim // 2, dtype=torch.int32,
                                                        device="meta")
             for i, kind in enumerate(kinds) if kind in ATTENTION_KINDS and QK in family.offers}
    blocks_done = BlockProgress(resume / "blocks", stage_settings(source, options)) if resume is not None else None
    start, kept, activations = blocks_done.restore() if blocks_done is not None else (0, {}, {})
    if world()[0] != 0:  # another rank runs its share of the calibration chunks; rank 0 writes
        _follow(loaded, family, samples, blocks, start, activations, blocks_done)
        synchronize()
        return output
    stored, aliases = _stored_tensors(model)
    groups = [g for layer in layer_groups for g in layer]
    begun = time.perf_counter()
    with staging(output, resume) as staged:  # measured before it takes its name: a kill leaves nothing
        if not (staged / MANIFEST).is_file():  # else a resumed run that was stopped while measuring
            writing = resume / "writing" if resume is not None else None
            with CheckpointWriter(staged, {**stored, **pairs}, groups, heads, aliases, True, writing) as writer:
                ends = [family.top_module(model, slot) for slot in (EMBED, FINAL_NORM, HEAD)]
                loaded.load(ends[0])
                influence, sort_seconds = kept.get("influence", [])[:start], 0.0
                for index, stats in calibrate(model, family, samples, progress=progress,
                                              load=lambda i: loaded.load(blocks[i]), start=start,
                                              activations=activations):
                    influence.append(stats.influence)
                    t = time.perf_counter()
                    with one_process_threads():  # a one-process run's bits, on every core
                        mixer = [g for g in layer_groups[index] if g.kind in (SSM_P, SSM_N)]
                        if mixer:
                            sort_ssm_block(model, family, index, mixer, stats, options.method, options.ridge)
                        others = [g for g in layer_groups[index] if g not in mixer]  # attention, MLP
                        if kinds[index] not in SSM_KINDS or others:
                            # a hybrid's other branches: an SSM-only method's baseline sorts the mixers alone
                            method = options.method if options.method in METHODS else "uniql"
                            order = sort_block(model, others, heads, stats, method, options.ridge)
                            if kinds[index] in ATTENTION_KINDS and QK in family.offers:
                                writer.put(family.name_of(index, ROPE_PAIRS), order)
                    sort_seconds += time.perf_counter() - t
                    _put(writer, loaded, blocks[index], stored)
                    if blocks_done is not None:
                        blocks_done.save(index, {"influence": influence}, activations)
                synchronize()  # the other ranks have saved their last activations
                options.timings.update(calibrate_and_sort=time.perf_counter() - begun, sort=sort_seconds)
                for module in ends:  # the embeddings are still loaded; a tied head is stored as them
                    if module is not ends[0] and \
                            any(n in stored for n in module.state_dict(prefix=loaded.prefix(module))):
                        loaded.load(module)
                    _put(writer, loaded, module, stored)

                t = time.perf_counter()
                specs = allocate(layer_groups, unit, rates,
                                 influence if options.allocation == "influence" else None, options.temperature,
                                 kind_weights)
                options.timings["allocate"] = time.perf_counter() - t
                t = time.perf_counter()
                writer.finish(specs, {**source_info, "block_influence": influence}, tokenizer)
            options.timings["write"] = time.perf_counter() - t
            del ends
        if len(heldout):
            del model, loaded, blocks
            t = time.perf_counter()
            ckpt = Checkpoint(staged)  # the sorted model at rate 0 is the source model: the dense reference
            with one_process_threads():  # rank 0 measures alone
                record_quality(ckpt, rate_quality(ckpt, ckpt, heldout, progress, device))
            options.timings["quality"] = time.perf_counter() - t
    if resume is not None:
        shutil.rmtree(resume)
    return output


def _follow(loaded: LoadedModel, family, samples: torch.Tensor, blocks: list[torch.nn.Module], start: int,
            activations: dict[int, torch.Tensor], blocks_done: BlockProgress | None) -> None:
    """Run this rank's calibration chunks through every block from ``start``, whose statistics
    rank 0 sorts by, keeping this rank's activations after each block when resumable."""
    loaded.load(family.top_module(loaded.model, EMBED))
    for index, _ in calibrate(loaded.model, family, samples, progress=False, load=lambda i: loaded.load(blocks[i]),
                              start=start, activations=activations):
        loaded.release(blocks[index])
        if blocks_done is not None:
            blocks_done.save(index, {}, activations)


def _stored_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of ``model``'s state dict on the meta device (its shape and dtype), and the
    names of tied ones ({alias: stored name}, as a tied head's)."""
    stored, aliases, first = {}, {}, {}
    tensors = dict(model.named_parameters(remove_duplicate=False))
    for name, t in model.state_dict(keep_vars=True).items():
        t = tensors.get(name, t)
        if id(t) in first:
            aliases[name] = first[id(t)]
        else:
            first[id(t)] = name
            stored[name] = torch.empty(t.shape, dtype=t.dtype, device="meta")
    return stored, aliases


def _put(writer: CheckpointWriter, loaded: LoadedModel, module: torch.nn.Module, stored: dict) -> None:
    """Write every stored tensor of ``module`` (once it is final), then free it if streamed."""
    for name, t in module.state_dict(prefix=loaded.prefix(module)).items():
        if name in stored:
            writer.put(name, t)
    loaded.release(module)
