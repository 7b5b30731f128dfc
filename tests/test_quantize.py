"""The quantization stage: every rate a prefix of the same codes, equal to the masked full model."""

from __future__ import annotations

import pytest
import torch

from elastiq import ElastiqError
from elastiq.checkpoint import Checkpoint
from elastiq.cli import main
from elastiq.compressor.compress import CompressOptions, compress
from elastiq.compressor.quantize import QuantizeOptions, quantize_checkpoint
from elastiq.quants import BLOCK, Q8Tensor, QuantizedTensor
from elastiq.modeling.model import Transformer
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
    config = ckpt.config
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
    # Each rate is measured against the float model: the quantized rate 0 is no longer exact, and
    # the float checkpoint's own figures (rate 0 exact) are not carried over.
    quality = {r["rate"]: r["quality"] for r in ckpt.manifest["rates"]}
    assert source.rate_entry(0.0)["quality"]["kl_mean"] < 1e-6 < quality[0.0]["kl_mean"]
    assert quality[0.0]["kl_mean"] < quality[0.35]["kl_mean"] and quality[0.0]["tokens"] == 8 * 31


def test_8bit_embedding_and_head_are_q8_0_and_closer_to_the_float_model(nested_checkpoints, data_dir, tmp_path,
                                                                        tokenizer):
    """The rotated Qwen2 has an untied head: both it and the embedding become Q8_0, the blocks stay
    Q4_0 with the same codes, and the model moves closer to the float one than with Q4_0 there."""
    source = nested_checkpoints["qwen2-rotated"]
    q8 = nested_checkpoints["qwen2-q8"]
    q4 = Checkpoint(quantize_checkpoint(source.path, tmp_path / "q4.elastiq", _small(method="rtn"), data=data_dir,
                                        progress=False))
    assert q8.manifest["quantization"]["embedding_format"] == "q8_0"
    assert q4.manifest["quantization"]["embedding_format"] == "q4_0"
    w8, w4 = q8.read_rate(0.0), q4.read_rate(0.0)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert isinstance(w8[name], Q8Tensor) and isinstance(w4[name], QuantizedTensor), name
        assert q8.format(name) == "q8_0" and q8.shapes(0.0)[name][2] == "q8_0"
    block = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(w8[block].codes, w4[block].codes) and q8.format(block) == "q4_0"
    vocab, hidden = w8["lm_head.weight"].shape
    extra = 2 * vocab * hidden // BLOCK * (BLOCK - BLOCK // 2)  # two matrices, 16 more code bytes per block
    assert q8.rate_entry(0.0)["weight_bytes"] - q4.rate_entry(0.0)["weight_bytes"] == extra
    config = source.config
    ids = torch.tensor([tokenizer.encode(TEXT)])
    with torch.no_grad():
        dense = Transformer.from_weights(source.read_rate(0.0), config)(ids)
        error8 = (Transformer.from_weights(w8, config)(ids) - dense).abs().mean()
        error4 = (Transformer.from_weights(w4, config)(ids) - dense).abs().mean()
    assert error8 < error4


def test_already_quantized_and_bad_options_are_refused(float_checkpoint, data_dir, tmp_path):
    path = quantize_checkpoint(float_checkpoint, tmp_path / "q.elastiq", _small(method="rtn"), data=data_dir,
                               progress=False)
    with pytest.raises(ElastiqError, match="is already quantized"):
        quantize_checkpoint(path, tmp_path / "qq.elastiq", _small(), data=data_dir)
    with pytest.raises(ElastiqError, match="only 32-weight blocks of 4 bits"):
        quantize_checkpoint(float_checkpoint, tmp_path / "x.elastiq", _small(bits=3), data=data_dir)
    with pytest.raises(ElastiqError, match="got 4 bits in blocks of 64"):
        quantize_checkpoint(float_checkpoint, tmp_path / "x.elastiq", _small(block_size=64), data=data_dir)
    with pytest.raises(ElastiqError, match="quantized to 4 or 8 bits .* got 6"):
        quantize_checkpoint(float_checkpoint, tmp_path / "x.elastiq", _small(embedding_bits=6), data=data_dir)
    assert not (tmp_path / "x.elastiq").exists()


def test_cli_quantize(float_checkpoint, tmp_path, capsys):
    out = tmp_path / "cli.elastiq"
    assert main(["quantize", str(float_checkpoint), "-o", str(out), "--method", "rtn", "--calib-samples", "2",
                 "--calib-seqlen", "32"]) == 0
    printed = capsys.readouterr().out
    assert "| 0.35 |" in printed and "weights: Q4_0 (rtn), attn_v Q8_0; token embedding and LM head Q4_0" in printed
    assert main(["quantize", str(float_checkpoint), "-o", str(out), "--bits", "8"]) == 2
    assert "only 32-weight blocks of 4 bits" in capsys.readouterr().err
    assert main(["quantize", str(float_checkpoint), "-o", str(out), "--method", "rtn", "--embedding-bits", "8",
                 "--overwrite"]) == 0
    assert Checkpoint(out).format("model.embed_tokens.weight") == "q8_0"
    assert "token embedding and LM head Q8_0" in capsys.readouterr().out
    assert main(["quantize", str(float_checkpoint), "-o", str(out), "--method", "rtn", "--q8", "none",
                 "--overwrite"]) == 0
    assert Checkpoint(out).format("model.layers.0.self_attn.v_proj.weight") == "q4_0"
    assert "weights: Q4_0 (rtn); token embedding" in capsys.readouterr().out
    assert main(["quantize", str(float_checkpoint), "-o", str(out), "--q8", "attn_v,v_proj", "--overwrite"]) == 2
    assert "--q8 names 'v_proj'; it takes block matrices by slot or 'first-last': attn_q, " in capsys.readouterr().err


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_q8_matrices_are_q8_0_at_every_rate_and_closer_to_the_float_model(method, float_checkpoint, data_dir,
                                                                          tmp_path, tokenizer):
    """The named slots, and every matrix of the first and last block, are Q8_0 at every rate, the
    rest Q4_0; the model is closer to the float one than
    with every block matrix at 4 bits, and every rate still equals the masked full model."""
    kinds = ("attn_v", "first-last")
    # 8-bit embeddings in both, so that the block matrices make the difference
    path = quantize_checkpoint(float_checkpoint, tmp_path / "q8.elastiq",
                               _small(method=method, q8=kinds, embedding_bits=8), data=data_dir, progress=False)
    four = quantize_checkpoint(float_checkpoint, tmp_path / "q4.elastiq", _small(method=method, q8=(), embedding_bits=8),
                               data=data_dir, progress=False)
    ckpt, source = Checkpoint(path), Checkpoint(float_checkpoint)
    assert ckpt.manifest["quantization"]["q8_0_matrices"] == list(kinds)
    config = ckpt.config
    last = config["num_hidden_layers"] - 1
    full = ckpt.read_rate(0.0)
    for rate in (0.0, 0.35):
        weights = ckpt.read_rate(rate)
        for name, t in weights.items():
            if name.startswith("model.layers.") and name.endswith("proj.weight"):
                layer = int(name.split(".")[2])
                eight = ".v_proj." in name or layer in (0, last)
                assert isinstance(t, Q8Tensor if eight else QuantizedTensor), (rate, name)
    ids = torch.tensor([tokenizer.encode(TEXT)])
    with torch.no_grad():
        dense = Transformer.from_weights(source.read_rate(0.0), config)(ids)
        eight = Transformer.from_weights(full, config)(ids)
        all4 = Transformer.from_weights(Checkpoint(four).read_rate(0.0), config)(ids)
        # measured: 0.57 with GPTQ (whose 4-bit codes already compensate on the output), 0.10 round-to-nearest
        assert (eight - dense).abs().mean() < 0.8 * (all4 - dense).abs().mean()
        sliced = Transformer.from_weights(ckpt.read_rate(0.35), config)(ids)
        masked = Transformer.from_weights(masked_weights(full, ckpt, 0.35), config)(ids)
        assert (sliced - masked).abs().max() < 1e-4
    assert ckpt.rate_entry(0.0)["weight_bytes"] > Checkpoint(four).rate_entry(0.0)["weight_bytes"]
