"""Qwen3 through the family description: q and k normalised per head before RoPE, so it offers
MLP channels and V/O rank only; compressed, run, decoded and exported like every family."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from elastiq.checkpoint import MLP, QK, VO, Checkpoint
from elastiq.compressor.compress import CompressOptions, compress
from elastiq.runtime.model import Transformer
from conftest import TEXT, masked_weights, tiny_config

RATES = (0.125, 0.375)  # whole 32-channel blocks of this tiny model


@pytest.fixture(scope="module")
def source(tokenizer, tmp_path_factory):
    """A tiny Qwen3 folder of unit-gain blocks (as tests/test_export_gguf.py explains), q/k norm
    weights away from one so that they matter, and its transformers model."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("qwen3", len(tokenizer))
    config.intermediate_size = 256  # without Q/K pairs, rates need finer MLP blocks than the other families' 96
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(0.5 + 1.5 * torch.rand(p.shape, generator=gen))
            elif p.dim() == 2:
                p.normal_(0, 0.05 if "embed" in name else p.shape[1] ** -0.5, generator=gen)
        model.model.norm.weight.fill_(20)
    path = tmp_path_factory.mktemp("qwen3")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def ckpt(source, data_dir, tmp_path_factory) -> Checkpoint:
    out = tmp_path_factory.mktemp("qwen3-nested") / "qwen3.elastiq"
    return Checkpoint(compress(source[0], out, CompressOptions(rates=RATES, calib_samples=4, calib_seqlen=32),
                               data=data_dir, progress=False))


@pytest.fixture(scope="module")
def ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer.encode(TEXT)])


def _runtime(ckpt: Checkpoint, rate: float) -> Transformer:
    return Transformer.from_weights(ckpt.read_rate(rate), ckpt.manifest["source"]["config"])


def test_offers_mlp_and_vo_and_every_rate_is_the_masked_model(ckpt, source, ids, capsys):
    from elastiq.cli import main

    assert {g.kind for g in ckpt.groups} == {MLP, VO}
    assert main(["inspect", str(ckpt.path)]) == 0
    assert ("pruned: MLP channels, V/O rank per KV head (every q/k channel is kept: Qwen3 normalises q and k per "
            "head before RoPE)") in capsys.readouterr().out
    assert not any(g.kind == QK for g in ckpt.groups)
    config = ckpt.manifest["source"]["config"]
    with torch.no_grad():
        full = _runtime(ckpt, 0.0)(ids)
        assert (full - source[1](ids).logits).abs().max() < 1e-4 * full.abs().max()  # sorting keeps the function
        for rate in RATES:
            sliced = _runtime(ckpt, rate)(ids)
            masked = Transformer.from_weights(masked_weights(ckpt.read_rate(0.0), ckpt, rate), config)(ids)
            assert (sliced - masked).abs().max() < 1e-4 * masked.abs().max()
            assert (sliced - full).abs().max() > 0.05 * full.abs().max()  # the rate did prune something
    widths = ckpt.rate_entry(0.375)["widths"]
    # the K cache keeps every channel, the V cache only the kept rank
    assert ckpt.rate_entry(0.375)["kv_bytes_per_token"] == sum(2 * (64 + widths[f"layers.{i}.vo"]) for i in range(2)) * 2


def test_cached_decoding_equals_transformers(ckpt, source, ids):
    from elastiq.runtime.generate import Generator

    hf = source[1].generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    stats = Generator(_runtime(ckpt, 0.0), 128).generate(ids[0].tolist(), 16)
    assert stats.tokens == hf


def test_onnx_export_equals_the_runtime(ckpt, ids, tmp_path):
    import onnxruntime as ort

    from elastiq.exporters.onnx import write_onnx

    path = write_onnx(ckpt.path, 0.375, tmp_path / "q.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy()),
             "position_ids": np.arange(ids.shape[1])[None]}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values"):
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=np.float32)
    logits = torch.from_numpy(session.run(["logits"], feeds)[0])
    with torch.no_grad():
        expected = _runtime(ckpt, 0.375)(ids)
    assert (logits - expected).abs().max() < 1e-4 * expected.abs().max()


def test_hf_export_is_a_stock_qwen3(ckpt, ids, tmp_path):
    from transformers import AutoModelForCausalLM

    from elastiq.exporters.hf import write_hf

    model = AutoModelForCausalLM.from_pretrained(write_hf(ckpt.path, 0.375, tmp_path / "hf"), dtype=torch.float32)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    with torch.no_grad():
        expected = _runtime(ckpt, 0.375)(ids)
        assert (model(ids).logits - expected).abs().max() < 1e-4 * expected.abs().max()


@pytest.mark.parametrize("rate", [0.0, 0.375])
def test_gguf_export_runs_in_llama_cpp_as_in_the_runtime(ckpt, ids, rate, tmp_path):
    """llama.cpp's own qwen3 architecture, per-layer MLP widths included; rate 0's file is also a
    source that elastiq reads back (transformers' GGUF loader) into the same model."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from elastiq.compressor.intake import load_model
    from elastiq.exporters.gguf import write_gguf

    path = write_gguf(ckpt.path, rate, tmp_path / "q.gguf", float_type="f32")
    llm = llama_cpp.Llama(str(path), n_ctx=128, n_threads=2, n_batch=128, logits_all=True, verbose=False,
                          type_k=0, type_v=0, flash_attn=False, seed=0)
    llm.eval(ids[0].tolist())
    logits = torch.from_numpy(np.asarray(llm.scores[:ids.shape[1]]))
    with torch.no_grad():
        expected = _runtime(ckpt, rate)(ids)[0]
    assert (logits - expected).abs().max() < 1e-3 * expected.abs().max()
    if rate == 0:
        loaded = load_model(path)
        assert loaded.model_type == "qwen3"
        with torch.no_grad():
            assert (loaded.model(ids).logits[0] - expected).abs().max() < 1e-3 * expected.abs().max()
