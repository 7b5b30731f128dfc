"""Mamba2 checkpoints exported: GGUF for llama.cpp's ``mamba2``, stock Hugging Face ``Mamba2ForCausalLM``,
and ONNX's refusal (tiny random models; the trained stand-in is measured in benchmarks/ssm_standin.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_mamba2 import build_mamba2, ids, mamba2_checkpoint, mamba2_folder  # noqa: F401

from elastiq.exporters.gguf import ExportError, write_gguf
from elastiq.exporters.hf import write_hf
from elastiq.exporters.onnx import OnnxExportError, write_onnx
from elastiq.exporters.padding import ssm_widest
from elastiq.families import family_for
from elastiq.modeling.model import ModelArgs, Transformer, runtime_weights


def widths(ckpt, rate: float) -> dict[str, set[int]]:
    w = ckpt.rate_entry(rate)["widths"]
    return {kind: {v for k, v in w.items() if k.endswith(kind)} for kind in ("ssm_p", "ssm_n")}


def exact_rates(ckpt) -> list[float]:
    """The rates whose every block keeps the same channels per head: llama.cpp and transformers
    hold them exactly (states are widened with zeros, which is exact)."""
    return [r for r in ckpt.rates if len(widths(ckpt, r)["ssm_p"]) == 1]


def widened(ckpt, rate: float) -> Transformer:
    """The runtime's model of ``rate`` with every block widened as the exports widen it."""
    weights = runtime_weights(ckpt.read_rate(rate), ckpt.config)
    wide, _, _ = ssm_widest(weights, ModelArgs.from_weights(weights, ckpt.config))
    family = family_for(ckpt.config)
    return Transformer.from_weights({family.checkpoint_name(k): v for k, v in wide.items()}, ckpt.config)


def test_the_fixture_has_rates_of_both_kinds(mamba2_checkpoint):
    exact = exact_rates(mamba2_checkpoint)
    assert 0.0 in exact and len(exact) < len(mamba2_checkpoint.rates)
    assert any(len(widths(mamba2_checkpoint, r)["ssm_n"]) > 1 for r in exact)  # states widened with zeros


@torch.no_grad()
def test_llama_cpp_runs_every_rate(mamba2_checkpoint, ids, tmp_path):
    """At rates of one head size llama.cpp's mamba2 gives the runtime's logits (F32 file: 1e-4 of
    the largest logit) and greedy tokens; where blocks were widened, it gives the widened model's."""
    llama_cpp = pytest.importorskip("llama_cpp")
    ckpt, tokens = mamba2_checkpoint, ids[0, :40].tolist()
    for rate in ckpt.rates:
        llm = llama_cpp.Llama(str(write_gguf(ckpt.path, rate, tmp_path / f"{rate}.gguf", float_type="f32")),
                              n_ctx=128, n_threads=2, n_batch=128, logits_all=True, verbose=False)
        llm.eval(tokens)
        scores = torch.from_numpy(np.asarray(llm.scores[:len(tokens)]))
        model = Transformer.from_weights(ckpt.read_rate(rate), ckpt.config)
        reference = (model if rate in exact_rates(ckpt) else widened(ckpt, rate))(torch.tensor([tokens]))[0]
        assert (scores - reference).abs().max() <= 1e-4 * reference.abs().max(), rate
        if rate in exact_rates(ckpt):  # one token at a time through llama.cpp's recurrent state
            llm.reset()
            llm.eval(tokens[:20])
            steps = []
            for token in tokens[20:30]:
                llm.eval([token])
                steps.append(np.asarray(llm.scores[llm.n_tokens - 1]))
            assert np.abs(np.stack(steps) - reference[20:30].numpy()).max() <= 1e-4 * reference.abs().max()


@torch.no_grad()
def test_stock_transformers_loads_every_rate(mamba2_checkpoint, ids, tmp_path):
    from transformers import Mamba2ForCausalLM

    ckpt = mamba2_checkpoint
    for rate in ckpt.rates:
        model = Mamba2ForCausalLM.from_pretrained(write_hf(ckpt.path, rate, tmp_path / str(rate))).eval()
        assert model.config.state_size == max(widths(ckpt, rate)["ssm_n"])
        assert model.config.head_dim == max(widths(ckpt, rate)["ssm_p"])
        got = model(ids).logits
        reference = (Transformer.from_weights(ckpt.read_rate(rate), ckpt.config) if rate in exact_rates(ckpt)
                     else widened(ckpt, rate))(ids)
        assert (got - reference).abs().max() <= 1e-4 * reference.abs().max(), rate


def test_what_cannot_be_exported_is_refused(mamba2_checkpoint, tokenizer, data_dir, tmp_path):
    from elastiq.compressor.compress import CompressOptions, compress

    with pytest.raises(OnnxExportError, match="a mamba2 model has Mamba2 blocks.*GGUF"):
        write_onnx(mamba2_checkpoint.path, 0.0, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    folder = tmp_path / "biased"
    build_mamba2(len(tokenizer), use_bias=True).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    biased = compress(folder, tmp_path / "b.elastiq", CompressOptions(rates=(), calib_samples=2, calib_seqlen=32,
                                                                    quality_windows=0), data=data_dir, progress=False)
    with pytest.raises(ExportError, match="no biases on its input and output projections"):
        write_gguf(biased, 0.0, tmp_path / "b.gguf")
    assert not (tmp_path / "b.gguf").exists()
