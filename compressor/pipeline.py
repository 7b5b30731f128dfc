"""The cloud pipeline in one call: calibrate and sort, allocate, recover, quantize.

``build`` runs the stages of ``compress`` (calibration, sorting, allocation), ``recover`` (nested
LoRA, distilled from the dense model) and ``quantize`` (GPTQ to Q4_0) one after the other, each
writing its checkpoint into a work folder beside the output, ``NAME.elastiq.stages/`` (sorting
alone, with neither of the others, writes the output directly):
``sorted.elastiq``, then ``recovered.elastiq`` (with recovery's own resumable state beside it),
then the final checkpoint under the output's name, after which the work folder is removed. A run
stopped at any point resumes at the stage it was in (sorting and quantization at their last
finished block, in ``sorting/`` and ``quantizing/``; recovery at its last saved step) when run
again with the same source and options; with other options it starts over. Every rate's quality
in the final checkpoint is measured against the sorted model before recovery: the dense model.

Launched on several ranks (torchrun), every rank runs its share of sorting's calibration and of
recovery's batches; rank 0 writes, quantizes and reports (``distributed.py``).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..atomic import write_text
from ..checkpoint import MANIFEST, checkpoint_output, SUFFIX, Checkpoint, record_quality
from ..paths import data_dir
from .calibrate import calibration_file, heldout_windows
from .compress import CompressOptions, compress
from .devices import compute_device
from .distributed import agree, one_process_threads, world
from .intake import check_source
from .needs import Needs, check_room, plan
from .quality import rate_quality
from .quantize import QuantizeOptions, quantize_checkpoint
from .recover import RecoverOptions, recover_checkpoint

STAGES = "stages.json"  # the work folder's record of what its checkpoints were made from
SORTING = "sorting"  # the sorting stage's resume folder in the work folder (compress's ``resume``)
QUANTIZING = "quantizing"  # and the quantization stage's


@dataclass
class PipelineOptions:
    """Each stage's options; ``recover`` or ``quantize`` None leaves that stage out (without
    ``quantize`` the output is the float checkpoint)."""

    compress: CompressOptions = field(default_factory=CompressOptions)
    recover: RecoverOptions | None = field(default_factory=RecoverOptions)
    quantize: QuantizeOptions | None = field(default_factory=QuantizeOptions)

    def settings(self, source: str) -> dict:
        """What decides every stage's result, as the work folder records it."""
        comp = {k: _plain(v) for k, v in asdict(self.compress).items() if k != "timings"}
        quant = None
        if self.quantize is not None:
            quant = {k: _plain(v) for k, v in asdict(self.quantize).items() if k != "timings"}
        return {"source": source, "compress": comp,
                "recover": self.recover.settings() if self.recover is not None else None, "quantize": quant}


def _plain(value):
    """An option as JSON reads it back (a path as its text, a tuple as a list), so records compare."""
    return str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value


def run_needs(source: str | Path, options: PipelineOptions) -> Needs:
    """The memory and disk that compressing ``source`` through the stages ``options`` asks for needs."""
    c = options.compress
    return plan(source, c.calib_samples, c.calib_seqlen, c.quality_windows, quantize=options.quantize is not None,
                recover=options.recover is not None)


def stages_dir(output: Path) -> Path:
    """The work folder of ``output``: ``NAME.elastiq.stages`` beside it."""
    return output.with_name(output.name + ".stages")


def _source_key(source: str | Path) -> str:
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else str(source)


def _done(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def build(source: str | Path, output: str | Path, options: PipelineOptions | None = None, overwrite: bool = False,
          data: Path | None = None, progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """Compress ``source`` (a model path or name) into the nested checkpoint ``output`` through
    every stage ``options`` asks for, resuming the stages a stopped run of the same options left."""
    options = options or PipelineOptions()
    output = checkpoint_output(output, overwrite)
    device = compute_device(options.compress.device)  # every stage computes there
    if options.recover is not None:
        options.recover.seed, options.recover.device = options.compress.seed, options.compress.device
        if options.recover.bf16 is None:  # settled now: the work folder's record must not change on resume
            from .recover import native_bf16
            options.recover.bf16 = native_bf16(device)
    if options.quantize is not None:  # quantization calibrates on the same text as sorting
        c, q = options.compress, options.quantize
        q.calib_samples, q.calib_seqlen, q.calib_data = c.calib_samples, c.calib_seqlen, c.calib_data
        q.quality_windows, q.seed, q.device = c.quality_windows, c.seed, c.device
    work = stages_dir(output)
    if options.recover is None and options.quantize is None:  # one stage: straight to the output
        compress(source, output, options.compress, overwrite=overwrite, data=data, progress=progress,
                 resume=work / SORTING)
        if world()[0] == 0:
            shutil.rmtree(work, ignore_errors=True)
        return output
    if world()[0] != 0:  # another rank: it joins sorting and recovery if rank 0 runs them; quantizing is rank 0's
        if agree(None):
            compress(source, work / f"sorted{SUFFIX}", options.compress, overwrite=True, data=data, progress=False,
                     resume=work / SORTING, room_checked=True)
        if options.recover is not None and agree(None):
            recover_checkpoint(work / f"sorted{SUFFIX}", work / f"recovered{SUFFIX}", options.recover, overwrite=True,
                               data=data or data_dir(), progress=False)
        return output
    check_source(source)  # a bad source fails before any stage starts
    needs = run_needs(source, options)
    log(f"elastiq: this run {needs.describe()}")
    check_room(needs, output, device)
    settings = options.settings(_source_key(source))
    record = work / STAGES
    if work.exists():
        if record.is_file() and json.loads(record.read_text()) == settings:
            log(f"elastiq: resuming the stages in {work}")
        else:
            log(f"elastiq: {work} holds stages of another source or other options; starting over")
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    write_text(record, json.dumps(settings, indent=2) + "\n")

    try:
        return _stages(source, output, options, work, data, progress, log)
    except BaseException:
        if not any(p.name != STAGES for p in work.iterdir()):  # nothing finished: nothing to resume from
            shutil.rmtree(work, ignore_errors=True)
        raise


def _stages(source: str | Path, output: Path, options: PipelineOptions, work: Path, data: Path | None,
            progress: bool, log: Callable[[str], None]) -> Path:
    count = 1 + (options.recover is not None) + (options.quantize is not None)
    dense = work / f"sorted{SUFFIX}"
    if agree(not _done(dense)):  # the other ranks, if any, join this stage
        log(f"elastiq: stage 1/{count}: calibrate, sort and allocate")
        compress(source, dense, options.compress, overwrite=True, data=data, progress=progress,
                 resume=work / SORTING, room_checked=True)
    current = dense
    if options.recover is not None:
        recovered = work / f"recovered{SUFFIX}"
        if agree(not _done(recovered)):  # the other ranks, if any, train too
            log(f"elastiq: stage 2/{count}: recover ({options.recover.steps} steps of nested LoRA"
                + (", distilled from the dense model)" if options.recover.distill else ")"))
            recover_checkpoint(dense, recovered, options.recover, overwrite=True, data=data or data_dir(),
                               progress=progress)
        current = recovered
    if options.quantize is not None:
        log(f"elastiq: stage {count}/{count}: quantize ({options.quantize.method})")
        with one_process_threads():  # rank 0 quantizes alone: on every core, with a one-process run's bits
            quantize_checkpoint(current, output, options.quantize, overwrite=True, data=data, progress=progress,
                                dense=dense, resume=work / QUANTIZING)
    else:
        if options.compress.quality_windows:
            with one_process_threads():
                _measure_against(Checkpoint(current), Checkpoint(dense), options.compress, data, progress)
        if output.exists():
            shutil.rmtree(output)
        os.replace(current, output)
    shutil.rmtree(work)
    return output


def _measure_against(ckpt: Checkpoint, dense: Checkpoint, options: CompressOptions, data: Path | None,
                     progress: bool) -> None:
    """Record each rate of the float checkpoint ``ckpt`` against rate 0 of ``dense`` on the
    held-out windows compression measured the dense model's rates on."""
    windows = heldout_windows(ckpt.tokenizer(), calibration_file(options.calib_data, data),
                              options.quality_windows, options.calib_seqlen, options.seed)
    record_quality(ckpt, rate_quality(ckpt, dense, windows, progress, compute_device(options.device)))
