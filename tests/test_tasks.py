"""Task loaders read every item of the packaged data, with the harness's prompts."""

from __future__ import annotations

import pytest

from elastiq import ElastiqError
from elastiq.evaluation.tasks import TaskDataError, get_task

SIZES = {"arc_easy": 2376, "arc_challenge": 1172, "piqa": 1838, "winogrande": 1267, "hellaswag": 10042}


@pytest.mark.parametrize("name", SIZES)
def test_every_item_is_read(name, data_dir):
    items = get_task(name).load(data_dir)
    assert len(items) == SIZES[name]
    for item in items:
        assert 0 <= item.gold < len(item.choices) == len(item.contexts)


def test_prompts_follow_the_harness(data_dir):
    arc = get_task("arc_easy").load(data_dir)[0]
    assert arc.requests()[0] == (
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:",
        " Sunlight is the source of energy for nearly all ecosystems.")
    piqa = get_task("piqa").load(data_dir)[0]
    assert piqa.contexts[0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert piqa.gold == 0
    wino = get_task("winogrande").load(data_dir)[0]
    assert wino.requests() == [("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                               ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")]
    hella = get_task("hellaswag").load(data_dir)[0]
    assert hella.contexts[0] == "Roof shingle removal: A man is sitting on a roof. he"
    assert hella.gold == 3 and hella.choices[3] == "starts pulling up roofing on a roof."
    assert get_task("arc_challenge").metric == get_task("hellaswag").metric == "acc_norm"


def test_last_word_items_are_wikitext2_paragraphs_up_to_their_last_word(data_dir):
    """Each item: a WikiText-2 test paragraph of 30 words or more before its last word, which is
    alphabetic and followed by the paragraph's final full stop; in file order, so deterministic."""
    items = get_task("last_word").load(data_dir)
    lines = (data_dir / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8").split("\n")
    paragraphs = {" ".join(line.split()) for line in lines}
    assert len(items) > 500
    for item in items:
        (context,), (word,) = item.contexts, item.choices
        assert word.isalpha() and len(context.split()) >= 30 and item.gold == 0
        assert f"{context} {word} ." in paragraphs
    assert items[0].requests()[0][1] == " " + items[0].choices[0]  # the word follows a space
    assert get_task("last_word").greedy and get_task("last_word").metric == "acc"


def test_unknown_task():
    with pytest.raises(ElastiqError, match="unknown task 'mmlu'; known tasks: arc_easy, arc_challenge"):
        get_task("mmlu")


def test_missing_data_file(tmp_path):
    (tmp_path / "tasks").mkdir()
    with pytest.raises(TaskDataError, match="piqa_valid.jsonl is missing"):
        get_task("piqa").load(tmp_path)
