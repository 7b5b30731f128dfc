"""Streamed compression: a Hugging Face folder or a GGUF file is read one block at a time, and the
checkpoint is the one a whole-model load writes, byte for byte."""

from __future__ import annotations

import pytest
import torch

from elastiq.checkpoint import WEIGHTS, Checkpoint
from elastiq.compressor import compress as compress_module
from elastiq.compressor.compress import CompressOptions, compress
from elastiq.compressor.intake import load_model
from elastiq.compressor.shards import ShardWeights
from conftest import build_tiny, dense_gguf

OPTIONS = dict(rates=(0.15, 0.25, 0.35), calib_samples=4, calib_seqlen=32, quality_windows=0)


def _whole(monkeypatch):
    """Make compress load its source whole, as it does for sources it cannot stream."""
    monkeypatch.setattr(compress_module, "load_model", lambda source, stream=False: load_model(source))


def _same_checkpoint(a: Checkpoint, b: Checkpoint) -> None:
    assert a.manifest["tensors"] == b.manifest["tensors"]  # shapes, layouts and every segment's sha256
    assert a.manifest["rates"] == b.manifest["rates"]
    assert (a.path / WEIGHTS).read_bytes() == (b.path / WEIGHTS).read_bytes()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_streamed_compression_equals_the_whole_model_one(family, models, data_dir, tmp_path, monkeypatch):
    src, _ = models[family]
    streamed = compress(src, tmp_path / "s.elastiq", CompressOptions(**OPTIONS), data=data_dir, progress=False)
    _whole(monkeypatch)
    whole = compress(src, tmp_path / "w.elastiq", CompressOptions(**OPTIONS), data=data_dir, progress=False)
    _same_checkpoint(Checkpoint(streamed), Checkpoint(whole))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_gguf_file_streams_what_loading_it_whole_gives(family, tokenizer, data_dir, tmp_path, monkeypatch):
    """Each module's tensors, dequantized when it is loaded (llama's q/k rows unpermuted as
    transformers' loader unpermutes them), equal the whole load's; the checkpoint is the same."""
    from elastiq.compressor.gguf_weights import GGUFWeights

    _, gguf = dense_gguf(build_tiny(family, tokenizer), tokenizer, tmp_path, data_dir)
    streamed, whole = load_model(gguf, stream=True), load_model(gguf)
    assert isinstance(streamed.weights, GGUFWeights)
    assert {p.device.type for p in streamed.model.parameters()} == {"meta"}
    reference = whole.model.state_dict()
    for prefix in ("model.embed_tokens.", "model.layers.0.", "model.layers.1.", "model.norm."):
        module = streamed.model.get_submodule(prefix[:-1])
        streamed.load(module)
        for name, p in module.state_dict().items():
            assert torch.equal(p, reference[prefix + name]), prefix + name
        streamed.release(module)
    a = compress(gguf, tmp_path / "s.elastiq", CompressOptions(**OPTIONS), data=data_dir, progress=False)
    _whole(monkeypatch)
    b = compress(gguf, tmp_path / "w.elastiq", CompressOptions(**OPTIONS), data=data_dir, progress=False)
    _same_checkpoint(Checkpoint(a), Checkpoint(b))


def test_shards_are_read_one_block_at_a_time(tokenizer, data_dir, tmp_path, monkeypatch):
    """A folder of several shards: while a block is being loaded, no other block holds weights."""
    model = build_tiny("llama", tokenizer, seed=5)
    src = tmp_path / "sharded"
    model.save_pretrained(src, max_shard_size="100KB")
    tokenizer.save_pretrained(src)
    assert len(list(src.glob("model-*.safetensors"))) > 2
    loaded_blocks, load = [], ShardWeights.load

    def watched(self, module, prefix):
        if ".layers." in prefix:
            loaded_blocks.append(prefix)
        load(self, module, prefix)

    monkeypatch.setattr(ShardWeights, "load", watched)
    resident = []
    sort = compress_module.sort_block

    def sorting(m, *args, **kwargs):  # while block i is sorted, every other block is on the meta device
        resident.append(sum(any(p.device.type != "meta" for p in block.parameters()) for block in m.model.layers))
        return sort(m, *args, **kwargs)

    monkeypatch.setattr(compress_module, "sort_block", sorting)
    streamed = compress(src, tmp_path / "s.elastiq", CompressOptions(**OPTIONS), data=data_dir, progress=False)
    layers = model.config.num_hidden_layers
    assert loaded_blocks == [f"model.layers.{i}." for i in range(layers)]
    assert resident == [1] * layers
    monkeypatch.undo()
    _whole(monkeypatch)
    whole = compress(src, tmp_path / "w.elastiq", CompressOptions(**OPTIONS), data=data_dir, progress=False)
    _same_checkpoint(Checkpoint(streamed), Checkpoint(whole))


def test_streamed_load_leaves_weights_on_the_meta_device(models):
    src, _ = models["llama"]
    loaded = load_model(src, stream=True)
    assert loaded.weights is not None
    assert {p.device.type for p in loaded.model.parameters()} == {"meta"}
    block = loaded.model.model.layers[1]
    loaded.load(block)
    whole = load_model(src).model.model.layers[1]
    for (name, p), (_, q) in zip(block.named_parameters(), whole.named_parameters()):
        assert torch.equal(p, q), name
    loaded.release(block)
    assert {p.device.type for p in block.parameters()} == {"meta"}


def test_a_stopped_compression_resumes_at_its_last_finished_block(tokenizer, data_dir, tmp_path, monkeypatch):
    """Stopped while sorting block 2 of 4, a second run of the same options sorts blocks 2 and 3
    only, and writes the uninterrupted run's checkpoint."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    torch.manual_seed(7)
    config = tiny_config("llama", len(tokenizer))
    config.num_hidden_layers = 4
    src = tmp_path / "four"
    AutoModelForCausalLM.from_config(config).save_pretrained(src)
    tokenizer.save_pretrained(src)
    options = CompressOptions(**{**OPTIONS, "quality_windows": 2})
    whole = compress(src, tmp_path / "whole.elastiq", options, data=data_dir, progress=False)

    resume, sort, sorted_blocks = tmp_path / "resume", compress_module.sort_block, []

    def stopping(model, groups, *args, **kwargs):
        index = int(groups[0].name.split(".")[1])  # group names start with the block's: layers.2.mlp
        if index == 2 and not sorted_blocks.count("stopped"):
            sorted_blocks.append("stopped")
            raise KeyboardInterrupt
        sorted_blocks.append(index)
        return sort(model, groups, *args, **kwargs)

    monkeypatch.setattr(compress_module, "sort_block", stopping)
    out = tmp_path / "resumed.elastiq"
    with pytest.raises(KeyboardInterrupt):
        compress(src, out, options, data=data_dir, progress=False, resume=resume)
    assert not out.exists() and (resume / "blocks" / "progress.json").is_file()
    compress(src, out, options, data=data_dir, progress=False, resume=resume)
    assert sorted_blocks == [0, 1, "stopped", 2, 3]
    assert not resume.exists()
    a, b = Checkpoint(whole), Checkpoint(out)
    _same_checkpoint(a, b)
    assert a.manifest["source"]["block_influence"] == b.manifest["source"]["block_influence"]


def test_the_plan_counts_a_streamed_gguf_file_as_resident(tokenizer, data_dir, tmp_path):
    """A GGUF source stays memory-mapped while its blocks stream, so the pages read stay resident:
    the plan adds the file's bytes to the stage that reads it, and nothing for a folder of shards."""
    from elastiq.compressor.needs import plan

    _, gguf = dense_gguf(build_tiny("llama", tokenizer), tokenizer, tmp_path, data_dir)
    from_gguf, from_folder = plan(gguf, 4, 64, 0), plan(tmp_path / "hf", 4, 64, 0)
    assert from_gguf.parts["mapped source"] == gguf.stat().st_size
    assert "mapped source" not in from_folder.parts
    assert from_gguf.memory == sum(from_gguf.parts.values())  # calibration and sorting is the largest stage here


def test_streamed_peak_memory_stays_within_the_plan_far_below_the_model(tokenizer, tmp_path):
    """A random model of 1.41 GB of float32 weights (32 blocks, bf16 shards) compressed in its own
    process: the peak RSS stays within 10% of the planner's figure, and that bound is below the
    weights alone (a whole-model load holds them, and more)."""
    import os
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM, LlamaConfig

    from elastiq.compressor.needs import plan

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=2816, num_hidden_layers=32,
                         num_attention_heads=16, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, dtype="bfloat16")
    src = tmp_path / "big"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(src, max_shard_size="200MB")
    tokenizer.save_pretrained(src)
    weights = sum(p.numel() for p in model.parameters()) * 4
    del model
    args = ["compress", str(src), "-o", str(tmp_path / "big.elastiq"), "--rates", "0.25", "--calib-samples", "4",
            "--calib-seqlen", "64", "--quality-windows", "0", "--no-recover", "--no-quantize"]
    needs = plan(src, 4, 64, 0)
    # VmHWM, the peak of this process's own address space (getrusage's ru_maxrss would start from
    # the forking pytest process's resident size, which it keeps across exec)
    script = ("import re, sys; from elastiq.cli import main; code = main(sys.argv[1:]); "
              "print(int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) * 1024); "
              "sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)  # not the repository's root
    assert done.returncode == 0, done.stderr[-2000:]
    peak = int(done.stdout.strip().splitlines()[-1])
    assert peak <= 1.1 * needs.memory < weights, (peak, weights, needs.describe())
