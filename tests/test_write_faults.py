"""Faults while writing: a full disk, kill -9 or Ctrl-C during a command that writes leaves nothing
under its output's name and says what happened, and the next run cleans up and succeeds (compress
keeps the work it resumes from in its work folder).

The CLI runs in child processes. To import torch once for many commands, a driver runs several
``elastiq.cli.main`` calls in one child and reports each one's exit status and stderr. A file-size
limit (RLIMIT_FSIZE; Python ignores SIGXFSZ, so a write past it fails with EFBIG) stands in for a
full disk. An audit hook in the child counts the file-system writes (opens for writing, renames,
removals, mkdir, chmod) under the output's folder and sends a signal to its own process at the k-th
(k drawn from a seeded generator) or, for kill -9, just before the rename into place at the latest.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from elastiq.checkpoint import WEIGHTS
from elastiq.cli import main

KIB = 1024
LIMIT = 64 * KIB  # below every output's largest file (the tiny model's weights: 100-680 kB)
RECOVER_LIMIT = 128 * KIB  # above the LoRA state (96 kB), below the optimizer state (215 kB)
CALIB = ["--calib-samples", "4", "--calib-seqlen", "32"]
# compress: the float checkpoint the other commands read (kind weights named: the children, whose
# runs a run in this process resumes, do not get the tests' default of conftest)
FLOAT = ["--no-recover", "--no-quantize", "--kind-weights", "none"]
RECOVER = ["--steps", "3", "--save-every", "1", "--batch", "1", "--seqlen", "16", "--samples", "2", "--bf16", "off"]

DRIVER = r"""
import json, os, resource, signal, sys, traceback
from contextlib import redirect_stderr
from io import StringIO

from elastiq.cli import main

# A child inherits its parent's blocked signals and ignored ones (a native library in the pytest
# process may block SIGINT on its main thread; a shell's background job ignores it): undo both, so
# that the Ctrl-C this driver sends itself raises KeyboardInterrupt whatever ran before.
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
signal.signal(signal.SIGINT, signal.default_int_handler)

EVENTS = {"open", "os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.chmod"}
fault, count = None, 0  # [signal, folder, final path or None, k]


def writing(event, args):
    if event != "open":
        return True
    mode, flags = args[1], args[2]
    return bool(set(mode) & set("wax+")) if mode else bool(flags & (os.O_WRONLY | os.O_RDWR))


def hook(event, args):
    global fault, count
    if fault is None or event not in EVENTS or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    if not os.fsdecode(args[0]).startswith(fault[1] + os.sep) or not writing(event, args):
        return
    count += 1
    if count == fault[3] or (event == "os.rename" and os.fsdecode(args[1]) == fault[2]):
        signum, fault = fault[0], None
        os.kill(os.getpid(), signum)


sys.addaudithook(hook)
results = []
for argv, limit, fault in json.loads(sys.argv[1]):
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY if limit is None else limit,
                                               resource.RLIM_INFINITY))
    count, err = 0, StringIO()
    with redirect_stderr(err):
        try:
            status = main(argv)
        except Exception:  # what main let through, for the test to show
            traceback.print_exc()
            status = None
    fault = None
    results.append([status, err.getvalue()])
print(json.dumps(results))
"""


def _child(scenarios: list, cwd: Path) -> subprocess.CompletedProcess:
    """The driver run on [argv, file-size limit or None, fault or None] per command, in ``cwd``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ELASTIQ_CACHE": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-c", DRIVER, json.dumps(scenarios)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def _drive(scenarios: list, cwd: Path) -> list[tuple[int, str]]:
    """Each command's (exit status, stderr), from one child that ran them all."""
    proc = _child(scenarios, cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [tuple(r) for r in json.loads(proc.stdout.splitlines()[-1])]


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "elastiq: error:" in line]


def _commands(src: Path, ckpt: Path, folder: Path) -> dict[str, tuple[list[str], Path]]:
    """Each writing command (run: into the cache) as (argv, the output it writes under ``folder``)."""
    c, q, r = folder / "c.elastiq", folder / "q.elastiq", folder / "r.elastiq"
    exports = {fmt: (["export", str(ckpt), "--rate", "0.35", "--format", fmt, "-o", str(folder / name)],
                     folder / name) for fmt, name in (("gguf", "e.gguf"), ("onnx", "e.onnx"), ("hf", "hf"))}
    return {"compress": (["compress", str(src), "-o", str(c), "--rates", "0.35", *CALIB, "--quality-windows", "1", *FLOAT], c),
            "quantize": (["quantize", str(ckpt), "-o", str(q), *CALIB, "--quality-windows", "1"], q),
            "recover": (["recover", str(ckpt), "-o", str(r), *RECOVER], r),
            **exports,
            "run": (["run", str(src), "-p", "hi", "--max-new-tokens", "1", "--ctx", "64"], folder)}


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _outside_work(folder: Path, output: Path) -> list[str]:
    """What ``folder`` holds besides ``compress``'s work folder, which a stopped compression keeps
    to resume from (``NAME.elastiq.stages``, its sorting stage's blocks in ``sorting/``)."""
    work = output.name + ".stages"
    assert (folder / work / "sorting").is_dir(), _listing(folder)
    return [p for p in _listing(folder) if p != work and not p.startswith(work + "/")]


@pytest.fixture(scope="module")
def src(models) -> Path:
    return models["llama"][0]


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory) -> Path:
    """An uninterrupted ``elastiq compress`` (the float checkpoint the other commands read)."""
    out = tmp_path_factory.mktemp("reference") / "c.elastiq"
    assert main(["compress", str(src), "-o", str(out), "--rates", "0.35", *CALIB, "--quality-windows", "1", *FLOAT]) == 0
    return out


FULL = ("compress", "quantize", "recover", "gguf", "onnx", "hf", "run")
# The writes a Ctrl-C is drawn among: once the temporary is made, before the rename into place (for
# recover, in its second state save, so that the first one is kept; for run, the cache's float checkpoint).
INTERRUPTED = {"compress": (2, 25), "recover": (10, 18), "onnx": (2, 2), "hf": (2, 8), "run": (3, 20)}


@pytest.fixture(scope="module")
def driven(src, reference, tmp_path_factory):
    """Every writing command on a full disk, and some interrupted (SIGINT) at a seeded random
    write, in one child process: {(fault, command): (status, stderr, output, folder)}."""
    root = tmp_path_factory.mktemp("driven")
    rng = random.Random(18)
    cases, scenarios = [], []
    for fault, names in (("full", FULL), ("sigint", INTERRUPTED)):
        for name in names:
            folder = root / f"{fault}-{name}"
            folder.mkdir()
            argv, output = _commands(src, reference, folder)[name]
            watched = root / "cache" / "checkpoints" if name == "run" else folder
            limit = (RECOVER_LIMIT if name == "recover" else LIMIT) if fault == "full" else None
            interrupt = [signal.SIGINT, str(watched), None, rng.randint(*INTERRUPTED[name])] \
                if fault == "sigint" else None
            cases.append((fault, name, output, folder))
            scenarios.append([argv, limit, interrupt])
    results = _drive(scenarios, root)
    return root, {(fault, name): (*result, output, folder)
                  for (fault, name, output, folder), result in zip(cases, results)}


@pytest.mark.parametrize("name", FULL)
def test_a_full_disk_leaves_nothing_and_says_so(name, driven):
    root, results = driven
    status, stderr, output, folder = results["full", name]
    assert status == 2, stderr[-2000:]
    assert "Traceback" not in stderr and len(_error_lines(stderr)) == 1, stderr[-2000:]
    if name == "run":  # the cache's first stage, the float checkpoint, is what runs out of room
        cache = root / "cache" / "checkpoints"
        assert f"elastiq: error: cannot write {cache}/" in stderr
        assert [p.suffix for p in cache.iterdir()] == [".lock"]  # no checkpoint, no float intermediate
    else:
        written = output.with_name(output.name + ".state") if name == "recover" else output
        assert f"elastiq: error: cannot write {written}: file size limit exceeded; nothing was written under " \
               "that name" in stderr, stderr[-2000:]
        assert (_outside_work(folder, output) if name == "compress" else _listing(folder)) == []
    assert "file size limit exceeded; nothing was written under that name" in stderr


@pytest.mark.parametrize("name", INTERRUPTED)
def test_ctrl_c_while_writing_leaves_nothing_and_says_so(name, driven):
    root, results = driven
    status, stderr, output, folder = results["sigint", name]
    assert status == 130, stderr[-2000:]
    if name == "run":
        cache = root / "cache" / "checkpoints"
        assert f"elastiq: interrupted; nothing was written to {cache}/" in stderr, stderr[-2000:]
        assert "the next run compresses" in stderr
        assert [p.suffix for p in cache.iterdir()] == [".lock"]
        return
    assert f"elastiq: interrupted; nothing was written to {output}" in stderr, stderr[-2000:]
    if name == "recover":  # the state saved before the interrupted write is kept, and said so
        assert f"the recovery state saved in {output}.state is kept, and the same command resumes" in stderr
        assert _listing(folder) == sorted(["r.elastiq.state", *(f"r.elastiq.state/{f}" for f in
                                            ("optimizer.pt", "state.json", "state.safetensors"))])
    elif name == "compress":  # the sorting stage's finished blocks are kept, and the rerun resumes
        assert f"the finished stages in {output}.stages are kept, and the same command resumes" in stderr
        assert _outside_work(folder, output) == []
    else:
        assert _listing(folder) == []


@pytest.mark.parametrize("name,seed", [("compress", 1), ("recover", 8), ("gguf", 3), ("hf", 4)])
def test_kill_9_while_writing_then_the_rerun_cleans_up_and_matches(name, seed, src, reference, tmp_path):
    """kill -9 at the k-th write (k in 1..40, seeded) or just before the rename into place: nothing
    under the output's name, the dead writer's temporaries beside it; the rerun removes them
    (recover resumes from its state) and writes what an uninterrupted run writes."""
    killed = tmp_path / "killed"
    killed.mkdir()
    argv, output = _commands(src, reference, killed)[name]
    k = random.Random(seed).randint(1, 40)
    proc = _child([[argv, None, [signal.SIGKILL, str(killed), str(output), k]]], tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    # the dead writer's temporaries beside the output, or the work compress resumes from
    assert not output.exists() and any(p.name.startswith(f".{output.name}.") or p.name == f"{output.name}.stages"
                                       for p in killed.iterdir())
    if name == "recover":  # killed in its second state save: the first is there to resume from
        assert (killed / "r.elastiq.state" / "state.json").is_file()
    assert main(argv) == 0
    want = reference  # the same command, uninterrupted
    if name != "compress":
        want_argv, want = _commands(src, reference, tmp_path / "whole")[name]
        assert main(want_argv) == 0
    assert _listing(killed) == _listing(want.parent)  # the output alone: no temporaries, no recovery state
    if output.suffix == ".elastiq":  # deterministic writers: the checkpoint's weights, every export file
        files = [WEIGHTS]
    else:
        files = [p.name for p in want.iterdir()] if want.is_dir() else [""]
    for f in files:
        assert (output / f).read_bytes() == (want / f).read_bytes(), f


@pytest.mark.parametrize("name", ["compress", "quantize"])
def test_a_checkpoint_is_measured_before_it_takes_its_name(name, src, reference, tmp_path, monkeypatch, capsys):
    """The quality of each rate is measured on the written checkpoint: until it is recorded, the
    checkpoint has its temporary name, so a stop then leaves no checkpoint without quality."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(f"elastiq.compressor.{name}"), "rate_quality", interrupted)
    argv, output = _commands(src, reference, tmp_path)[name]
    assert main(argv) == 130
    assert f"elastiq: interrupted; nothing was written to {output}" in capsys.readouterr().err
    assert (_outside_work(tmp_path, output) if name == "compress" else _listing(tmp_path)) == []


def test_the_next_write_removes_only_dead_writers_temporaries(tmp_path):
    """A temporary whose writer is gone is removed, and a folder it had moved aside to replace it
    is put back; a live writer's temporary (here this process's) is left alone."""
    from elastiq.atomic import atomic_path

    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / f".x.bin.{gone.pid}.abcd1234.partial").write_text("half")
    live = tmp_path / f".x.bin.{os.getpid()}.abcd1234.partial"
    live.write_text("being written")
    aside = tmp_path / f".y.{gone.pid}.abcd1234.old" / "y"
    aside.mkdir(parents=True)
    (aside / "old.txt").write_text("old")
    with atomic_path(tmp_path / "x.bin") as tmp:
        tmp.write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "x.bin", aside.parent.name])
    with atomic_path(tmp_path / "y", directory=True) as tmp:
        assert (tmp_path / "y" / "old.txt").read_text() == "old"  # put back before it is replaced
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "x.bin", "y"])
    assert [p.name for p in (tmp_path / "y").iterdir()] == ["new.txt"]
