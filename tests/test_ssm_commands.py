"""The commands a user runs, end to end, on each family with Mamba2 blocks (Mamba2, Nemotron-H,
Bamba, Falcon-H1): ``compress`` in one pass (calibrate, sort, allocate, nested recovery, GPTQ),
``recover`` and ``quantize`` apart, ``inspect``, ``run``, ``chat`` with a rate switch, and
``export`` to GGUF and Hugging Face (tiny random models, built offline)."""

from __future__ import annotations

import io

import pytest
from test_bamba import build_bamba
from test_falcon_h1 import build_falcon_h1
from test_mamba2 import build_mamba2
from test_nemotron_h import build_nemotron_h

from elastiq.checkpoint import Checkpoint
from elastiq.cli import main

BUILDERS = {"mamba2": build_mamba2, "nemotron_h": build_nemotron_h, "bamba": build_bamba, "falcon_h1": build_falcon_h1}
GGUF = {"mamba2": "mamba2", "nemotron_h": "nemotron_h", "bamba": "granitehybrid", "falcon_h1": "falcon-h1"}
SMALL = ["--calib-samples", "4", "--calib-seqlen", "32", "--quality-windows", "1"]
RUNTIME = ["--max-new-tokens", "3", "--ctx", "64", "--backend", "torch", "--max-kl", "inf"]


@pytest.mark.parametrize("family", BUILDERS)
def test_every_command_runs_on_the_family(family, tokenizer, tmp_path, capsys, monkeypatch):
    import gguf

    source = tmp_path / "source"
    BUILDERS[family](len(tokenizer)).save_pretrained(source)
    tokenizer.save_pretrained(source)
    ckpt = tmp_path / "m.elastiq"
    assert main(["compress", str(source), "-o", str(ckpt), "--rates", "0.15,0.35", "--recover-steps", "2",
                 *SMALL]) == 0
    manifest = Checkpoint(ckpt).manifest
    assert manifest["quantization"] is not None and manifest["source"]["recovery"]["steps"] == 2
    assert Checkpoint(ckpt).rates == [0.0, 0.15, 0.35]

    sorted_float = tmp_path / "sorted.elastiq"
    assert main(["compress", str(source), "-o", str(sorted_float), "--rates", "0.25", "--no-recover",
                 "--no-quantize", *SMALL]) == 0
    recovered = tmp_path / "recovered.elastiq"
    assert main(["recover", str(sorted_float), "-o", str(recovered), "--steps", "2", "--batch", "2", "--seqlen", "32",
                 "--samples", "4"]) == 0
    assert main(["quantize", str(recovered), "-o", str(tmp_path / "q4.elastiq"), "--calib-samples", "4",
                 "--calib-seqlen", "32"]) == 0
    assert Checkpoint(tmp_path / "q4.elastiq").manifest["quantization"] is not None
    capsys.readouterr()

    assert main(["inspect", str(ckpt)]) == 0
    assert "0.35" in capsys.readouterr().out
    assert main(["run", str(ckpt), "--prompt", "Hello", "--rate", "0.35", *RUNTIME]) == 0
    assert "loaded rate 0.35" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n/rate 0.35\nHow are you\n/quit\n"))
    assert main(["chat", str(ckpt), "--rate", "0", *RUNTIME]) == 0
    assert "rate 0.0 -> 0.35" in capsys.readouterr().out

    assert main(["export", str(ckpt), "--rate", "0.35", "--format", "gguf", "-o", str(tmp_path / "m.gguf")]) == 0
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["general.architecture"].contents() == GGUF[family]
    assert main(["export", str(ckpt), "--rate", "0.35", "--format", "hf", "-o", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
