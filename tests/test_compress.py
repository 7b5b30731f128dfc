"""The whole compressor: sorting keeps the model, every rate is the masked full model, bad input fails."""

from __future__ import annotations

import pytest
import torch

from elastiq.checkpoint import Checkpoint, from_storage, to_storage
from elastiq.cli import main
from elastiq.compressor import compress as compress_module
from elastiq.compressor.compress import CompressOptions, compress
from elastiq.runtime.model import Transformer
from tests.conftest import build_tiny

TEXT = "Robert Boulter is an English film , television and theatre actor . He had a guest role in 2000 ."


@pytest.fixture(scope="module")
def models(tokenizer, tmp_path_factory):
    """Tiny Llama and Qwen2 folders (Qwen2 with non-zero biases) and their logits on TEXT."""
    out = {}
    for family in ("llama", "qwen2"):
        model = build_tiny(family, tokenizer, seed=3)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.data.normal_(0, 0.5)
        path = tmp_path_factory.mktemp(f"src-{family}")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        with torch.no_grad():
            out[family] = (path, model(torch.tensor([tokenizer.encode(TEXT)])).logits)
    return out


def _compress(src, dest, data_dir, **kwargs):
    options = CompressOptions(rates=(0.15, 0.25, 0.35), calib_samples=4, calib_seqlen=32, **kwargs)
    return compress(src, dest, options, data=data_dir, progress=False)


def _masked_full(ckpt: Checkpoint, rate: float) -> dict[str, torch.Tensor]:
    """The full sorted model with every unit that ``rate`` prunes set to zero."""
    weights = {k: v.clone() for k, v in ckpt.read_rate(0.0).items()}
    widths = ckpt.rate_entry(rate)["widths"]
    for g in ckpt.groups:
        for name, role in g.members:
            if role != "pairs":
                s = to_storage(weights[name], role, ckpt.heads)
                s[widths[g.name]:] = 0
                weights[name] = from_storage(s, role, ckpt.heads)
    return weights


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("method", ["uniql", "magnitude"])
def test_sorted_model_equals_original_and_rates_equal_masked(family, method, models, tokenizer, data_dir, tmp_path):
    src, reference = models[family]
    ckpt = Checkpoint(_compress(src, tmp_path / "m.elastiq", data_dir, method=method))
    config = ckpt.manifest["source"]["config"]
    ids = torch.tensor([tokenizer.encode(TEXT)])
    with torch.no_grad():
        full = Transformer.from_weights(ckpt.read_rate(0.0), config)(ids)
        assert (full - reference).abs().max() < 1e-3  # sorting alone does not change the model
        for rate in (0.15, 0.25, 0.35):
            sliced = Transformer.from_weights(ckpt.read_rate(rate), config)(ids)
            masked = Transformer.from_weights(_masked_full(ckpt, rate), config)(ids)
            assert (sliced - masked).abs().max() < 1e-4, rate
            assert (sliced - full).abs().max() > 1e-3, rate  # pruning did remove something
    assert ckpt.manifest["source"]["compression"]["method"] == method


def test_influence_and_uniform_allocations_differ(models, data_dir, tmp_path):
    src, _ = models["llama"]
    influence = Checkpoint(_compress(src, tmp_path / "a.elastiq", data_dir)).rate_entry(0.35)["widths"]
    uniform = Checkpoint(_compress(src, tmp_path / "b.elastiq", data_dir, allocation="uniform")).rate_entry(0.35)
    assert uniform["widths"]["layers.0.mlp"] == uniform["widths"]["layers.1.mlp"]
    assert influence != uniform["widths"]


def test_cli_compress_and_inspect(models, tmp_path, capsys):
    src, _ = models["llama"]
    out = tmp_path / "cli.elastiq"
    args = ["compress", str(src), "-o", str(out), "--rates", "0.2,0.4", "--calib-samples", "2", "--calib-seqlen", "32"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "| rate | weights MB | of full | KV bytes/token |" in table
    assert [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| 0.")] == ["0.0", "0.2", "0.4"]
    assert main(args) == 2
    assert "exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert main(["inspect", str(out), "--layers"]) == 0
    assert "rate 0.4: layers.0.mlp=" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--rates", "0.95"], "rate 0.95 is outside [0, 0.9)"),
    (["--calib-seqlen", "100000"], "C4 documents hold 100000 tokens"),
])
def test_cli_bad_input(args, message, models, tmp_path, capsys):
    src, _ = models["llama"]
    assert main(["compress", str(src), "-o", str(tmp_path / "x.elastiq"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.elastiq").exists()


def test_interrupted_compression_leaves_nothing(models, data_dir, tmp_path, monkeypatch):
    src, _ = models["llama"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compress_module, "write_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _compress(src, tmp_path / "m.elastiq", data_dir)
    assert list(tmp_path.iterdir()) == []


def test_output_must_be_an_elastiq_folder(models, data_dir, tmp_path):
    from elastiq import ElastiqError

    with pytest.raises(ElastiqError, match=r"must be a folder named \*.elastiq"):
        _compress(models["llama"][0], tmp_path / "m.safetensors", data_dir)
