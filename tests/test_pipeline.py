"""The one-command cloud pipeline: sort, recover, quantize; quality against the dense model; resume."""

from __future__ import annotations

import pytest

from elastiq.checkpoint import WEIGHTS, Checkpoint
from elastiq.cli import main
from elastiq.compressor import pipeline
from elastiq.compressor.calibrate import C4_SAMPLE, heldout_windows
from elastiq.compressor.compress import CompressOptions, compress
from elastiq.compressor.pipeline import PipelineOptions, build, stages_dir
from elastiq.compressor.quality import rate_quality
from elastiq.compressor.quantize import QuantizeOptions
from elastiq.compressor.recover import RecoverOptions


def _options(seed: int = 0) -> PipelineOptions:
    return PipelineOptions(
        compress=CompressOptions(rates=(0.35,), calib_samples=4, calib_seqlen=32, quality_windows=2, seed=seed),
        recover=RecoverOptions(steps=3, batch=2, seqlen=16, samples=4, heldout=1, save_every=1, distill=1.0,
                               temperature=1.0, bf16=False),
        quantize=QuantizeOptions())


@pytest.fixture(scope="module")
def whole(models, data_dir, tmp_path_factory):
    """An uninterrupted pipeline run on the tiny Llama."""
    out = tmp_path_factory.mktemp("whole") / "p.elastiq"
    return build(models["llama"][0], out, _options(), data=data_dir, progress=False, log=lambda m: None)


def test_every_stage_runs_and_quality_is_against_the_dense_model(whole, models, data_dir, tmp_path):
    ckpt = Checkpoint(whole)
    assert ckpt.quantization["format"] == "q4_0" and ckpt.rates == [0.0, 0.35]
    recovery = ckpt.manifest["source"]["recovery"]
    assert recovery["teacher"] == "dense" and recovery["distill"] == 1.0 and recovery["steps"] == 3
    assert not stages_dir(whole).exists() and sorted(p.name for p in whole.parent.iterdir()) == ["p.elastiq"]
    # The dense model is the sorted one before recovery: compressing alone gives it again.
    dense = Checkpoint(compress(models["llama"][0], tmp_path / "d.elastiq", _options().compress, data=data_dir,
                                progress=False))
    windows = heldout_windows(ckpt.tokenizer(), data_dir / C4_SAMPLE, 2, 32, 0)
    expected = rate_quality(ckpt, dense.read_rate(0.0), windows, progress=False)
    for row in ckpt.manifest["rates"]:
        assert row["quality"] == expected[row["rate"]], row["rate"]
    assert row["quality"]["kl_mean"] > 0


def test_a_stopped_pipeline_resumes_at_its_stage(whole, models, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "p.elastiq"

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "quantize_checkpoint", stop)
    with pytest.raises(KeyboardInterrupt):
        build(models["llama"][0], out, _options(), data=data_dir, progress=False, log=lambda m: None)
    assert not out.exists()
    assert sorted(p.name for p in stages_dir(out).iterdir()) == ["recovered.elastiq", "sorted.elastiq", "stages.json"]
    monkeypatch.undo()

    def done_already(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(pipeline, "compress", done_already)
    monkeypatch.setattr(pipeline, "recover_checkpoint", done_already)
    said = []
    build(models["llama"][0], out, _options(), data=data_dir, progress=False, log=said.append)
    assert f"elastiq: resuming the stages in {stages_dir(out)}" in said
    assert (out / WEIGHTS).read_bytes() == (whole / WEIGHTS).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.elastiq"]


def test_stages_of_other_options_are_not_reused(models, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "p.elastiq"

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "recover_checkpoint", stop)
    with pytest.raises(KeyboardInterrupt):
        build(models["llama"][0], out, _options(seed=1), data=data_dir, progress=False, log=lambda m: None)
    assert (stages_dir(out) / "sorted.elastiq").is_dir()
    monkeypatch.undo()
    said = []
    build(models["llama"][0], out, _options(), data=data_dir, progress=False, log=said.append)
    assert f"elastiq: {stages_dir(out)} holds stages of another source or other options; starting over" in said
    assert "elastiq: stage 1/3: calibrate, sort and allocate" in said


def test_cli_compress_runs_the_pipeline_and_a_failed_start_leaves_nothing(models, tmp_path, capsys):
    src, out = models["llama"][0], tmp_path / "c.elastiq"
    common = ["--rates", "0.35", "--calib-samples", "2", "--calib-seqlen", "32", "--quality-windows", "1"]
    assert main(["compress", str(src), "-o", str(out), *common, "--recover-steps", "2", "--quantize-method", "rtn"]) == 0
    captured = capsys.readouterr()
    assert "stage 2/3: recover (2 steps of nested LoRA, distilled from the dense model)" in captured.err
    assert "weights: q4_0" in captured.out.lower() or "q4_0" in captured.out
    assert Checkpoint(out).manifest["source"]["recovery"]["steps"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.elastiq"]
    bad = tmp_path / "bad.elastiq"
    assert main(["compress", str(src), "-o", str(bad), "--calib-samples", "20000"]) == 2
    assert "windows of 512 tokens" in capsys.readouterr().err  # more than the C4 sample holds
    assert main(["compress", str(src), "-o", str(bad), "--calib-seqlen", "100000"]) == 2
    assert "of memory per process" in capsys.readouterr().err  # refused before anything starts
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.elastiq"]  # no output, no stages folder
