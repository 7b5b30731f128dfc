"""Quantization and the measure of each rate hold one block at a time, and write and record exactly
what the whole-model path did (kept here, as it was, to compare against)."""

from __future__ import annotations

import gc
import json
import math
import weakref
from functools import partial

import pytest
import torch

from conftest import TEXT
from test_mamba2 import build_mamba2

from elastiq.checkpoint import WEIGHTS, Checkpoint, RateSpec, record_quality, write_checkpoint
from elastiq.compressor import quality as quality_module
from elastiq.compressor import quantize as quantize_module
from elastiq.compressor.blockwise import BlockReader
from elastiq.compressor.calibrate import calibration_file, calibration_samples, describe_calibration
from elastiq.compressor.compress import CompressOptions, compress
from elastiq.compressor.gptq import gptq
from elastiq.compressor.quality import rate_quality
from elastiq.compressor.quantize import (EMBEDDING_FORMATS, FIRST_LAST, QuantizeOptions, _block_hessians, _order,
                                         _round_to_nearest, quantize_checkpoint)
from elastiq.divergence import Divergence
from elastiq.families import checkpoint_family
from elastiq.families.base import ATTENTION, BLOCK_READS, EMBED, HEAD, PRUNED_INPUTS, SSM_P
from elastiq.modeling.model import Transformer
from elastiq.quants import BLOCK, Quantized, QuantizedTensor, quantize_q8_0, quantize_rtn


# --- the whole-model path, as quantize_checkpoint and rate_quality were before they streamed ------

def whole_model_quality(ckpt: Checkpoint, dense: dict, windows: torch.Tensor) -> dict:
    config = ckpt.config
    reference = Transformer.from_weights(dense, config)
    out = {}
    for rate in ckpt.rates:
        model = Transformer.from_weights(ckpt.read_rate(rate), config)
        divergence, nll = Divergence(), []
        with torch.inference_mode():
            for window in windows:
                logits = model(window[None])[0, :-1].float()
                divergence.add(reference(window[None])[0, :-1], logits)
                nll.append(torch.nn.functional.cross_entropy(logits, window[1:], reduction="none").double())
        d = divergence.summary()
        out[rate] = {"heldout_ppl": round(math.exp(torch.cat(nll).mean().item()), 4),
                     "kl_mean": round(d["kl_mean"], 6), "kl_p99": round(d["kl_p99"], 6),
                     "top1_agreement": round(d["top1_agreement"], 6), "tokens": d["tokens"]}
    return out


@torch.no_grad()
def whole_model_quantize(source, output, options: QuantizeOptions, data):
    ckpt = Checkpoint(source)
    family = checkpoint_family(ckpt)
    weights = ckpt.read_rate(0.0)
    config = ckpt.config
    model = Transformer.from_weights(weights, config)
    tokenizer = ckpt.tokenizer()
    hidden, positions, heldout = [], None, torch.empty(0)
    calib_file = calibration_file(options.calib_data, data)
    if options.method == "gptq" or options.quality_windows:
        drawn = calibration_samples(tokenizer, calib_file, options.calib_samples, options.calib_seqlen,
                                    options.seed, heldout=options.quality_windows)
        samples, heldout = drawn[:options.calib_samples], drawn[options.calib_samples:]
    if options.method == "gptq":
        positions = torch.arange(samples.shape[1])
        hidden = [model.embed_tokens(chunk) for chunk in samples.split(4)]
    quantized, applied = {}, set()
    last = len(model.layers) - 1
    kinds = family.layer_kinds(config)
    ssm = family.ssm_config(config)
    for index, block in enumerate(model.layers):
        if kinds[index] == ATTENTION:
            tables = block.rope_tables(positions) if options.method == "gptq" else None
            run = partial(block, tables=tables)
        else:
            run = block
        matrices = BLOCK_READS[kinds[index]]
        hessians = _block_hessians(block, run, hidden, set(matrices.values())) if options.method == "gptq" else {}
        for slot, reads in matrices.items():
            linear = block.get_submodule(slot)
            chosen_by = [k for k in (slot, FIRST_LAST if index in (0, last) else None) if k in options.q8]
            eight = bool(chosen_by)
            applied.update(chosen_by)
            fmt = "q8_0" if eight else "q4_0"
            if options.method == "gptq":
                h = hessians[reads]
                runs = ssm.num_heads if PRUNED_INPUTS.get(slot) == SSM_P else model.args.num_heads
                order = _order(slot, h, linear.in_features, runs, options.order == "least-important-first")
                t = gptq(linear.weight, h, order, options.damp, fmt=fmt)
            else:
                t = quantize_q8_0(linear.weight) if eight else QuantizedTensor(*quantize_rtn(linear.weight))
            linear.weight.copy_(t.dequantize())
            quantized[family.name_of(index, slot)] = t
        hidden = [run(x) for x in hidden]
    embed, head = (f"{family.top[slot]}.weight" for slot in (EMBED, HEAD))
    for name in (embed, head):
        if name in weights and name not in quantized:
            tied = name == head and weights[name] is weights[embed]
            quantized[name] = quantized[embed] if tied else _round_to_nearest(
                weights[name], EMBEDDING_FORMATS[options.embedding_bits])
    rates = [RateSpec(r["rate"], r["widths"]) for r in ckpt.rate_table]
    spec = {"format": "q4_0", "bits": 4, "block": BLOCK, "scale_dtype": "float16", "method": options.method,
            "order": options.order, "calib_samples": options.calib_samples if hidden else 0,
            "calib_data": describe_calibration(calib_file, data) if hidden else None,
            "quality_windows": options.quality_windows, "calib_seqlen": options.calib_seqlen,
            "seed": options.seed, "damp": options.damp, "embeddings": "rtn",
            "embedding_format": EMBEDDING_FORMATS[options.embedding_bits],
            "q8_0_matrices": [k for k in options.q8 if k in applied]}
    write_checkpoint(output, {**weights, **quantized}, ckpt.groups, rates, ckpt.heads, ckpt.source.record, tokenizer,
                     quantization=spec)
    if len(heldout):
        written = Checkpoint(output)
        record_quality(written, whole_model_quality(written, ckpt.read_rate(0.0), heldout))
    return output


# --- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def float_checkpoints(models, tokenizer, data_dir, tmp_path_factory) -> dict[str, Checkpoint]:
    """Float nested checkpoints of the tiny Llama (tied head) and the tiny Mamba2 (untied head)."""
    root = tmp_path_factory.mktemp("stream")
    mamba2 = root / "mamba2-hf"
    build_mamba2(len(tokenizer)).save_pretrained(mamba2)
    tokenizer.save_pretrained(mamba2)
    options = CompressOptions(rates=(0.15, 0.35), calib_samples=4, calib_seqlen=32, quality_windows=2)
    return {name: Checkpoint(compress(folder, root / f"{name}.elastiq", options, data=data_dir, progress=False))
            for name, folder in (("llama", models["llama"][0]), ("mamba2", mamba2))}


def _options(**kwargs) -> QuantizeOptions:
    return QuantizeOptions(**{"calib_samples": 4, "calib_seqlen": 32, "quality_windows": 2, **kwargs})


def _assert_same(a: Quantized | torch.Tensor, b: Quantized | torch.Tensor) -> None:
    assert type(a) is type(b)
    for x, y in ((a.codes, b.codes), (a.scales, b.scales)) if isinstance(a, Quantized) else ((a, b),):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)


# --- tests ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("model,options", [
    ("llama", _options(q8=("attn_v", FIRST_LAST))),
    ("llama", _options(method="rtn", embedding_bits=8)),
    ("mamba2", _options(q8=(FIRST_LAST,), embedding_bits=8)),
])
def test_streaming_writes_what_the_whole_model_path_wrote(model, options, float_checkpoints, data_dir, tmp_path):
    source = float_checkpoints[model]
    new = Checkpoint(quantize_checkpoint(source.path, tmp_path / "new.elastiq", options, data=data_dir,
                                         progress=False))
    old = Checkpoint(whole_model_quantize(source.path, tmp_path / "old.elastiq", options, data_dir))
    assert (new.path / "weights.safetensors").read_bytes() == (old.path / "weights.safetensors").read_bytes()
    assert new.manifest["tensors"] == old.manifest["tensors"]
    assert new.manifest["rates"] == old.manifest["rates"]  # the quality figures equal, to the last digit
    assert json.loads((new.path / "manifest.json").read_text()) == json.loads((old.path / "manifest.json").read_text())
    assert all(r["quality"]["tokens"] == 2 * 31 for r in new.manifest["rates"])
    assert new.aliases == ({"lm_head.weight": "model.embed_tokens.weight"} if model == "llama" else {})
    if options.method == "gptq":
        assert new.format(checkpoint_family(new).name_of(0, "ssm_out" if model == "mamba2" else "ffn_down")) == "q8_0"


class Live:
    """Weak references to every block built and every block tensor read, by block index."""

    def __init__(self):
        self.refs: list[tuple[int, weakref.ref]] = []
        self.built: list[int] = []

    def blocks(self) -> set[int]:
        """The blocks of which something is still in memory."""
        gc.collect()
        return {index for index, ref in self.refs if ref() is not None}

    def build(self, real, weights, config, index):
        assert self.blocks() == set(), f"block {index} is built while blocks {self.blocks()} are in memory"
        for t in weights.values():
            self.refs.append((index, weakref.ref(t.codes if isinstance(t, Quantized) else t)))
        block = real(weights, config, index)
        self.refs.append((index, weakref.ref(block)))
        self.built.append(index)
        return block


def _whole_model_refused(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the whole model was read or built")
    for cls, name in ((Checkpoint, "read_rate"), (Checkpoint, "iter_rate"), (Transformer, "from_weights")):
        monkeypatch.setattr(cls, name, refuse)


@pytest.mark.parametrize("model", ["llama", "mamba2"])
def test_one_block_is_in_memory_while_it_is_quantized_and_measured(model, float_checkpoints, data_dir, tmp_path,
                                                                   monkeypatch):
    source = float_checkpoints[model]
    quantizing, measuring = Live(), Live()
    for module, live in ((quantize_module, quantizing), (quality_module, measuring)):
        monkeypatch.setattr(module, "block_from_weights", partial(live.build, module.block_from_weights))
    seen = []

    def watched_gptq(*args, **kwargs):
        seen.append((quantizing.built[-1], quantizing.blocks()))
        return gptq(*args, **kwargs)

    monkeypatch.setattr(quantize_module, "gptq", watched_gptq)
    _whole_model_refused(monkeypatch)
    path = quantize_checkpoint(source.path, tmp_path / "q.elastiq", _options(), data=data_dir, progress=False)
    layers = source.config["num_hidden_layers"]
    assert quantizing.built == list(range(layers))
    assert seen and {index for index, _ in seen} == set(range(layers))
    assert all(alive == {index} for index, alive in seen), seen  # no other block while one is quantized
    assert measuring.built == list(range(layers)) * (1 + len(source.rates))  # the dense model, then each rate
    assert all(r["quality"]["tokens"] == 2 * 31 for r in Checkpoint(path).manifest["rates"])


def test_blockwise_quality_equals_the_whole_model_figures(float_checkpoints, tokenizer):
    """Against a checkpoint's rate 0 or the same weights in memory, exactly the whole-model figures."""
    ckpt = float_checkpoints["llama"]
    windows = torch.tensor([tokenizer.encode(TEXT)[:24], tokenizer.encode(TEXT)[-24:]])
    expected = whole_model_quality(ckpt, ckpt.read_rate(0.0), windows)
    assert rate_quality(ckpt, ckpt, windows, progress=False) == expected
    assert rate_quality(ckpt, ckpt.read_rate(0.0), windows, progress=False) == expected
    assert expected[0.0]["kl_mean"] < 1e-6 < expected[0.35]["kl_mean"]


@pytest.mark.parametrize("model", ["llama", "mamba2"])
def test_the_block_reader_reads_what_read_rate_reads(model, float_checkpoints, data_dir, tmp_path):
    float_ckpt = float_checkpoints[model]
    quantized = Checkpoint(quantize_checkpoint(float_ckpt.path, tmp_path / "q.elastiq",
                                               _options(method="rtn", quality_windows=0), data=data_dir,
                                               progress=False))
    for ckpt in (float_ckpt, quantized):
        for rate in ckpt.rates:
            reader = BlockReader(ckpt, ckpt.config, rate)
            read = reader.ends()
            for index in range(len(reader.blocks)):
                block = reader.block(index)
                assert block and all(f".layers.{index}." in name for name in block)
                read.update(block)
            whole = ckpt.read_rate(rate)
            assert list(read) != [] and set(read) == set(whole)
            for name, t in whole.items():
                _assert_same(read[name], t)
            for alias, name in ckpt.aliases.items():
                assert read[alias] is read[name]


def test_a_stopped_quantization_resumes_at_its_last_finished_block(float_checkpoints, data_dir, tmp_path,
                                                                   monkeypatch):
    """GPTQ stopped in the second block of a 2-block checkpoint goes on from it, and writes the
    uninterrupted run's checkpoint."""
    source = float_checkpoints["llama"].path
    whole = quantize_checkpoint(source, tmp_path / "whole.elastiq", _options(), data=data_dir, progress=False)
    quantize_block, seen = quantize_module._quantize_block, []

    def stopping(reader, index, *args):
        if index == 1 and "stopped" not in seen:
            seen.append("stopped")
            raise KeyboardInterrupt
        seen.append(index)
        return quantize_block(reader, index, *args)

    monkeypatch.setattr(quantize_module, "_quantize_block", stopping)
    out, resume = tmp_path / "resumed.elastiq", tmp_path / "resume"
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(source, out, _options(), data=data_dir, progress=False, resume=resume)
    assert not out.exists() and resume.is_dir()
    quantize_checkpoint(source, out, _options(), data=data_dir, progress=False, resume=resume)
    assert seen == [0, "stopped", 1] and not resume.exists()
    assert (out / WEIGHTS).read_bytes() == (whole / WEIGHTS).read_bytes()
    assert Checkpoint(out).manifest["rates"] == Checkpoint(whole).manifest["rates"]
