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


def test_unknown_task():
    with pytest.raises(ElastiqError, match="unknown task 'mmlu'; known tasks: arc_easy, arc_challenge"):
        get_task("mmlu")


def test_missing_data_file(tmp_path):
    (tmp_path / "tasks").mkdir()
    with pytest.raises(TaskDataError, match="piqa_valid.jsonl is missing"):
        get_task("piqa").load(tmp_path)
