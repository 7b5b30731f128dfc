"""``--device``: which device a name asks for, clear refusals, and (on a machine with CUDA, marked
``cuda``) every compressor stage on the GPU computing what it computes on the CPU.

The refusal and choice tests stand in for the GPU with ``torch.cuda.is_available`` and
``device_count`` replaced (a test double: this machine has no GPU); the ``cuda`` tests run for real
where one is, and are skipped elsewhere."""

from __future__ import annotations

import pytest
import torch

from elastiq import ElastiqError
from elastiq.checkpoint import Checkpoint
from elastiq.cli import main
from elastiq.compressor.compress import CompressOptions, compress
from elastiq.compressor.devices import compute_device
from elastiq.compressor.pipeline import PipelineOptions, build
from elastiq.compressor.quantize import QuantizeOptions
from elastiq.compressor.recover import RecoverOptions
from elastiq.modeling.model import Transformer
from conftest import TEXT

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_cpu_and_auto_without_a_gpu(monkeypatch):
    _gpus(monkeypatch, 0)
    assert compute_device("cpu") == torch.device("cpu")
    assert compute_device("auto") == torch.device("cpu")


def test_each_rank_takes_its_local_gpu(monkeypatch):
    _gpus(monkeypatch, 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert compute_device("auto") == torch.device("cuda", 1)
    assert compute_device("cuda") == torch.device("cuda", 1)
    assert compute_device("cuda:0") == torch.device("cuda", 0)
    assert compute_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name, gpus, message", [
    ("tpu", 1, "'tpu' is not a device the compressor runs on; accepted: auto, cpu, cuda or cuda:N"),
    ("cuda:first", 1, "a GPU is named cuda:N"),
    ("cuda", 0, "this process sees no CUDA device"),
    ("cuda:3", 2, "GPU 3 asked for, this process sees 2 (cuda:0 .. cuda:1)"),
])
def test_bad_devices_are_refused_by_name(name, gpus, message, monkeypatch):
    _gpus(monkeypatch, gpus)
    with pytest.raises(ElastiqError, match="--device") as err:
        compute_device(name)
    assert message in str(err.value)


def test_too_many_ranks_for_the_gpus_are_refused(monkeypatch):
    _gpus(monkeypatch, 2)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ElastiqError, match="launch at most 2 ranks a node"):
        compute_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no GPU is")
@pytest.mark.parametrize("command", ["compress", "recover", "quantize"])
def test_the_cli_refuses_cuda_without_a_gpu_before_any_work(command, models, tmp_path, capsys):
    src, _ = models["llama"]
    source = [str(src), "--no-recover"]
    if command != "compress":  # recover and quantize read a checkpoint: give them one
        source = [str(compress(src, tmp_path / "f.elastiq", CompressOptions(rates=(0.25,), calib_samples=4,
                                                                           calib_seqlen=32, quality_windows=0),
                               progress=False))]
    assert main([command, *source, "-o", str(tmp_path / "out.elastiq"), "--device", "cuda"]) == 2
    assert "--device cuda: this process sees no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "out.elastiq").exists()


def test_a_gpu_run_is_checked_against_the_gpus_free_memory(models, data_dir, tmp_path, monkeypatch):
    _gpus(monkeypatch, 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 ** 20, 80 * 2 ** 30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Stand-in GPU")
    src, _ = models["llama"]
    with pytest.raises(ElastiqError, match=r"0\.0 GiB of memory is free \(torch\.cuda\.mem_get_info on Stand-in "
                                           r"GPU\): lower --calib-samples"):
        compress(src, tmp_path / "g.elastiq", CompressOptions(calib_samples=4, calib_seqlen=32, device="cuda"),
                 data=data_dir, progress=False)
    assert not (tmp_path / "g.elastiq").exists()


# --- on a GPU --------------------------------------------------------------------------------------------

def _pipeline(device: str) -> PipelineOptions:
    return PipelineOptions(
        compress=CompressOptions(rates=(0.25, 0.35), calib_samples=8, calib_seqlen=32, quality_windows=2,
                                 device=device),
        recover=RecoverOptions(steps=4, batch=2, seqlen=16, samples=4, heldout=1, bf16=False),
        quantize=QuantizeOptions())


@cuda
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_sorting_on_the_gpu_keeps_the_model(family, models, tokenizer, data_dir, tmp_path):
    src, reference = models[family]
    options = CompressOptions(rates=(0.25, 0.35), calib_samples=8, calib_seqlen=32, quality_windows=2,
                              device="cuda")
    gpu = Checkpoint(compress(src, tmp_path / "g.elastiq", options, data=data_dir, progress=False))
    options.device = "cpu"
    cpu = Checkpoint(compress(src, tmp_path / "c.elastiq", options, data=data_dir, progress=False))
    ids = torch.tensor([tokenizer.encode(TEXT)])
    with torch.no_grad():
        assert (Transformer.from_weights(gpu.read_rate(0.0), gpu.config)(ids) - reference).abs().max() < 1e-3
    for g, c in zip(gpu.manifest["rates"], cpu.manifest["rates"]):
        assert g["widths"] == c["widths"]  # the same statistics, to rounding, allocate the same widths
        assert g["quality"]["heldout_ppl"] == pytest.approx(c["quality"]["heldout_ppl"], rel=0.02)


@cuda
def test_every_stage_runs_on_the_gpu_as_on_the_cpu(models, data_dir, tmp_path):
    src, _ = models["llama"]
    written = {d: Checkpoint(build(src, tmp_path / f"{d}.elastiq", _pipeline(d), data=data_dir, progress=False,
                                   log=lambda m: None)) for d in ("cuda", "cpu")}
    gpu, cpu = written["cuda"], written["cpu"]
    assert gpu.quantization["format"] == "q4_0" and gpu.rates == cpu.rates
    for g, c in zip(gpu.manifest["rates"], cpu.manifest["rates"]):
        assert g["quality"]["kl_mean"] == pytest.approx(c["quality"]["kl_mean"], rel=0.1, abs=1e-3), g["rate"]
        assert g["quality"]["heldout_ppl"] == pytest.approx(c["quality"]["heldout_ppl"], rel=0.02), g["rate"]
