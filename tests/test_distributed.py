"""Compression on two ranks (torchrun, gloo, on the CPU) writes the one-process checkpoint, bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from elastiq.checkpoint import WEIGHTS, Checkpoint
from elastiq.cli import main

# 10 windows in chunks of 4: three chunks, so rank 1 runs a smaller last chunk in round 0's
# company and sits out round 1.
ARGS = ["--rates", "0.15,0.25", "--calib-samples", "10", "--calib-seqlen", "32", "--quality-windows", "2",
        "--no-recover"]


def _torchrun(*args: str, cwd, ranks: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               "-m", "elastiq", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("quantize", [False, True], ids=["sorted", "quantized"])
def test_two_ranks_write_the_one_process_checkpoint(quantize, models, tmp_path):
    src, _ = models["llama"]
    extra = [] if quantize else ["--no-quantize"]
    one, two = tmp_path / "one.elastiq", tmp_path / "two.elastiq"
    main(["compress", str(src), "-o", str(one), *ARGS, *extra])
    done = _torchrun("compress", str(src), "-o", str(two), *ARGS, *extra, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = Checkpoint(one), Checkpoint(two)
    assert a.manifest["source"]["block_influence"] == b.manifest["source"]["block_influence"]
    assert a.manifest["tensors"] == b.manifest["tensors"]
    assert a.manifest["rates"] == b.manifest["rates"]  # the quality measured on rank 0, too
    assert (one / WEIGHTS).read_bytes() == (two / WEIGHTS).read_bytes()
    assert done.stderr.count("elastiq: wrote") == 1  # rank 0 reports, rank 1 is quiet
    assert not (tmp_path / "two.elastiq.stages").exists()


def test_three_ranks_and_a_mamba2_model(tokenizer, tmp_path):
    """Three ranks pass the running sums along the whole ring (0 -> 1 -> 2 -> 0); a Mamba2
    model's statistics are its mixers' inputs, concatenated in chunk order."""
    from test_mamba2 import build_mamba2

    src = tmp_path / "mamba2"
    build_mamba2(len(tokenizer)).save_pretrained(src)
    tokenizer.save_pretrained(src)
    args = ["--rates", "0.25", "--calib-samples", "10", "--calib-seqlen", "40", "--quality-windows", "0",
            "--no-recover", "--no-quantize"]
    one, three = tmp_path / "one.elastiq", tmp_path / "three.elastiq"
    main(["compress", str(src), "-o", str(one), *args])
    done = _torchrun("compress", str(src), "-o", str(three), *args, cwd=tmp_path, ranks=3)
    assert done.returncode == 0, done.stderr[-3000:]
    assert Checkpoint(one).manifest["tensors"] == Checkpoint(three).manifest["tensors"]
    assert (one / WEIGHTS).read_bytes() == (three / WEIGHTS).read_bytes()


def test_recovery_on_two_ranks_trains_and_merges(models, tmp_path):
    """Data-parallel recovery: two ranks, each on half of every step's batch, with averaged LoRA
    gradients, merge the weights one process merges from the whole batch (up to float sums)."""
    src, _ = models["llama"]
    args = ["--rates", "0.35", "--calib-samples", "4", "--calib-seqlen", "32", "--quality-windows", "0",
            "--recover-steps", "3", "--no-quantize"]
    one, two, plain = (tmp_path / f"{n}.elastiq" for n in ("one", "two", "plain"))
    main(["compress", str(src), "-o", str(one), *args])
    main(["compress", str(src), "-o", str(plain), *args[:-3], "--no-recover", "--no-quantize"])
    done = _torchrun("compress", str(src), "-o", str(two), *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b, p = (Checkpoint(x).read_rate(0.0) for x in (one, two, plain))
    trained = [n for n in a if n.endswith("q_proj.weight")]
    for name in trained:  # Adam's steps magnify float-sum differences in near-zero gradients: compare norms
        change, apart = (a[name] - p[name]).norm(), (a[name] - b[name]).norm()
        assert change > 0 and apart < 0.02 * change, (name, float(apart / change))
    assert Checkpoint(two).manifest["source"]["recovery"]["steps"] == 3
