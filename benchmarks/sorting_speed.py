"""Wall time of the sorting stage on SmolLM2-135M, against a Nyström-style (MoDeGPT) selection.

Both run on the same calibration statistics, block by block, side by side in one process:
- elastiq's sort (``sort_block``): one ordering per group serves every rate.
- MoDeGPT's Nyström MLP compression needs, for every rate's width k, the top-k ridge-leverage
  channels S and the reconstruction W_down C[:, S] C[S, S]^+ (a pseudo-inverse per rate and block).
  Only this MLP part is timed, so the ratio is a lower bound on Nyström's whole cost (its Q/K and
  V/O steps are per rate too).
The median over ``--repeats`` runs of each is reported. Writes benchmarks/results/sorting_speed.{json,md}.

    python benchmarks/sorting_speed.py
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from elastiq.atomic import write_text
from elastiq.checkpoint import MLP
from elastiq.compressor.adapters import adapter_for
from elastiq.compressor.calibrate import C4_SAMPLE, calibrate, calibration_samples
from elastiq.compressor.compress import DEFAULT_RATES
from elastiq.compressor.intake import load_model
from elastiq.compressor.sort import ridge_leverage, sort_block
from elastiq.paths import data_dir

RESULTS = Path(__file__).resolve().parent / "results"


def nystrom_mlp(c: torch.Tensor, w_down: torch.Tensor, widths: list[int], ridge: float = 1.0) -> list[torch.Tensor]:
    """MoDeGPT type-I: for each width k, keep the top-k leverage channels S and fold the rest into
    W_down C[:, S] C[S, S]^+ (returns the compressed down projections)."""
    scores = ridge_leverage(c, ridge)
    out = []
    for k in widths:
        s = scores.topk(k).indices
        out.append(w_down.double() @ c[:, s] @ torch.linalg.pinv(c[s][:, s]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(RESULTS / "sorting_speed.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    loaded = load_model("smollm2-135m")
    adapter = adapter_for(loaded.model)
    samples = calibration_samples(loaded.tokenizer, data_dir() / C4_SAMPLE, args.calib_samples, args.calib_seqlen)
    widths = [int(round((1 - r) * loaded.model.config.intermediate_size / 32)) * 32 for r in DEFAULT_RATES if r > 0]
    ours, theirs = [], []
    for index, stats in calibrate(adapter, samples):
        groups = adapter.groups(index)
        mlp = next(g for g in groups if g.kind == MLP)
        w_down = loaded.model.get_parameter(mlp.members[2][0]).data.clone()
        t_ours, t_theirs = [], []
        for _ in range(args.repeats):
            model_copy = copy.deepcopy(adapter.layers[index])  # sort a copy: the next block's inputs stay valid
            block_adapter = _BlockView(index, model_copy)
            t = time.perf_counter()
            sort_block(block_adapter, groups, adapter.heads, stats)
            t_ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            nystrom_mlp(stats.mlp, w_down, widths)
            t_theirs.append(time.perf_counter() - t)
        ours.append(statistics.median(t_ours))
        theirs.append(statistics.median(t_theirs))
    result = {
        "model": "smollm2-135m", "blocks": len(ours), "rates": [r for r in DEFAULT_RATES if r > 0],
        "mlp_widths": widths, "calib_samples": args.calib_samples, "calib_seqlen": args.calib_seqlen,
        "repeats": args.repeats, "threads": torch.get_num_threads(),
        "elastiq_sort_seconds": sum(ours), "nystrom_mlp_seconds": sum(theirs),
        "ratio_nystrom_over_elastiq": sum(theirs) / sum(ours),
        "per_block": {"elastiq": ours, "nystrom_mlp": theirs},
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
    }
    out = Path(args.output)
    write_text(out, json.dumps(result, indent=2) + "\n")
    table = ("| stage | seconds (all blocks, median of repeats) |\n|---|---|\n"
             f"| elastiq sort (MLP leverage + Q/K pairs + V/O SVD, all rates at once) | {sum(ours):.2f} |\n"
             f"| Nyström MLP only (leverage + pinv reconstruction per rate, {len(widths)} rates) | {sum(theirs):.2f} |\n"
             f"| ratio Nyström MLP / elastiq full sort | {sum(theirs) / sum(ours):.2f}x |\n")
    write_text(out.with_suffix(".md"), f"Command: `{result['command']}`\n\n{table}")
    print(table)


class _BlockView:
    """Just enough of a model for ``sort_block``: parameter lookup by full name inside one copied block."""

    def __init__(self, index: int, block: torch.nn.Module):
        self.prefix = f"model.layers.{index}."
        self.block = block

    def get_parameter(self, name: str) -> torch.nn.Parameter:
        return self.block.get_parameter(name.removeprefix(self.prefix))


if __name__ == "__main__":
    main()
