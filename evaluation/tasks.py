"""The five zero-shot multiple-choice tasks, read from the data folder (``paths.data_dir``).

Each task becomes a list of ``Item``s: one (context, continuation) pair per choice and the gold
index, built as lm-evaluation-harness builds its requests (``arc_easy``, ``arc_challenge``,
``piqa``, ``winogrande``, ``hellaswag`` task configs): ARC and PIQA prompts are
``Question: ...\\nAnswer:``, the continuation follows a single space, and WinoGrande uses partial
scoring (each option completes the context; the shared continuation is scored).

One difference from lm-evaluation-harness, forced by the data: its HellaSwag prompt capitalises
the second context sentence (``ctx_b.capitalize()``); the data file keeps that sentence's
original lower-case start and has no ctx_a / ctx_b boundary, so it is used as it is.
"""

from __future__ import annotations

import bz2
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import ElastiqError

TARGET_DELIMITER = " "


class TaskDataError(ElastiqError):
    """A task's data file is missing or malformed."""


@dataclass(frozen=True)
class Item:
    """One multiple-choice question: a context per choice (equal except in WinoGrande)."""

    contexts: tuple[str, ...]
    choices: tuple[str, ...]
    gold: int

    def requests(self) -> list[tuple[str, str]]:
        """(context, continuation) pairs, the continuation led by the target delimiter."""
        return [(ctx, TARGET_DELIMITER + choice) for ctx, choice in zip(self.contexts, self.choices)]


@dataclass(frozen=True)
class Task:
    """A task's name, the metric the literature reports for it, and its loader."""

    name: str
    metric: str  # "acc" or "acc_norm"
    load: Callable[[Path], list[Item]]


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise TaskDataError(f"task data file {path} is missing")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _arc(file: str) -> Callable[[Path], list[Item]]:
    def load(data: Path) -> list[Item]:
        items = []
        for row in _jsonl(data / "tasks" / file):
            context = row["query"] + "\nAnswer:"
            items.append(Item((context,) * len(row["choices"]), tuple(row["choices"]), int(row["gold"])))
        return items
    return load


def _piqa(data: Path) -> list[Item]:
    rows = _jsonl(data / "tasks" / "piqa_valid.jsonl")
    labels_file = data / "tasks" / "piqa_valid-labels.lst"
    if not labels_file.is_file():
        raise TaskDataError(f"task data file {labels_file} is missing")
    labels = labels_file.read_text().split()
    if len(labels) != len(rows):
        raise TaskDataError(f"{labels_file} has {len(labels)} labels for {len(rows)} PIQA questions")
    return [Item((f"Question: {row['goal']}\nAnswer:",) * 2, (row["sol1"], row["sol2"]), int(label))
            for row, label in zip(rows, labels)]


def _winogrande(data: Path) -> list[Item]:
    return [Item(tuple(row["context_options"]), (row["continuation"],) * len(row["context_options"]),
                 int(row["gold"]))
            for row in _jsonl(data / "tasks" / "winogrande.jsonl")]


def _hellaswag(data: Path) -> list[Item]:
    path = data / "tasks" / "hellaswag_val_full.txt.bz2"
    if not path.is_file():
        raise TaskDataError(f"task data file {path} is missing")
    lines = bz2.decompress(path.read_bytes()).decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise TaskDataError(f"{path} has {len(lines)} lines, not a multiple of 6 (context, gold, 4 endings)")
    return [Item((lines[i],) * 4, tuple(lines[i + 2:i + 6]), int(lines[i + 1]))
            for i in range(0, len(lines), 6)]


TASKS: dict[str, Task] = {
    "arc_easy": Task("arc_easy", "acc", _arc("arc_easy.jsonl")),
    "arc_challenge": Task("arc_challenge", "acc_norm", _arc("arc_challenge.jsonl")),
    "piqa": Task("piqa", "acc", _piqa),
    "winogrande": Task("winogrande", "acc", _winogrande),
    "hellaswag": Task("hellaswag", "acc_norm", _hellaswag),
}


def get_task(name: str) -> Task:
    """Look a task up by name, with an error that lists the known ones."""
    if name not in TASKS:
        raise ElastiqError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]
