"""What a stage that goes block by block keeps so that a killed run goes on from the last block
it finished, on every rank.

In the stage's resume folder: ``progress.json`` (rank 0's: the stage's settings, the number of
ranks, how many blocks are done and what the stage keeps of them, as each block's influence) and,
for each rank, the calibration activations leaving its last two finished blocks
(``activations-rank{r}-block{i}.safetensors``). A block counts as done once rank 0 has put its
tensors into the resumable checkpoint writer and recorded it; since the ranks go in step, one
rank may be a block ahead of another when killed, which is why each keeps two.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from ..atomic import atomic_path, resumable_path, write_text
from .distributed import agree, world

PROGRESS = "progress.json"


def staging(output: Path, resume: Path | None):
    """Where the checkpoint is written and measured before it takes the name ``output`` (a context
    manager): a temporary that a kill removes, or, when resumable, a folder in ``resume`` that
    outlives it."""
    return atomic_path(output, named=True) if resume is None else resumable_path(output, resume)


def stage_settings(source: str | Path, options) -> dict:
    """What decides a stage's result, as its resume folder records it: the source and the stage's
    options (a dataclass; its ``timings`` left out), in JSON's own types."""
    fields = {k: v for k, v in asdict(options).items() if k != "timings"}
    return json.loads(json.dumps({"source": str(source), **fields}, default=str))


class BlockProgress:
    """A stage's progress in ``folder``, valid for runs of the same ``settings`` (a JSON-able dict);
    ``alone`` for a stage that rank 0 runs by itself (quantization) in a distributed run."""

    def __init__(self, folder: Path, settings: dict, alone: bool = False):
        self.folder, self.settings = Path(folder), settings
        self.rank, self.ranks = (0, 1) if alone else world()

    def _activations(self, block: int) -> Path:
        return self.folder / f"activations-rank{self.rank}-block{block}.safetensors"

    def _mine(self) -> list[int]:
        """The blocks whose leaving activations this rank kept, in order."""
        prefix = f"activations-rank{self.rank}-block"
        return sorted(int(f.name[len(prefix):-len(".safetensors")]) for f in self.folder.glob(f"{prefix}*.safetensors"))

    def restore(self) -> tuple[int, dict, dict[int, torch.Tensor]]:
        """Where to start: the first block not done on every rank, what the stage recorded of the
        blocks before it, and this rank's activations entering it ({} at block 0). A record of
        other settings or another number of ranks is cleared, and the stage starts over."""
        self.folder.mkdir(parents=True, exist_ok=True)
        record = None
        if self.rank == 0 and (self.folder / PROGRESS).is_file():
            saved = json.loads((self.folder / PROGRESS).read_text())
            if saved.get("settings") == self.settings and saved.get("ranks") == self.ranks:
                record = saved
        record = agree(record) if self.ranks > 1 else record
        mine = self._mine()
        if record is None:
            for block in mine:
                self._activations(block).unlink()
            return 0, {}, {}
        start = min(record["blocks"], (mine[-1] + 1) if mine else 0)
        starts = [start] * self.ranks
        if self.ranks > 1:
            torch.distributed.all_gather_object(starts, start)
        start = min(starts)
        if start == 0 or start - 1 not in mine:
            return 0, {}, {}
        from safetensors.torch import load_file

        activations = {int(c): t for c, t in load_file(str(self._activations(start - 1))).items()}
        return start, record["kept"], activations

    def save(self, block: int, kept: dict, activations: dict[int, torch.Tensor]) -> None:
        """Record that ``block`` is done: this rank's activations leaving it, and on rank 0 what
        the stage keeps of the blocks so far (after it put their tensors)."""
        from safetensors.torch import save_file

        with atomic_path(self._activations(block)) as tmp:
            save_file({str(c): t.contiguous() for c, t in activations.items()}, str(tmp))
        for old in self._mine():
            if old < block - 1:
                self._activations(old).unlink()
        if self.rank == 0:
            write_text(self.folder / PROGRESS, json.dumps({"settings": self.settings, "ranks": self.ranks,
                                                           "blocks": block + 1, "kept": kept}))
