"""``elastiq eval`` of a nested checkpoint: each rate measured on torch, llama.cpp and onnxruntime."""

from __future__ import annotations

import json

import pytest
import torch

from elastiq.cli import main
from elastiq.evaluation.rates import evaluate_rates
from elastiq.runtime.backends import open_engine
from elastiq.runtime.model import Transformer

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
        reference = Transformer.from_weights(ckpt.read_rate(rate), ckpt.manifest["source"]["config"])(ids)
        padded = torch.cat([ids, torch.cat([ids[:, :5], torch.zeros(1, ids.shape[1] - 5, dtype=torch.long)], 1)])
        logits = engine.logits(padded)
        assert torch.equal(logits[0], reference[0].float())
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
