"""Recovery fine-tuning: masks equal slices, LoRA merged back into a valid nested checkpoint,
resume, LoRAShear's re-sorted units, bad input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from elastiq.checkpoint import Checkpoint, CheckpointError
from elastiq.cli import main
from elastiq.compressor.calibrate import C4_SAMPLE, calibration_samples
from elastiq.compressor.compress import CompressOptions, compress
from elastiq.compressor.quantize import QuantizeOptions, quantize_checkpoint
from elastiq.compressor.recover import (RecoverError, RecoverOptions, UnitMasks, lora_model, rate_probabilities,
                                        recover, recover_checkpoint, source_weights, state_dir, width_units)
from elastiq.modeling.model import Transformer
from conftest import TEXT, masked_weights

RATES = (0.15, 0.35)


@pytest.fixture(scope="module")
def checkpoints(models, data_dir, tmp_path_factory):
    """Float checkpoints of the tiny Llama and Qwen2 (with biases) offering rates 0, 0.15, 0.35."""
    options = CompressOptions(rates=RATES, calib_samples=4, calib_seqlen=32)
    return {family: compress(models[family][0], tmp_path_factory.mktemp(family) / "f.elastiq", options,
                             data=data_dir, progress=False) for family in ("llama", "qwen2")}


def _options(**kwargs) -> RecoverOptions:
    settings = dict(steps=8, lr=1e-2, rank=4, alpha=8.0, batch=4, seqlen=32, samples=16, heldout=2, save_every=2,
                    bf16=False)  # bf16 autocast is slower than float32 on matrices this small
    return RecoverOptions(**{**settings, **kwargs})


def _ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer.encode(TEXT)])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_masked_full_model_equals_every_slice(family, checkpoints, tokenizer):
    ckpt = Checkpoint(checkpoints[family])
    config, ids = ckpt.config, _ids(tokenizer)
    plain = Transformer.from_weights(ckpt.read_rate(0.0), config)
    wrapped = lora_model(ckpt.read_rate(0.0), config, rank=4, alpha=8.0, seed=0)  # LoRA B starts at zero
    with torch.no_grad():
        for model in (plain, wrapped):
            masks = UnitMasks(model, ckpt.groups, ckpt.heads)
            full = model(ids)
            for rate in (0.0, *RATES):
                masks.set(width_units(ckpt.groups, ckpt.heads, ckpt.rate_entry(rate)["widths"]))
                sliced = Transformer.from_weights(ckpt.read_rate(rate), config)(ids)
                assert (model(ids) - sliced).abs().max() < 1e-4, rate
            masks.set(None)
            assert torch.equal(model(ids), full)
            masks.remove()
            assert torch.equal(model(ids), full)


@pytest.fixture(scope="module")
def nested(checkpoints, data_dir, tmp_path_factory):
    """Nested LoRA with the next-token loss and distillation from the dense model, in bf16
    autocast, on the Qwen2 checkpoint."""
    options = _options(distill=1.0, lm_weight=1.0, bf16=True)
    out = recover_checkpoint(checkpoints["qwen2"], tmp_path_factory.mktemp("r") / "r.elastiq", options,
                             data=data_dir, progress=False)
    return out, options


def _loss(ckpt: Checkpoint, rate: float, windows: torch.Tensor) -> float:
    model = Transformer.from_weights(ckpt.read_rate(rate), ckpt.config)
    with torch.no_grad():
        logits = model(windows)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten()).item()


def test_training_lowers_the_loss_at_every_rate(nested, checkpoints, tokenizer, data_dir):
    out, options = nested
    before, after = Checkpoint(checkpoints["qwen2"]), Checkpoint(out)
    windows = calibration_samples(tokenizer, data_dir / C4_SAMPLE, options.samples, options.seqlen, options.seed)
    for rate in (0.0, *RATES):
        old, new = _loss(before, rate, windows), _loss(after, rate, windows)
        assert new < old - 0.05, (rate, old, new)


def test_output_keeps_the_contract(nested, checkpoints, tokenizer):
    out, options = nested
    before, after = Checkpoint(checkpoints["qwen2"]), Checkpoint(out)
    assert after.groups == before.groups and after.rates == before.rates
    for row, old in zip(after.manifest["rates"], before.manifest["rates"]):
        assert row["widths"] == old["widths"] and row["weight_bytes"] == old["weight_bytes"]
    full, original = after.read_rate(0.0), before.read_rate(0.0)
    assert torch.equal(full["model.layers.1.self_attn.rope_pairs"], original["model.layers.1.self_attn.rope_pairs"])
    assert not torch.equal(full["model.layers.1.mlp.down_proj.weight"], original["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(full["model.embed_tokens.weight"], original["model.embed_tokens.weight"])  # no LoRA there
    config, ids = after.config, _ids(tokenizer)
    with torch.no_grad():
        for rate in RATES:
            sliced = Transformer.from_weights(after.read_rate(rate), config)(ids)
            masked = Transformer.from_weights(masked_weights(full, after, rate), config)(ids)
            assert (sliced - masked).abs().max() < 1e-4, rate
    recovery = after.manifest["source"]["recovery"]
    assert recovery["method"] == "nested" and recovery["distill"] == 1.0 and recovery["steps"] == 8
    assert recovery["tokens"] == 8 * 4 * 32
    assert recovery["rate_probabilities"] == {"0.0": 1 / 6, "0.15": 2 / 6, "0.35": 3 / 6}
    assert not state_dir(out).exists()


def test_merged_model_equals_the_unmerged_lora_model(nested, checkpoints, tokenizer, data_dir):
    out, options = nested
    ckpt, written = Checkpoint(checkpoints["qwen2"]), Checkpoint(out)
    result = recover(ckpt, options, data_dir, progress=False)  # the same run, un-merged model kept
    config, ids = ckpt.config, _ids(tokenizer)
    merged = Transformer.from_weights(result.weights, config)
    lora_masks, merged_masks = UnitMasks(result.model, ckpt.groups, ckpt.heads), UnitMasks(merged, ckpt.groups, ckpt.heads)
    with torch.no_grad():
        for rate in (0.0, *RATES):
            units = width_units(ckpt.groups, ckpt.heads, ckpt.rate_entry(rate)["widths"])
            lora_masks.set(units)
            merged_masks.set(units)
            reference = result.model(ids)
            assert (merged(ids) - reference).abs().max() < 1e-4, rate
            sliced = Transformer.from_weights(written.read_rate(rate), config)(ids)
            assert (sliced - reference).abs().max() < 1e-4, rate


@pytest.mark.parametrize("method", ["nested", "lorashear"])
def test_resume_after_interruption_gives_the_same_weights(method, checkpoints, data_dir, tmp_path, monkeypatch):
    options = dict(method=method, rate=0.25, prune_periods=2)
    whole = Checkpoint(recover_checkpoint(checkpoints["llama"], tmp_path / "a.elastiq", _options(**options),
                                          data=data_dir, progress=False))
    step, calls = torch.optim.AdamW.step, []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    out = tmp_path / "b.elastiq"
    monkeypatch.setattr(torch.optim.AdamW, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        recover_checkpoint(checkpoints["llama"], out, _options(**options), data=data_dir, progress=False)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    assert not out.exists()
    assert json.loads((state_dir(out) / "state.json").read_text())["step"] == 4
    with pytest.raises(RecoverError, match="holds the state of a run with other settings \\(lr differ\\)"):
        recover_checkpoint(checkpoints["llama"], out, _options(lr=1e-3, **options), data=data_dir, progress=False)
    resumed = Checkpoint(recover_checkpoint(checkpoints["llama"], out, _options(**options), data=data_dir,
                                            progress=False))
    assert not state_dir(out).exists()
    a, b = whole.read_rate(0.0), resumed.read_rate(0.0)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lorashear_offers_its_rate_with_the_kept_units_first(checkpoints, tokenizer, data_dir, tmp_path):
    ckpt = Checkpoint(checkpoints["qwen2"])
    options = _options(method="lorashear", rate=0.25, prune_periods=2, distill=0.5)
    result = recover(ckpt, options, data_dir, progress=False)
    out = Checkpoint(recover_checkpoint(ckpt.path, tmp_path / "s.elastiq", options, data=data_dir, progress=False))
    assert out.rates == [0.0, 0.25]
    widths = out.rate_entry(0.25)["widths"]
    for g in ckpt.groups:
        kept = result.keep[g.name]
        assert (kept.sum(0) == widths[g.name]).all(), g.name  # the same count in every KV head
    assert any(not result.keep[g.name][:widths[g.name]].all() for g in ckpt.groups)  # the sort order did change
    config, ids = ckpt.config, _ids(tokenizer)
    trained = Transformer.from_weights(result.weights, config)
    masks = UnitMasks(trained, ckpt.groups, ckpt.heads)
    with torch.no_grad():
        full = trained(ids)
        assert (Transformer.from_weights(out.read_rate(0.0), config)(ids) - full).abs().max() < 1e-4
        masks.set({name: k.float() for name, k in result.keep.items()})
        pruned = trained(ids)
        assert (Transformer.from_weights(out.read_rate(0.25), config)(ids) - pruned).abs().max() < 1e-4
    recovery = out.manifest["source"]["recovery"]
    assert recovery["method"] == "lorashear" and recovery["rate"] == 0.25 and "rate_probabilities" not in recovery


def test_draws():
    assert rate_probabilities([0.35, 0.0, 0.15]) == {0.0: 1 / 6, 0.15: 2 / 6, 0.35: 3 / 6}
    weights = source_weights({"c4": 2.0, "chat": 4.0}, {"c4": 3.0, "chat": 5.0})  # +50 % and +25 %
    assert weights == pytest.approx({"c4": 2 / 3, "chat": 1 / 3}, abs=1e-12)
    assert source_weights({"c4": 2.0}, {"c4": 1.0}) == {"c4": 1.0}


def test_bad_input_is_refused(checkpoints, data_dir, tmp_path):
    src, out = checkpoints["llama"], tmp_path / "x.elastiq"
    cases = [
        (_options(steps=0), "steps must be a positive integer, got 0"),
        (_options(method="lorashear", rate=0.0), r"LoRAShear's rate must lie in \(0, 0.9\), got 0.0"),
        (_options(method="lorashear", rate=0.9), r"LoRAShear's rate must lie in \(0, 0.9\), got 0.9"),
        (_options(method="lorashear", steps=3), "LoRAShear needs at least prune_periods \\+ 2 = 5 steps"),
        (_options(method="prune"), "unknown recovery method 'prune'; known: nested, lorashear"),
    ]
    for options, message in cases:
        with pytest.raises(RecoverError, match=message):
            recover_checkpoint(src, out, options, data=data_dir, progress=False)
    with pytest.raises(RecoverError, match="training data .*c4_validation_2k.parquet is missing"):
        recover_checkpoint(src, out, _options(), data=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="is not a nested checkpoint"):
        recover_checkpoint(tmp_path / "none.elastiq", out, _options(), data=data_dir, progress=False)
    with pytest.raises(RecoverError, match="exists; pass --overwrite"):
        recover_checkpoint(src, src, _options(), data=data_dir, progress=False)
    quantized = quantize_checkpoint(src, tmp_path / "q.elastiq", QuantizeOptions(method="rtn", calib_samples=2,
                                                                                 calib_seqlen=32), data=data_dir,
                                    progress=False)
    with pytest.raises(RecoverError, match="is quantized \\(q4_0\\); recover the float checkpoint"):
        recover_checkpoint(quantized, out, _options(), data=data_dir, progress=False)
    assert not out.exists() and not state_dir(out).exists()


def test_cli_recover(checkpoints, tmp_path, capsys):
    out = tmp_path / "cli.elastiq"
    args = ["recover", str(checkpoints["llama"]), "-o", str(out), "--steps", "2", "--batch", "2", "--seqlen", "32",
            "--samples", "4", "--rank", "2"]
    assert main(args) == 0
    assert "| 0.35 |" in capsys.readouterr().out
    assert Checkpoint(out).manifest["source"]["recovery"]["rank"] == 2
    assert main(args + ["--overwrite", "--method", "lorashear", "--rate", "0.95"]) == 2
    assert "LoRAShear's rate must lie in (0, 0.9), got 0.95" in capsys.readouterr().err


def test_dense_teacher_is_the_frozen_starting_model(checkpoints, tokenizer):
    """Distilling from the dense model (the LoRA model with its LoRA layers off): the loss is
    KL(dense || masked rate) against the weights the training started from, whatever LoRA has
    learnt since; with LoRA at zero, rate 0 has nothing to learn."""
    from elastiq.compressor.recover import _loss, adapters_off, lora_layers
    from elastiq.families import family_for

    ckpt = Checkpoint(checkpoints["llama"])
    weights, config, ids = ckpt.read_rate(0.0), ckpt.config, _ids(tokenizer)
    options = _options(distill=1.0, temperature=1.0, lm_weight=0.0)
    model = lora_model(weights, config, rank=4, alpha=8.0, seed=0)
    teacher = lora_layers(model, family_for(config))
    masks = UnitMasks(model, ckpt.groups, ckpt.heads)
    units = width_units(ckpt.groups, ckpt.heads, ckpt.rate_entry(0.35)["widths"])

    def kl_to_dense(rate):
        with torch.no_grad():
            dense = Transformer.from_weights(weights, config)(ids)[0].log_softmax(-1)
            sliced = Transformer.from_weights(ckpt.read_rate(rate), config)(ids)[0].log_softmax(-1)
        return (dense.exp() * (dense - sliced)).sum(-1).mean().item()

    assert _loss(model, masks, ids, None, options, teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert _loss(model, masks, ids, units, options, teacher).item() == pytest.approx(kl_to_dense(0.35), rel=1e-4)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    _loss(model, masks, ids, units, options, teacher).backward()
    optimizer.step()
    masks.set(None)
    with torch.no_grad(), adapters_off(teacher.values()):
        assert torch.equal(model(ids), Transformer.from_weights(ckpt.read_rate(0.0), config)(ids))
    assert _loss(model, masks, ids, None, options, teacher).item() > 1e-4  # rate 0 has moved off the teacher
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)  # still trained


def test_bf16_defaults_to_what_the_cpu_computes_natively(checkpoints, data_dir, tmp_path):
    from elastiq.compressor.recover import native_bf16

    options = _options(steps=1, bf16=None)
    out = recover_checkpoint(checkpoints["llama"], tmp_path / "b.elastiq", options, data=data_dir, progress=False)
    assert options.bf16 is native_bf16()
    assert Checkpoint(out).manifest["source"]["recovery"]["bf16"] is native_bf16()


@pytest.mark.parametrize("kwargs,message", [
    (dict(teacher="oracle"), "unknown teacher 'oracle'; known: dense, self"),
    (dict(lm_weight=0.0, distill=0.0), r"lm_weight \(0.0\) must be at least 0, and distill \(0.0\) positive when it is 0"),
    (dict(lm_weight=-1.0, distill=1.0), r"lm_weight \(-1.0\) must be at least 0"),
])
def test_bad_distillation_options(kwargs, message, checkpoints, data_dir, tmp_path):
    with pytest.raises(RecoverError, match=message):
        recover_checkpoint(checkpoints["llama"], tmp_path / "x.elastiq", _options(**kwargs), data=data_dir,
                           progress=False)
    assert not (tmp_path / "x.elastiq").exists()
