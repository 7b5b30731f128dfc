"""--backend auto: every installed backend is measured once per checkpoint, rate and machine; the
fastest decoder of the least-pruned rate runs, and later runs choose from what was remembered."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

from elastiq import ElastiqError
from elastiq.checkpoint import Checkpoint
from elastiq.cli import main
from elastiq.compressor.compress import CompressOptions, compress
from elastiq.compressor.quantize import QuantizeOptions, quantize_checkpoint
from elastiq.paths import cache_dir
from elastiq.runtime import fastest
from elastiq.runtime.backends import BACKENDS
from elastiq.runtime.fastest import SPEEDS_FILE, choose_backend, speed_key
from conftest import context_dependent

pytest.importorskip("llama_cpp")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def ckpt(tokenizer, data_dir, tmp_path_factory) -> Checkpoint:
    """A tiny 4-bit (RTN) nested checkpoint with rates 0, 0.15 and 0.35."""
    root = tmp_path_factory.mktemp("fastest")
    context_dependent("llama", tokenizer, root / "src")
    options = CompressOptions(rates=(0.15, 0.35), calib_samples=4, calib_seqlen=32, quality_windows=0)
    float_path = compress(root / "src", root / "f.elastiq", options, data=data_dir, progress=False)
    return Checkpoint(quantize_checkpoint(float_path, root / "q.elastiq",
                                          QuantizeOptions(method="rtn", quality_windows=0), data=data_dir,
                                          progress=False))


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """An empty cache for the test, so that nothing is remembered from another test."""
    monkeypatch.setenv("ELASTIQ_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _choose(ckpt: Checkpoint, logs: list[str], rate: float | None = None, threads: int | None = None):
    return choose_backend(ckpt, rate, 64, torch.bfloat16, True, threads or torch.get_num_threads(),
                          tokenizer=ckpt.tokenizer(), log=logs.append)


def test_auto_measures_each_backend_once_then_remembers(ckpt, own_cache, monkeypatch):
    logs = []
    choice = _choose(ckpt, logs)
    assert choice.plan.rate == 0.0  # every backend fits the free memory at rate 0
    assert set(choice.speeds) == set(BACKENDS) and all(s.decode_tok_s > 0 for s in choice.speeds.values())
    assert choice.backend == max(choice.speeds, key=lambda name: choice.speeds[name].decode_tok_s)
    assert len(logs) == 1 and "measuring how fast torch, llama.cpp, onnxruntime decode rate 0.0" in logs[0]
    assert f"{choice.backend}: the fastest decoder of rate 0.0 here" in choice.reason and "measured now" in choice.reason
    remembered = json.loads((own_cache / SPEEDS_FILE).read_text())
    threads = torch.get_num_threads()
    assert {speed_key(ckpt, 0.0, name, threads, torch.bfloat16) for name in BACKENDS} == set(remembered)
    # a second run measures nothing: it opens no engine and picks from what was remembered
    monkeypatch.setattr(fastest, "open_engine", lambda *a, **k: pytest.fail("a remembered speed was measured again"))
    logs.clear()
    again = _choose(ckpt, logs)
    assert logs == [] and again.backend == choice.backend and again.speeds == choice.speeds
    assert re.search(r"measured \d{4}-\d\d-\d\d, remembered in .*backend-speeds.json", again.reason)


def test_the_remembered_speeds_decide_and_another_thread_count_measures_again(ckpt, own_cache):
    threads = torch.get_num_threads()
    records = {"torch": 50.0, "llama.cpp": 40.0, "onnxruntime": 400.0}
    own_cache.mkdir(parents=True)
    (own_cache / SPEEDS_FILE).write_text(json.dumps({
        speed_key(ckpt, 0.35, name, threads, torch.bfloat16):
            {"decode_tok_s": tok_s, "prefill_tok_s": 1000.0, "measured": "2026-01-02"}
        for name, tok_s in records.items()}))
    logs = []
    choice = _choose(ckpt, logs, rate=0.35)
    assert logs == [] and choice.backend == "onnxruntime" and choice.plan.rate == 0.35
    assert "onnxruntime 400 tok/s, torch 50 tok/s, llama.cpp 40 tok/s; measured 2026-01-02" in choice.reason
    gone = {"backend": "torch", "checkpoint": str(own_cache / "deleted.elastiq"), "decode_tok_s": 9.0,
            "prefill_tok_s": 9.0, "measured": "2026-01-01"}
    (own_cache / SPEEDS_FILE).write_text(json.dumps({**json.loads((own_cache / SPEEDS_FILE).read_text()),
                                                     "0123456789abcdef": gone}))
    other = _choose(ckpt, logs, rate=0.35, threads=threads + 1)  # another machine set-up: its own figures
    assert len(logs) == 1 and "measuring" in logs[0] and other.speeds["onnxruntime"].decode_tok_s != 400.0
    remembered = json.loads((own_cache / SPEEDS_FILE).read_text())
    assert len(remembered) == 6 and "0123456789abcdef" not in remembered  # a deleted checkpoint's figures go


def test_a_backend_that_is_not_installed_is_left_out_with_its_reason(ckpt, own_cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails, as when not installed
    choice = _choose(ckpt, [], rate=0.15)
    assert set(choice.speeds) == {"torch", "llama.cpp"} and choice.plan.rate == 0.15
    assert "onnxruntime cannot run (the onnxruntime backend needs the Python package onnxruntime" in choice.reason


def test_run_says_which_backend_auto_chose(ckpt, own_cache, capsys):
    path = str(ckpt.path)
    assert main(["run", path, "--prompt", "Hello", "--max-new-tokens", "4", "--ctx", "64"]) == 0
    err = capsys.readouterr().err
    chosen = re.search(r"--backend auto chose (\S+): the fastest decoder of rate 0.0 here", err).group(1)
    assert chosen in BACKENDS and "measuring how fast" in err and "loaded rate 0.0" in err
    size = r"of its \S+ export" if chosen != "torch" else r"of \d+\.\d MB"  # what was read, out of what
    assert re.search(rf"loaded rate 0.0 in \d+\.\d s, reading \d+\.\d MB {size}; ", err), err
    assert main(["run", path, "--prompt", "Hello", "--max-new-tokens", "4", "--ctx", "64"]) == 0
    err = capsys.readouterr().err
    assert f"--backend auto chose {chosen}:" in err and "measuring" not in err
    assert main(["run", path, "--prompt", "Hello", "--max-new-tokens", "4", "--ctx", "64", "--dtype", "bfloat16"]) == 0
    err = capsys.readouterr().err
    assert "--dtype bfloat16 is the torch backend's: running on torch" in err and "auto chose" not in err
    assert (cache_dir() / SPEEDS_FILE).is_file()


def test_when_no_backend_can_run_the_reason_is_said_once(ckpt, own_cache):
    with pytest.raises(ElastiqError) as refused:
        _choose(ckpt, [], rate=0.2)
    assert str(refused.value).startswith("rate 0.2 is not offered") and str(refused.value).count("0.2") == 1
    with pytest.raises(ElastiqError) as refused:
        choose_backend(ckpt, None, 64, torch.bfloat16, True, 1, memory_budget=2**20, tokenizer=ckpt.tokenizer())
    # each backend's footprint is mostly the process's baseline, which grows as backends are imported:
    # the three refusals are said once when they are equal, else one by one
    message = str(refused.value)
    if message.count("no offered rate fits the budget of 1 MiB") == 1:
        assert message.startswith("no offered rate fits the budget of 1 MiB")
    else:
        assert re.match(r"no backend can run this checkpoint here: torch: no offered rate fits the budget of 1 MiB "
                        r".*; llama\.cpp: no offered rate fits .*; onnxruntime: no offered rate fits ", message)


def test_an_update_of_the_cpu_kernels_measures_torch_again(ckpt, monkeypatch):
    """The torch backend's remembered speed is keyed by the build of elastiq's CPU ops (their
    source): an update that changes them is measured again; the other backends' keys stay."""
    assert fastest.q4_path("cpu") == "cpu", "elastiq's CPU ops did not build here"
    threads = torch.get_num_threads()
    before = {name: speed_key(ckpt, 0.0, name, threads, torch.bfloat16) for name in BACKENDS}
    monkeypatch.setattr(fastest, "build_name", lambda: "elastiq_cpu_ops_updated")
    after = {name: speed_key(ckpt, 0.0, name, threads, torch.bfloat16) for name in BACKENDS}
    assert after["torch"] != before["torch"]
    assert all(after[name] == before[name] for name in BACKENDS if name != "torch")
