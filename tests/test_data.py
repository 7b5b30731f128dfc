"""The data elastiq carries: found without anything beside the clone, unchanged, and overridable."""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import pytest

import elastiq
from elastiq import ElastiqError
from elastiq.paths import DATA_ENV, PACKAGED_DATA, data_dir

ROOT = Path(__file__).resolve().parent.parent


def _listed_sums() -> dict[str, str]:
    """The sha256 sums that the data's README lists, by file."""
    text = (PACKAGED_DATA / "README.md").read_text(encoding="utf-8")
    return {name: digest for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+)$", text, re.MULTILINE)}


def test_packaged_data_is_found_and_unchanged(monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    assert data_dir() == PACKAGED_DATA
    assert PACKAGED_DATA.parent == Path(elastiq.__file__).resolve().parent  # inside the installed package
    sums = _listed_sums()
    files = {str(p.relative_to(PACKAGED_DATA)) for p in PACKAGED_DATA.rglob("*") if p.is_file()} - {"README.md"}
    assert files == set(sums) and len(sums) == 8
    for name, digest in sums.items():
        assert hashlib.sha256((PACKAGED_DATA / name).read_bytes()).hexdigest() == digest, name


def test_environment_overrides_the_packaged_data(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert data_dir() == tmp_path
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(ElastiqError, match=r"ELASTIQ_DATA points to .*nowhere, which is not a directory"):
        data_dir()


def test_nothing_points_outside_the_repository():
    """No source, test, benchmark or document reads or cites the folder that development machines keep
    beside the clone (a user has only the clone)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "*.py", "*.md", "*.toml", ".ci/*"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert "elastiq/paths.py" in files
    offenders = [f for f in files if re.search(r"\.\./shared|shared/(data|DESIGN)|DESIGN\.md",
                                               (ROOT / f).read_text(encoding="utf-8"))
                 and f != "tests/test_data.py"]
    assert offenders == []
