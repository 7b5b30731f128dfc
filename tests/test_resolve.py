"""First runs: a model is compressed into the cache once, even when two processes (two runs, two
servers) ask at once."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_servers_started_at_once_on_an_empty_cache_both_answer(tiny_dirs, tmp_path):
    """Two `elastiq serve MODEL` on an empty cache: one compresses, the other waits on the lock,
    and both then serve the one cached checkpoint."""
    import httpx

    env = {**os.environ, "ELASTIQ_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    ports = [_free_port(), _free_port()]
    procs = [subprocess.Popen([sys.executable, "-m", "elastiq", "serve", str(tiny_dirs["llama"]), "--port", str(port),
                               "--ctx", "64", "--max-new-tokens", "3", "--max-kl", "inf"], env=env, cwd=tmp_path,
                              stderr=subprocess.PIPE, text=True) for port in ports]
    try:
        answers, deadline = {}, time.monotonic() + 600
        while len(answers) < 2:
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, \
                [p.stderr.read()[-2000:] for p in procs if p.poll() is not None]
            for port in set(ports) - set(answers):
                try:
                    answers[port] = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                                               json={"prompt": "The capital of France is", "max_tokens": 3}).json()
                except httpx.TransportError:
                    time.sleep(0.5)
        assert all(a["usage"]["completion_tokens"] >= 1 for a in answers.values())
        assert len({a["choices"][0]["text"] for a in answers.values()}) == 1  # one checkpoint, greedy
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        logs = [p.communicate(timeout=60)[1] for p in procs]
    assert sum("compressing it once" in log for log in logs) == 1
    assert sum("another elastiq process is compressing" in log for log in logs) == 1, logs
    assert all("Traceback" not in log for log in logs)
    # --backend auto measured once, under its lock, and both servers chose by the same figures
    chosen = [re.search(r"--backend auto chose (\S+):", log) for log in logs]
    assert all(chosen) and chosen[0][1] == chosen[1][1], logs
    assert sum("auto: measuring how fast" in log for log in logs) == 1, logs
    cached = sorted(p.name for p in (tmp_path / "cache" / "checkpoints").iterdir())
    # one checkpoint, its lock and the exports --backend auto measured, nothing half-written
    assert cached == [cached[0], cached[0] + ".exports", cached[0] + ".lock"], cached


def test_a_build_with_other_defaults_is_not_taken_for_todays(tmp_path, monkeypatch):
    """The cache key holds the build's default options: when quantization's defaults change (as
    8-bit value projections did), the old cached checkpoint is another build, and it is named as
    one of the other builds of that model, not used."""
    from dataclasses import dataclass, field

    from elastiq.compressor import pipeline, quantize
    from elastiq.runtime import resolve

    monkeypatch.setenv("ELASTIQ_CACHE", str(tmp_path / "cache"))
    today = resolve.cached_checkpoint_path("smollm2-135m")
    assert resolve.cached_checkpoint_path("smollm2-135m") == today

    @dataclass
    class AllFourBit(quantize.QuantizeOptions):
        q8: tuple[str, ...] = ()

    @dataclass
    class EarlierDefaults(pipeline.PipelineOptions):
        quantize: quantize.QuantizeOptions | None = field(default_factory=AllFourBit)

    monkeypatch.setattr(pipeline, "PipelineOptions", EarlierDefaults)
    older = resolve.cached_checkpoint_path("smollm2-135m")
    assert older != today and older.parent == today.parent
    assert older.name.startswith("smollm2-135m-") and older.name.endswith("-q4.elastiq")

    for path in (older, today.with_name("smollm2-135m-instruct-0123456789-q4.elastiq")):
        path.mkdir(parents=True)
        (path / "manifest.json").write_text("{}")
    (today.parent / "smollm2-135m-abcdef0123-q4.elastiq").mkdir()  # unfinished: no manifest
    assert resolve.other_builds(today) == [older]
