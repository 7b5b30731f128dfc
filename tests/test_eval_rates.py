"""``elastiq eval`` of a nested checkpoint: each rate measured on torch, llama.cpp and onnxruntime."""

from __future__ import annotations

import json

import pytest
import torch

from elastiq.cli import main
from elastiq.evaluation.rates import evaluate_rates
from elastiq.runtime.backends import open_engine
from elastiq.modeling.model import Transformer

MEASURES = ("wikitext2", "arc_easy", "winogrande")
SMALL = dict(measures=MEASURES, seqlen=128, windows=2, limit=6, progress=False)


def test_engine_logits_equal_the_model_at_each_rate(nested_checkpoints, tokenizer):
    """Right-padded rows score as they would alone, and a switched engine scores as a fresh one."""
    ckpt = nested_checkpoints["llama"]
    engine = open_engine("torch", ckpt, 0.0, 256, scoring=True)
    ids = torch.tensor([tokenizer.encode("The tower is 324 metres tall , about the same height as an 81 storey "
                                         "building .")])
    for rate in (0.0, 0.35):
        engine.set_rate(rate)
        fresh = open_engine("torch", ckpt, rate, 256, scoring=True).logits(ids)
        reference = Transformer.from_weights(ckpt.read_rate(rate), ckpt.config)(ids)
        padded = torch.cat([ids, torch.cat([ids[:, :5], torch.zeros(1, ids.shape[1] - 5, dtype=torch.long)], 1)])
        logits = engine.logits(padded)
        assert torch.equal(logits[0], fresh[0])
        # the engine sums the output projection's inputs in unit order, the reference in head order
        torch.testing.assert_close(logits[0], reference[0].float(), rtol=1e-5, atol=1e-5)
        assert torch.allclose(logits[1, :5], reference[0, :5], atol=1e-5)


@pytest.mark.parametrize("backend, tolerance", [("onnxruntime", 1e-4), ("llama.cpp", 0.05)])
def test_backends_measure_what_torch_measures(backend, tolerance, nested_checkpoints):
    """The float checkpoint at every rate: onnxruntime computes in float32 as torch does; llama.cpp
    holds F16 weights, f16 KV and rounds matmul inputs to 8 bits, so its NLL is close, not equal."""
    pytest.importorskip({"onnxruntime": "onnxruntime", "llama.cpp": "llama_cpp"}[backend])
    ckpt = nested_checkpoints["llama"]
    torch_results = evaluate_rates(ckpt, ckpt.rates, "torch", **SMALL)
    other = evaluate_rates(ckpt, ckpt.rates, backend, **SMALL)
    assert other["backend"] == backend and list(other["rates"]) == ["0.0", "0.15", "0.35"]
    for rate, ours in torch_results["rates"].items():
        theirs = other["rates"][rate]
        assert theirs["weight_bytes"] == ours["weight_bytes"] == ckpt.rate_entry(float(rate))["weight_bytes"]
        assert theirs["wikitext2"]["windows"] == 2 and theirs["tasks"]["arc_easy"]["n"] == 6
        for a, b in zip(theirs["wikitext2"]["window_nll"], ours["wikitext2"]["window_nll"]):
            assert abs(a - b) < tolerance * abs(b)
    nll = [r["wikitext2"]["nll"] for r in torch_results["rates"].values()]
    assert len(set(nll)) == 3  # each rate is its own model


def test_cli_eval_of_a_checkpoint(nested_checkpoints, tmp_path, capsys):
    ckpt = nested_checkpoints["llama-q4"]
    out = tmp_path / "eval.json"
    args = ["eval", str(ckpt.path), "--rate", "0,0.35", "--tasks", "wikitext2,piqa", "--limit", "4",
            "--seqlen", "64", "-o", str(out)]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "| rate | weights MB | WikiText-2 ppl (4 × 64 tokens) | piqa acc % (n=4) |" in table
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| 0.")]
    assert rows == ["0.0", "0.35"]
    saved = json.loads(out.read_text())
    assert saved["backend"] == "torch" and saved["weights"] == "q4_0" and saved["activations"] == "bfloat16"
    assert saved["command"] == "elastiq " + " ".join(args[0:])
    assert out.with_suffix(".md").read_text() == table.rstrip("\n") + "\n"
    assert saved["rates"]["0.35"]["wikitext2"]["ppl"] == pytest.approx(
        float(table.splitlines()[5].split("|")[3].split()[0]), abs=0.006)


@pytest.mark.parametrize("args, message", [
    (["--rate", "0.2"], "rate 0.2 is not offered by llama-q4.elastiq; offered: 0.0, 0.15, 0.35"),
    (["--seqlen", "4096"], "--seqlen 4096 is longer than the 256 positions the model was trained for"),
    (["--tasks", "wikitext2,mmlu"], "unknown task 'mmlu'; known tasks: arc_easy"),
])
def test_cli_eval_refuses_bad_input(args, message, nested_checkpoints, capsys):
    assert main(["eval", str(nested_checkpoints["llama-q4"].path), "--limit", "2", *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_eval_rate_must_be_fractions(nested_checkpoints, capsys):
    with pytest.raises(SystemExit):
        main(["eval", str(nested_checkpoints["llama-q4"].path), "--rate", "zero"])
    assert "rates are comma-separated fractions like 0.15,0.25, got 'zero'" in capsys.readouterr().err


def test_divergence_is_llama_cpp_kl():
    """KL(reference || model) per token, its 99th percentile and top-1 agreement, against torch's kl_div."""
    from elastiq.divergence import Divergence

    torch.manual_seed(0)
    ref, other = torch.randn(2, 50, 7), torch.randn(2, 50, 7)
    d = Divergence()
    for r, o in zip(ref, other):
        d.add(r, o)
    s = d.summary()
    per_token = torch.nn.functional.kl_div(other.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                           reduction="none").sum(-1).flatten().double()
    assert s["tokens"] == 100 and s["kl_mean"] == pytest.approx(per_token.mean().item(), rel=1e-6)
    assert s["kl_p99"] == pytest.approx(torch.quantile(per_token, 0.99).item(), rel=1e-6)
    assert s["top1_agreement"] == (ref.argmax(-1) == other.argmax(-1)).double().mean().item()
    same = Divergence()
    same.add(ref[0], ref[0])
    assert same.summary()["kl_mean"] == 0 and same.summary()["top1_agreement"] == 1


def test_cli_eval_kl_to_a_reference(nested_checkpoints, tmp_path, capsys):
    """Each rate of the 4-bit checkpoint against the float checkpoint it was quantized from; the float
    checkpoint against itself is exact."""
    q4, dense = nested_checkpoints["llama-q4"], nested_checkpoints["llama"]
    common = ["--tasks", "wikitext2", "--windows", "2", "--seqlen", "128"]
    assert main(["eval", str(dense.path), "--rate", "0", "--kl-reference", str(dense.path), *common,
                 "-o", str(tmp_path / "self.json")]) == 0
    same = json.loads((tmp_path / "self.json").read_text())["rates"]["0.0"]["wikitext2"]["divergence"]
    assert same["kl_mean"] < 1e-6 and same["top1_agreement"] == 1.0 and same["tokens"] == 2 * 127
    capsys.readouterr()
    assert main(["eval", str(q4.path), "--kl-reference", str(dense.path), *common, "-o", str(tmp_path / "q.json")]) == 0
    table = capsys.readouterr().out
    assert "| KL to reference (mean ± se / p99) | same top-1 % |" in table
    assert f"reference `{dense.path}`" in table
    kl = {r: v["wikitext2"]["divergence"]["kl_mean"]
          for r, v in json.loads((tmp_path / "q.json").read_text())["rates"].items()}
    assert 1e-6 < kl["0.0"] < kl["0.35"]


def test_cli_eval_kl_reference_needs_wikitext2_and_one_vocabulary(nested_checkpoints, tokenizer, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    ckpt = str(nested_checkpoints["llama-q4"].path)
    assert main(["eval", ckpt, "--tasks", "piqa", "--kl-reference", ckpt]) == 2
    assert "--kl-reference measures KL divergence on the WikiText-2 windows: add wikitext2" in capsys.readouterr().err
    other = tmp_path / "other"
    AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer) + 64)).save_pretrained(other)
    tokenizer.save_pretrained(other)
    assert main(["eval", ckpt, "--tasks", "wikitext2", "--kl-reference", str(other)]) == 2
    assert f"vocabulary of {len(tokenizer) + 64} tokens and the model measured {len(tokenizer)}" in \
        capsys.readouterr().err
