"""Hugging Face export: stock transformers loads the folder offline and its logits equal the elastic
runtime's at every rate; pruned units are zeros at their original positions; bad input fails cleanly."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from elastiq.checkpoint import CheckpointError
from elastiq.exporters.hf import HfExportError, write_hf
from elastiq.modeling.model import Transformer
from conftest import TEXT

TOLERANCE = 1e-5  # max abs logit difference (measured: 3.6e-7); the tiny models' logits are of order 1


@pytest.mark.parametrize("name", ["llama", "qwen2", "llama-q4", "qwen2-q8"])
def test_transformers_logits_equal_the_runtime_at_every_rate(name, nested_checkpoints, tokenizer, tmp_path):
    ckpt = nested_checkpoints[name]
    config = ckpt.config
    ids = torch.tensor([tokenizer.encode(TEXT)])
    for rate in ckpt.rates:
        path = write_hf(ckpt.path, rate, tmp_path / f"{rate}")
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        assert (model.config.intermediate_size, model.config.head_dim) == (config["intermediate_size"], 64)
        with torch.no_grad():
            expected = Transformer.from_weights(ckpt.read_rate(rate), config)(ids)
            assert (model(ids).logits - expected).abs().max() < TOLERANCE, (name, rate)


def test_tokenizer_and_chat_template_are_saved(nested_checkpoints, tokenizer, tmp_path):
    loaded = AutoTokenizer.from_pretrained(write_hf(nested_checkpoints["llama"].path, 0.15, tmp_path / "m"))
    assert loaded.encode(TEXT) == tokenizer.encode(TEXT)
    assert loaded.chat_template == tokenizer.chat_template
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]


def test_kept_rotary_pairs_return_to_their_original_channels(nested_checkpoints, tmp_path):
    ckpt = nested_checkpoints["qwen2"]
    model = AutoModelForCausalLM.from_pretrained(write_hf(ckpt.path, 0.35, tmp_path / "m"))
    weights, d, G = ckpt.read_rate(0.35), 64, ckpt.heads.num_kv_heads
    pruned_mlp = []
    for i, layer in enumerate(model.model.layers):
        pairs = weights[f"model.layers.{i}.self_attn.rope_pairs"]
        assert pairs.shape[1] < d // 2  # this rate prunes rotary pairs
        k = layer.self_attn.k_proj.weight.view(G, d, -1)
        k_bias = layer.self_attn.k_proj.bias.view(G, d)
        for g in range(G):
            kept = sorted(pairs[g].tolist() + [p + d // 2 for p in pairs[g].tolist()])
            assert _nonzero(k[g]) == kept
            assert (k_bias[g] != 0).nonzero().flatten().tolist() == kept
        r = weights[f"model.layers.{i}.self_attn.v_proj.weight"].shape[0] // G
        for g in range(G):
            assert _nonzero(layer.self_attn.v_proj.weight.view(G, d, -1)[g]) == list(range(r))
        m = weights[f"model.layers.{i}.mlp.gate_proj.weight"].shape[0]
        assert _nonzero(layer.mlp.down_proj.weight.T) == list(range(m))
        pruned_mlp.append(m < model.config.intermediate_size)
    assert any(pruned_mlp)


def _nonzero(rows: torch.Tensor) -> list[int]:
    """The indices of the rows of ``rows`` that are not all zero."""
    return (rows.abs().sum(-1) > 0).nonzero().flatten().tolist()


def test_bad_inputs_fail_clearly_and_leave_no_folder(nested_checkpoints, tmp_path):
    ckpt = nested_checkpoints["llama"]
    with pytest.raises(CheckpointError, match=r"rate 0.5 is not offered by llama.elastiq; offered: 0.0, 0.15, 0.35"):
        write_hf(ckpt.path, 0.5, tmp_path / "m")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(HfExportError, match="mine exists and is not an earlier Hugging Face export"):
        write_hf(ckpt.path, 0.15, tmp_path / "mine")
    (tmp_path / "file").write_text("")
    with pytest.raises(HfExportError, match=r"cannot write .*file/m: "):
        write_hf(ckpt.path, 0.15, tmp_path / "file" / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "mine"]
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"

    write_hf(ckpt.path, 0.35, tmp_path / "export")
    write_hf(ckpt.path, 0.15, tmp_path / "export")  # an earlier export is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "file", "mine"]
    weights = ckpt.read_rate(0.15)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    m = weights["model.layers.0.mlp.gate_proj.weight"].shape[0]
    assert torch.equal(model.model.layers[0].mlp.gate_proj.weight[:m], weights["model.layers.0.mlp.gate_proj.weight"])
