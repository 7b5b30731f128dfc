"""`elastiq export`: each format written through the command line, and bad input refused cleanly."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from elastiq.cli import main
from elastiq.compressor.compress import CompressOptions, compress


@pytest.fixture(scope="module")
def checkpoint(models, data_dir, tmp_path_factory):
    options = CompressOptions(rates=(0.35,), calib_samples=4, calib_seqlen=32)
    return compress(models["llama"][0], tmp_path_factory.mktemp("c") / "c.elastiq", options, data=data_dir,
                    progress=False)


def _modes(path: Path) -> set[tuple[str, int]]:
    """(kind, permission bits) of ``path`` and everything under it."""
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    return {("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)) for p in paths}


@pytest.mark.parametrize("fmt,name", [("onnx", "m.onnx"), ("hf", "hf-dir"), ("gguf", "m.gguf")])
def test_export_writes_each_format(fmt, name, checkpoint, tmp_path, capsys):
    out = tmp_path / name
    old = os.umask(0o022)
    try:
        assert main(["export", str(checkpoint), "--rate", "0.35", "--format", fmt, "-o", str(out)]) == 0
    finally:
        os.umask(old)
    assert out.exists() and (out.is_dir() or out.stat().st_size > 0)
    assert f"({fmt}, rate 0.35, " in capsys.readouterr().err
    # what any file the user creates gets under umask 022, not the temporary file's owner-only mode
    assert _modes(out) <= {("dir", 0o755), ("file", 0o644)}
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_checkpoints_get_the_permissions_of_the_users_files(models, data_dir, tmp_path):
    for umask, expected in ((0o022, {("dir", 0o755), ("file", 0o644)}), (0o077, {("dir", 0o700), ("file", 0o600)})):
        old = os.umask(umask)
        try:
            path = compress(models["llama"][0], tmp_path / f"u{umask:o}.elastiq",
                            CompressOptions(rates=(0.35,), calib_samples=2, calib_seqlen=32, quality_windows=1),
                            data=data_dir, progress=False)
        finally:
            os.umask(old)
        assert _modes(path) == expected


def test_atomic_path_leaves_nothing_when_the_write_fails(tmp_path):
    from elastiq.atomic import atomic_path

    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "old.txt").write_text("old")
    for directory, target in ((True, tmp_path / "keep"), (False, tmp_path / "file.bin")):
        with pytest.raises(RuntimeError):
            with atomic_path(target, directory=directory) as tmp:
                (tmp / "half.txt" if directory else tmp).write_text("half")
                raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"] and (tmp_path / "keep" / "old.txt").exists()
    with atomic_path(tmp_path / "keep", directory=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in (tmp_path / "keep").iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]


def test_export_refuses_an_unoffered_rate_and_leaves_nothing(checkpoint, tmp_path, capsys):
    assert main(["export", str(checkpoint), "--rate", "0.2", "--format", "onnx", "-o", str(tmp_path / "x.onnx")]) == 2
    assert "rate 0.2 is not offered" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit):
        main(["export", str(checkpoint), "--rate", "0.35", "--format", "tflite", "-o", str(tmp_path / "x")])
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
