"""The quantization stage: every rate a prefix of the same codes, equal to the masked full model."""

from __future__ import annotations

import pytest
import torch

from elastiq import ElastiqError
from elastiq.checkpoint import Checkpoint
from elastiq.cli import main
from elastiq.compressor.compress import CompressOptions, compress
from elastiq.compressor.quantize import QuantizeOptions, quantize_checkpoint
from elastiq.quants import QuantizedTensor
from elastiq.runtime.model import Transformer
from conftest import TEXT, masked_weights


@pytest.fixture(scope="module")
def float_checkpoint(models, data_dir, tmp_path_factory):
    options = CompressOptions(rates=(0.15, 0.35), calib_samples=4, calib_seqlen=32)
    return compress(models["qwen2"][0], tmp_path_factory.mktemp("f") / "f.elastiq", options, data=data_dir,
                    progress=False)


def _small(**kwargs) -> QuantizeOptions:
    return QuantizeOptions(calib_samples=4, calib_seqlen=32, **kwargs)


@pytest.mark.parametrize("method,order", [("gptq", "least-important-first"), ("gptq", "forward"), ("rtn", "forward")])
def test_quantized_rates_equal_the_masked_quantized_model(method, order, float_checkpoint, data_dir, tmp_path,
                                                          tokenizer):
    path = quantize_checkpoint(float_checkpoint, tmp_path / "q.elastiq", _small(method=method, order=order),
                               data=data_dir, progress=False)
    ckpt, source = Checkpoint(path), Checkpoint(float_checkpoint)
    assert ckpt.manifest["quantization"]["method"] == method
    weights = ckpt.read_rate(0.0)
    assert isinstance(weights["model.layers.1.mlp.down_proj.weight"], QuantizedTensor)
    assert isinstance(weights["lm_head.weight"], QuantizedTensor)
    config = ckpt.manifest["source"]["config"]
    ids = torch.tensor([tokenizer.encode(TEXT)])
    with torch.no_grad():
        full = Transformer.from_weights(weights, config)(ids)
        dense = Transformer.from_weights(source.read_rate(0.0), config)(ids)
        assert 0 < (full - dense).abs().max() < 0.5 * dense.abs().max()  # quantized, still the same model
        for rate in (0.15, 0.35):
            sliced = Transformer.from_weights(ckpt.read_rate(rate), config)(ids)
            masked = Transformer.from_weights(masked_weights(weights, ckpt, rate), config)(ids)
            assert (sliced - masked).abs().max() < 1e-4, rate
    assert ckpt.rate_entry(0.0)["weight_bytes"] < 0.3 * source.rate_entry(0.0)["weight_bytes"]


def test_already_quantized_and_bad_options_are_refused(float_checkpoint, data_dir, tmp_path):
    path = quantize_checkpoint(float_checkpoint, tmp_path / "q.elastiq", _small(method="rtn"), data=data_dir,
                               progress=False)
    with pytest.raises(ElastiqError, match="is already quantized"):
        quantize_checkpoint(path, tmp_path / "qq.elastiq", _small(), data=data_dir)
    with pytest.raises(ElastiqError, match="only 32-weight blocks of 4 bits"):
        quantize_checkpoint(float_checkpoint, tmp_path / "x.elastiq", _small(bits=3), data=data_dir)
    with pytest.raises(ElastiqError, match="got 4 bits in blocks of 64"):
        quantize_checkpoint(float_checkpoint, tmp_path / "x.elastiq", _small(block_size=64), data=data_dir)
    assert not (tmp_path / "x.elastiq").exists()


def test_cli_quantize(float_checkpoint, tmp_path, capsys):
    out = tmp_path / "cli.elastiq"
    assert main(["quantize", str(float_checkpoint), "-o", str(out), "--method", "rtn", "--calib-samples", "2",
                 "--calib-seqlen", "32"]) == 0
    assert "| 0.35 |" in capsys.readouterr().out
    assert main(["quantize", str(float_checkpoint), "-o", str(out), "--bits", "8"]) == 2
    assert "only 32-weight blocks of 4 bits" in capsys.readouterr().err
