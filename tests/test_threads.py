"""Threads: a run uses the cores the process may use (affinity, cgroup v1/v2 CPU quota), or
--threads, on every backend."""

from __future__ import annotations

import os

import pytest
import torch

from elastiq.cli import main
from elastiq.compressor.compress import CompressOptions, compress
from elastiq.runtime.threads import usable_cores


@pytest.fixture
def eight_cpus(monkeypatch):
    """An affinity of 8 CPUs, so that a quota below it is what bounds the count."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)


@pytest.fixture
def torch_threads():
    """Restore torch's thread count after a test that sets it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _tree(tmp_path, proc: str, files: dict[str, str]):
    """A fake /sys/fs/cgroup holding ``files`` and a /proc/self/cgroup reading ``proc``."""
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "proc-cgroup").write_text(proc)
    return {"cgroup_root": root, "proc_cgroup": tmp_path / "proc-cgroup"}


def test_cgroup_v2_quota_rounds_up_to_whole_cores(tmp_path, eight_cpus):
    tree = _tree(tmp_path, "0::/app.slice/run.scope\n", {"app.slice/run.scope/cpu.max": "150000 100000\n"})
    cores, source = usable_cores(**tree)
    assert cores == 2 and "cgroup v2 CPU quota 150000/100000" in source and "run.scope" in source
    # a parent's quota bounds its children; the root's files stand in for an unmounted path
    tree = _tree(tmp_path, "0::/app.slice/run.scope\n", {"app.slice/run.scope/cpu.max": "max 100000\n",
                                                         "app.slice/cpu.max": "50000 100000\n"})
    assert usable_cores(**tree)[0] == 1
    assert usable_cores(**_tree(tmp_path / "r", "0::/elsewhere\n", {"cpu.max": "300000 100000"}))[0] == 3


def test_no_quota_leaves_the_affinity(tmp_path, eight_cpus):
    assert usable_cores(**_tree(tmp_path / "v2", "0::/\n", {"cpu.max": "max 100000\n"})) == (8, "CPU affinity")
    v1 = {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}
    assert usable_cores(**_tree(tmp_path / "v1", "4:memory:/\n1:cpu,cpuacct:/\n0::/\n", v1)) == (8, "CPU affinity")
    assert usable_cores(tmp_path / "none", tmp_path / "missing") == (8, "CPU affinity")


def test_cgroup_v1_quota(tmp_path, eight_cpus):
    proc = "4:memory:/job\n1:cpu,cpuacct:/job\n0::/\n"  # a hybrid host: v1 controllers, an empty v2 tree
    v1 = {"cpu/job/cpu.cfs_quota_us": "150000\n", "cpu/job/cpu.cfs_period_us": "100000\n"}
    cores, source = usable_cores(**_tree(tmp_path, proc, v1))
    assert cores == 2 and source.startswith("cgroup v1 CPU quota 150000/100000")
    # mounted under the controllers' joined name only; the root's files where the path is not mounted
    v1 = {"cpu,cpuacct/cpu.cfs_quota_us": "250000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}
    assert usable_cores(**_tree(tmp_path / "joined", proc, v1))[0] == 3


def test_the_smaller_affinity_wins(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert usable_cores(**_tree(tmp_path, "0::/\n", {"cpu.max": "400000 100000\n"})) == (1, "CPU affinity")


def test_without_affinity_the_cpu_count_stands_in(tmp_path, monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS, Windows
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert usable_cores(tmp_path / "none", tmp_path / "missing") == (4, "os.cpu_count()")
    v1 = {"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}
    assert usable_cores(**_tree(tmp_path, "1:cpu:/\n", v1))[0] == 1


def test_threads_must_be_positive(capsys):
    for command, value in (("run", "0"), ("chat", "-2"), ("serve", "two"), ("eval", "0")):
        with pytest.raises(SystemExit) as exit_:
            main([command, "x.elastiq", "--threads", value])
        assert exit_.value.code == 2
        assert (f"argument --threads: a thread count is a whole number, 1 or more (default: the cores this process "
                f"may use); got '{value}'") in capsys.readouterr().err


@pytest.fixture(scope="module")
def checkpoint(models, data_dir, tmp_path_factory):
    options = CompressOptions(rates=(0.35,), calib_samples=4, calib_seqlen=32, quality_windows=0)
    return compress(models["llama"][0], tmp_path_factory.mktemp("threads") / "t.elastiq", options, data=data_dir,
                    progress=False)


def test_run_uses_the_asked_threads_on_every_backend(checkpoint, torch_threads, monkeypatch, capsys):
    import llama_cpp
    import onnxruntime

    asked = []
    llama, session = llama_cpp.Llama, onnxruntime.InferenceSession

    def record_llama(*args, **kwargs):
        asked.append(("llama.cpp", kwargs["n_threads"], kwargs["n_threads_batch"]))
        return llama(*args, **kwargs)

    def record_session(path, options, **kwargs):
        asked.append(("onnxruntime", options.intra_op_num_threads))
        return session(path, options, **kwargs)

    monkeypatch.setattr(llama_cpp, "Llama", record_llama)
    monkeypatch.setattr(onnxruntime, "InferenceSession", record_session)
    common = [str(checkpoint), "--prompt", "Hello", "--max-new-tokens", "2", "--ctx", "64", "--rate", "0.35"]
    torch.set_num_threads(2)
    assert main(["run", *common, "--threads", "1", "--backend", "torch"]) == 0
    assert torch.get_num_threads() == 1
    assert "; 1 thread (--threads)" in capsys.readouterr().err
    for backend in ("llama.cpp", "onnxruntime"):
        assert main(["run", *common, "--threads", "1", "--backend", backend]) == 0
    assert asked == [("llama.cpp", 1, 1), ("onnxruntime", 1)]
    cores, source = usable_cores()
    assert main(["run", *common, "--threads", str(cores + 1), "--backend", "torch"]) == 0  # more than the usable cores: allowed, warned
    err = capsys.readouterr().err
    assert f"warning: --threads {cores + 1} is more than the {cores} cores this process may use ({source})" in err
    assert torch.get_num_threads() == cores + 1
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert main(["run", *common, "--backend", "torch"]) == 0
    assert torch.get_num_threads() == cores and f"; {cores} thread" in capsys.readouterr().err
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's setting stands when --threads is not given
    assert main(["run", *common, "--backend", "torch"]) == 0
    assert torch.get_num_threads() == 1 and "; 1 thread (OMP_NUM_THREADS)" in capsys.readouterr().err
