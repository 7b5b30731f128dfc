"""`elastiq export`: each format written through the command line, and bad input refused cleanly."""

from __future__ import annotations

import pytest

from elastiq.cli import main
from elastiq.compressor.compress import CompressOptions, compress


@pytest.fixture(scope="module")
def checkpoint(models, data_dir, tmp_path_factory):
    options = CompressOptions(rates=(0.35,), calib_samples=4, calib_seqlen=32)
    return compress(models["llama"][0], tmp_path_factory.mktemp("c") / "c.elastiq", options, data=data_dir,
                    progress=False)


@pytest.mark.parametrize("fmt,name", [("onnx", "m.onnx"), ("hf", "hf-dir"), ("gguf", "m.gguf")])
def test_export_writes_each_format(fmt, name, checkpoint, tmp_path, capsys):
    out = tmp_path / name
    assert main(["export", str(checkpoint), "--rate", "0.35", "--format", fmt, "-o", str(out)]) == 0
    assert out.exists() and (out.is_dir() or out.stat().st_size > 0)
    assert f"({fmt}, rate 0.35, " in capsys.readouterr().err


def test_export_refuses_an_unoffered_rate_and_leaves_nothing(checkpoint, tmp_path, capsys):
    assert main(["export", str(checkpoint), "--rate", "0.2", "--format", "onnx", "-o", str(tmp_path / "x.onnx")]) == 2
    assert "rate 0.2 is not offered" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit):
        main(["export", str(checkpoint), "--rate", "0.35", "--format", "tflite", "-o", str(tmp_path / "x")])
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
