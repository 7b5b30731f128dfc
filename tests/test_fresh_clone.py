"""A new user's machine: the repository alone, copied into an empty folder, installs and answers.

The copy has nothing beside it (no ``shared`` folder, no data, no cached checkpoint): the README's
first command runs there for real, in a new virtual environment, with an empty ``$ELASTIQ_CACHE``.
The environment sees this interpreter's installed packages (``--system-site-packages``), so torch
and the other dependencies are not downloaded again, exactly as pip would reuse them from its
cache; elastiq itself is installed from the copy, and the test checks that the copy is what runs.
The model wheel comes from pip's cache or the package registry, as on any machine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.fresh_clone

ROOT = Path(__file__).resolve().parent.parent
README_COMMAND = re.compile(r"^(python3 -m pip install -e \. && elastiq run .*)$", re.MULTILINE)


def _copy_repository(dest: Path) -> Path:
    """The repository's files as a clone has them (tracked and not ignored), in ``dest``."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for name in files:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def alone(tmp_path_factory) -> Path:
    """A copy of the repository in a folder of its own: its parent holds nothing else."""
    return _copy_repository(tmp_path_factory.mktemp("alone") / "elastiq")


def _environment(tmp: Path) -> dict[str, str]:
    """A new virtual environment on top of this interpreter's packages, first on PATH."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTIQ_")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv),
               ELASTIQ_CACHE=str(tmp / "empty-cache"), HF_HUB_OFFLINE="1", PYTHONNOUSERSITE="1")
    env.pop("PYTHONPATH", None)
    return env


def test_readme_first_command_answers_in_a_bare_clone(alone, tmp_path):
    assert sorted(p.name for p in alone.parent.iterdir()) == ["elastiq"]
    command = README_COMMAND.search((alone / "README.md").read_text(encoding="utf-8"))
    assert command, "the README's first command is not where this test expects it"
    env = _environment(tmp_path)
    done = subprocess.run(["bash", "-c", command.group(1)], cwd=alone, env=env, capture_output=True, text=True,
                          timeout=3600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Paris" in done.stdout
    assert "compressing it once" in done.stderr and "loaded rate" in done.stderr
    cached = list((tmp_path / "empty-cache" / "checkpoints").glob("*.elastiq"))
    assert len(cached) == 1 and (cached[0] / "manifest.json").is_file()
    where = subprocess.run(["python3", "-c", "import elastiq, elastiq.paths as p; print(elastiq.__file__); "
                            "print(p.data_dir())"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           check=True).stdout.split()
    assert Path(where[0]).is_relative_to(alone) and Path(where[1]) == alone / "elastiq" / "data"


def test_wheel_carries_the_data_and_every_module(alone, tmp_path):
    """A built wheel (what a non-editable ``pip install .`` installs) holds the data and its README,
    and every module of every package folder (a sub-package missing from pyproject's list is not)."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q",
                    "-w", str(tmp_path), "."], cwd=alone, check=True, timeout=900)
    wheel, = tmp_path.glob("elastiq-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    data = {str(p.relative_to(alone)) for p in (alone / "elastiq" / "data").rglob("*") if p.is_file()}
    assert len(data) == 9 and data <= names
    import tomllib

    folders = tomllib.loads((alone / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    modules = {f"{package.replace('.', '/')}/{py.relative_to(alone / folder)}" for package, folder in folders.items()
               for py in (alone / folder).rglob("*.py") if package != "elastiq" or py.parent == alone / "elastiq"}
    assert modules and modules <= names, sorted(modules - names)
