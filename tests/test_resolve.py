"""First runs: a model is compressed into the cache once, even when two processes ask at once."""

from __future__ import annotations

import os
import subprocess
import sys

from elastiq.checkpoint import Checkpoint

RESOLVE = ("import sys; from elastiq.runtime.resolve import resolve_checkpoint; "
           "print(resolve_checkpoint(sys.argv[1], log=lambda m: print(m, flush=True)))")


def test_two_first_runs_at_once_compress_once(tiny_dirs, tmp_path):
    """Two processes resolve the same model on an empty cache: one compresses, the other waits on
    the lock and then uses its result; both get the same complete checkpoint."""
    env = {**os.environ, "ELASTIQ_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    model = str(tiny_dirs["llama"])
    procs = [subprocess.Popen([sys.executable, "-c", RESOLVE, model], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=1200) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    logs = [out.splitlines() for out, _ in outs]
    assert sum("compressing it once" in line for lines in logs for line in lines) == 1
    assert sum("another elastiq process is compressing" in line for lines in logs for line in lines) == 1
    paths = {lines[-1] for lines in logs}
    assert len(paths) == 1
    ckpt = Checkpoint(paths.pop())
    assert ckpt.manifest["quantization"]["format"] == "q4_0"
    cached = sorted(p.name for p in (tmp_path / "cache" / "checkpoints").iterdir())
    assert cached == [ckpt.path.name, ckpt.path.name + ".lock"]  # no float intermediate, nothing half-written
