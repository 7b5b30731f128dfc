"""The whole compressor: sorting keeps the model, every rate is the masked full model, bad input fails."""

from __future__ import annotations

import pytest
import torch

from elastiq.checkpoint import Checkpoint
from elastiq.cli import main
from elastiq.compressor import compress as compress_module
from elastiq.compressor.compress import CompressOptions, compress
from elastiq.modeling.model import Transformer
from conftest import SHIPPED_KIND_WEIGHTS, TEXT, masked_weights


def _compress(src, dest, data_dir, **kwargs):
    options = CompressOptions(rates=(0.15, 0.25, 0.35), calib_samples=4, calib_seqlen=32, **kwargs)
    return compress(src, dest, options, data=data_dir, progress=False)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("method", ["uniql", "magnitude"])
def test_sorted_model_equals_original_and_rates_equal_masked(family, method, models, tokenizer, data_dir, tmp_path):
    src, reference = models[family]
    ckpt = Checkpoint(_compress(src, tmp_path / "m.elastiq", data_dir, method=method))
    config = ckpt.config
    ids = torch.tensor([tokenizer.encode(TEXT)])
    with torch.no_grad():
        full = Transformer.from_weights(ckpt.read_rate(0.0), config)(ids)
        assert (full - reference).abs().max() < 1e-3  # sorting alone does not change the model
        for rate in (0.15, 0.25, 0.35):
            sliced = Transformer.from_weights(ckpt.read_rate(rate), config)(ids)
            masked = Transformer.from_weights(masked_weights(ckpt.read_rate(0.0), ckpt, rate), config)(ids)
            assert (sliced - masked).abs().max() < 1e-4, rate
            assert (sliced - full).abs().max() > 1e-3, rate  # pruning did remove something
    assert ckpt.manifest["source"]["compression"]["method"] == method


def test_influence_and_uniform_allocations_differ(models, data_dir, tmp_path):
    src, _ = models["llama"]
    influence = Checkpoint(_compress(src, tmp_path / "a.elastiq", data_dir)).rate_entry(0.35)["widths"]
    uniform = Checkpoint(_compress(src, tmp_path / "b.elastiq", data_dir, allocation="uniform")).rate_entry(0.35)
    assert uniform["widths"]["layers.0.mlp"] == uniform["widths"]["layers.1.mlp"]
    assert influence != uniform["widths"]


def test_shipped_kind_weights_keep_vo_whole_and_are_recorded(models, data_dir, tmp_path, capsys):
    """The default allocation never cuts a V/O rank, prunes the rotary pairs less than the MLP, and
    records its weights so that allocate_checkpoint gives the same widths again."""
    from elastiq.compressor.allocate import allocate_checkpoint

    src, _ = models["llama"]
    ckpt = Checkpoint(_compress(src, tmp_path / "d.elastiq", data_dir, kind_weights=SHIPPED_KIND_WEIGHTS))
    assert SHIPPED_KIND_WEIGHTS == {"qk": 0.5, "vo": 0.0}
    assert ckpt.manifest["source"]["compression"]["kind_weights"] == SHIPPED_KIND_WEIGHTS
    for spec in allocate_checkpoint(ckpt, [0.15, 0.25, 0.35])[1:]:
        assert spec.widths == ckpt.rate_entry(spec.rate)["widths"]
        assert all(spec.widths[f"layers.{i}.vo"] == 64 for i in range(2))
    every = Checkpoint(_compress(src, tmp_path / "e.elastiq", data_dir, kind_weights={}))
    assert any(every.rate_entry(0.35)["widths"][f"layers.{i}.vo"] < 64 for i in range(2))
    assert main(["inspect", str(ckpt.path)]) == 0
    assert ("pruned: MLP channels, rotary pairs of q/k per KV head; kept whole at every rate: V/O rank per KV head\n"
            in capsys.readouterr().out)


def test_cli_compress_and_inspect(models, tmp_path, capsys):
    src, _ = models["llama"]
    out = tmp_path / "cli.elastiq"
    args = ["compress", str(src), "-o", str(out), "--rates", "0.2,0.4", "--calib-samples", "2", "--calib-seqlen", "32",
            "--no-recover", "--no-quantize"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "| rate | weights MB | of full | KV bytes/token |" in table and "weights: float (not quantized)" in table
    assert [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| 0.")] == ["0.0", "0.2", "0.4"]
    assert main(args) == 2
    assert "exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert main(["inspect", str(out), "--layers"]) == 0
    assert "rate 0.4: layers.0.mlp=" in capsys.readouterr().out


def test_cli_compress_calibrates_on_own_text(models, data_dir, tmp_path, capsys):
    import hashlib

    src, _ = models["llama"]
    text = tmp_path / "notes.txt"
    text.write_text((data_dir / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")[:20000], encoding="utf-8")
    common = ["--rates", "0.3", "--calib-samples", "2", "--calib-seqlen", "32", "--quality-windows", "1",
              "--no-recover", "--no-quantize"]
    assert main(["compress", str(src), "-o", str(tmp_path / "own.elastiq"), "--calib-data", str(text), *common]) == 0
    assert main(["compress", str(src), "-o", str(tmp_path / "c4.elastiq"), *common]) == 0
    own, c4 = (Checkpoint(tmp_path / f"{n}.elastiq").manifest["source"] for n in ("own", "c4"))
    assert own["compression"]["calib_data"] == {"file": "notes.txt",
                                                "sha256": hashlib.sha256(text.read_bytes()).hexdigest()}
    assert c4["compression"]["calib_data"]["file"] == "c4/c4_validation_2k.parquet"
    assert own["block_influence"] != c4["block_influence"]  # the statistics came from the other text

    (tmp_path / "notes.csv").write_text("text\nhello\n")
    out = tmp_path / "bad.elastiq"
    assert main(["compress", str(src), "-o", str(out), "--calib-data", str(tmp_path / "notes.csv"), *common]) == 2
    err = capsys.readouterr().err
    assert "notes.csv: calibration data must be plain text (.txt, .md), JSON lines" in err and "got a .csv file" in err
    assert not out.exists()


@pytest.mark.parametrize("args,message", [
    (["--rates", "0.95"], "rate 0.95 is outside [0, 0.9)"),
    (["--calib-samples", "20000"], "windows of 512 tokens"),  # more than the C4 sample holds
    (["--calib-seqlen", "100000"], "of memory per process"),  # its causal masks alone: 40 GB
    (["--kind-weights", "attn=0.5"], "unknown kind of group 'attn' in the kind weights; known: mlp, qk, vo"),
])
def test_cli_bad_input(args, message, models, tmp_path, capsys):
    src, _ = models["llama"]
    assert main(["compress", str(src), "-o", str(tmp_path / "x.elastiq"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.elastiq").exists()


@pytest.mark.parametrize("weights", ["vo", "qk=half"])
def test_cli_kind_weights_not_kind_equals_weight(weights, models, tmp_path, capsys):
    src, _ = models["llama"]
    with pytest.raises(SystemExit) as stop:
        main(["compress", str(src), "-o", str(tmp_path / "x.elastiq"), "--kind-weights", weights])
    assert stop.value.code == 2
    assert f"kind weights are comma-separated KIND=WEIGHT like qk=0.5,vo=0, got {weights!r}" in capsys.readouterr().err


def test_interrupted_compression_leaves_nothing(models, data_dir, tmp_path, monkeypatch):
    src, _ = models["llama"]

    sort, sorted_blocks = compress_module.sort_block, []

    def interrupted(*args, **kwargs):  # stopped after the first block was written
        if sorted_blocks:
            raise KeyboardInterrupt
        sorted_blocks.append(sort(*args, **kwargs))
        return sorted_blocks[-1]

    monkeypatch.setattr(compress_module, "sort_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _compress(src, tmp_path / "m.elastiq", data_dir)
    assert list(tmp_path.iterdir()) == []


def test_output_must_be_an_elastiq_folder(models, data_dir, tmp_path):
    from elastiq import ElastiqError

    with pytest.raises(ElastiqError, match=r"must be a folder named \*.elastiq"):
        _compress(models["llama"][0], tmp_path / "m.safetensors", data_dir)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_rotated_compression_keeps_the_model(family, models, tokenizer, data_dir, tmp_path):
    src, reference = models[family]
    ckpt = Checkpoint(_compress(src, tmp_path / "r.elastiq", data_dir, rotate=True))
    assert ckpt.manifest["source"]["compression"]["rotation"] is True
    assert ckpt.config["tie_word_embeddings"] is False  # the folded head is its own
    assert ckpt.manifest["aliases"] == {}
    ids = torch.tensor([tokenizer.encode(TEXT)])
    with torch.no_grad():
        full = Transformer.from_weights(ckpt.read_rate(0.0), ckpt.config)(ids)
    assert (full - reference).abs().max() < 1e-3


def test_each_rate_quality_is_measured_on_held_out_windows(models, tokenizer, data_dir, tmp_path, capsys):
    """The rate table records each rate against the dense model, on windows calibration did not see."""
    import math

    from elastiq.compressor.calibrate import C4_SAMPLE, calibration_samples
    from elastiq.compressor.intake import load_model

    src, _ = models["llama"]
    ckpt = Checkpoint(_compress(src, tmp_path / "q.elastiq", data_dir, quality_windows=3))
    drawn = calibration_samples(tokenizer, data_dir / C4_SAMPLE, 4, 32, seed=0, heldout=3)
    assert torch.equal(drawn[:4], calibration_samples(tokenizer, data_dir / C4_SAMPLE, 4, 32, seed=0))
    source = load_model(str(src)).model
    with torch.no_grad():
        nll = torch.cat([torch.nn.functional.cross_entropy(source(w[None]).logits[0, :-1], w[1:], reduction="none")
                         for w in drawn[4:]])
    rows = {r["rate"]: r["quality"] for r in ckpt.manifest["rates"]}
    assert rows[0.0]["tokens"] == 3 * 31 and rows[0.0]["top1_agreement"] == 1.0 and rows[0.0]["kl_mean"] < 1e-6
    assert rows[0.0]["heldout_ppl"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-4)
    for rate in (0.15, 0.35):
        assert rows[rate]["kl_mean"] > 1e-6 and rows[rate]["kl_p99"] >= rows[rate]["kl_mean"], rows
        assert rows[rate]["top1_agreement"] < 1.0
    assert main(["inspect", str(ckpt.path)]) == 0
    out = capsys.readouterr().out
    assert "| held-out ppl | KL to dense (mean / p99) | same top-1 % |" in out and "| 100.0 |" in out
    assert "Quality: 93 held-out calibration tokens per rate" in out
    none = Checkpoint(_compress(src, tmp_path / "n.elastiq", data_dir, quality_windows=0))
    assert all(r["quality"] is None for r in none.manifest["rates"])
