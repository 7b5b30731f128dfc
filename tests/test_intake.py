"""Model intake: each family loads with its exact weights; every bad source gives a clear error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from elastiq.cli import main
from elastiq.compressor.intake import ModelLoadError, gguf_architecture, load_model
from conftest import build_tiny


def _write_gguf(path, arch: str) -> None:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_hf_folder_loads_exact_weights(family, tiny_dirs, tokenizer):
    loaded = load_model(tiny_dirs[family])
    reference = build_tiny(family, tokenizer)
    ids = torch.tensor([tokenizer.encode("The game began development in 2010 .")])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, reference(ids).logits)
    assert loaded.model_type == family
    assert loaded.tokenizer.encode("Robert Boulter") == tokenizer.encode("Robert Boulter")


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match=r"does not exist.*supported: model_type bamba, falcon_h1, gemma3, "
                                             r"gemma3_text, llama, mamba2, mistral, nemotron_h, phi3, qwen2, qwen3 "
                                             r"from"):
        load_model(tmp_path / "nowhere.gguf")


def test_unknown_name():
    with pytest.raises(ModelLoadError, match=r"unknown model name 'gpt-9'.*smollm2-135m"):
        load_model("gpt-9")


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_unreadable_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read .*config.json"):
        load_model(tmp_path)


def test_unsupported_architecture_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match=r"model_type 'gpt2', which elastiq does not support.*qwen2"):
        load_model(tmp_path)


def test_pickled_weights_refused(tmp_path, tiny_dirs):
    (tmp_path / "config.json").write_text((tiny_dirs["llama"] / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelLoadError, match="no .safetensors weights"):
        load_model(tmp_path)


def test_unreadable_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"this is not a gguf file at all")
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        load_model(bad)


def test_gguf_architecture_is_read_from_header(tmp_path):
    _write_gguf(tmp_path / "llama.gguf", "llama")
    assert gguf_architecture(tmp_path / "llama.gguf") == ("llama", None)  # no key_length: hidden size / heads


def test_unsupported_gguf_architecture(tmp_path):
    _write_gguf(tmp_path / "gpt2.gguf", "gpt2")
    with pytest.raises(ModelLoadError, match=r"GGUF architecture 'gpt2', which elastiq does not support.*gemma3, llama, phi3, qwen2, qwen3"):
        load_model(tmp_path / "gpt2.gguf")


def test_cli_reports_error_without_traceback(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("elastiq: error: model path") and "Traceback" not in err
