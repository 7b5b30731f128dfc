"""The zero-shot tasks, read from the data folder (``paths.data_dir``): five multiple-choice ones
and last-word prediction.

Each task becomes a list of ``Item``s: one (context, continuation) pair per choice and the gold
index, built as lm-evaluation-harness builds its requests (``arc_easy``, ``arc_challenge``,
``piqa``, ``winogrande``, ``hellaswag`` task configs): ARC and PIQA prompts are
``Question: ...\\nAnswer:``, the continuation follows a single space, and WinoGrande uses partial
scoring (each option completes the context; the shared continuation is scored).

``last_word`` is LAMBADA's measure on text elastiq carries (LAMBADA itself is not offline here):
each WikiText-2 test paragraph of at least ``LAST_WORD_CONTEXT`` words that ends in a word and a
full stop becomes the paragraph up to that word, and the model must produce the word's tokens
greedily (lm-evaluation-harness's ``is_greedy``; accuracy ``acc``). Unlike the multiple-choice
tasks it is far from chance even for a 135M model, so it moves with compression.

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
WIKITEXT2_TEST = Path("wikitext2") / "wiki.test.raw"  # perplexity's text, and last-word prediction's


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
    """A task's name, the metric the literature reports for it, and its loader. A ``greedy`` task's
    items have one choice, right when greedy decoding produces it; the others pick the likeliest."""

    name: str
    metric: str  # "acc" or "acc_norm"
    load: Callable[[Path], list[Item]]
    greedy: bool = False


LAST_WORD_CONTEXT = 30  # words a paragraph has before its last word, at least


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


def _last_word(data: Path) -> list[Item]:
    path = data / WIKITEXT2_TEST
    if not path.is_file():
        raise TaskDataError(f"task data file {path} is missing")
    items = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        words = line.split()
        if len(words) < LAST_WORD_CONTEXT + 2 or words[0] == "=" or words[-1] != ".":
            continue  # short, a heading, or not ending in a full stop
        if words[-2].isalpha():
            items.append(Item((" ".join(words[:-2]),), (words[-2],), 0))
    return items


TASKS: dict[str, Task] = {
    "arc_easy": Task("arc_easy", "acc", _arc("arc_easy.jsonl")),
    "arc_challenge": Task("arc_challenge", "acc_norm", _arc("arc_challenge.jsonl")),
    "piqa": Task("piqa", "acc", _piqa),
    "winogrande": Task("winogrande", "acc", _winogrande),
    "hellaswag": Task("hellaswag", "acc_norm", _hellaswag),
    "last_word": Task("last_word", "acc", _last_word, greedy=True),
}


def get_task(name: str) -> Task:
    """Look a task up by name, with an error that lists the known ones."""
    if name not in TASKS:
        raise ElastiqError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]
