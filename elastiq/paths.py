"""Where elastiq keeps its cache and finds the shared evaluation and calibration data."""

from __future__ import annotations

import os
from pathlib import Path

from . import ElastiqError

DATA_ENV = "ELASTIQ_DATA"
CACHE_ENV = "ELASTIQ_CACHE"


def cache_dir() -> Path:
    """The cache root: $ELASTIQ_CACHE, else $XDG_CACHE_HOME/elastiq, else ~/.cache/elastiq."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "elastiq"


def data_dir() -> Path:
    """The shared data folder (wikitext2/, tasks/, c4/).

    $ELASTIQ_DATA wins; otherwise ``../shared/data`` beside the source checkout (the layout CI
    uses), then beside the working directory.
    """
    if os.environ.get(DATA_ENV):
        path = Path(os.environ[DATA_ENV]).expanduser()
        if not path.is_dir():
            raise ElastiqError(f"${DATA_ENV} points to {path}, which is not a directory")
        return path
    checkout = Path(__file__).resolve().parent.parent
    candidates = [checkout.parent / "shared" / "data", Path.cwd().parent / "shared" / "data",
                  Path.cwd() / "shared" / "data"]
    for path in candidates:
        if (path / "tasks").is_dir():
            return path
    looked = ", ".join(str(p) for p in candidates)
    raise ElastiqError(f"evaluation data not found (looked in {looked}); "
                       f"set ${DATA_ENV} to the folder that holds wikitext2/, tasks/ and c4/")
