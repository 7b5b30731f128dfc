"""lm-evaluation-harness itself on the data elastiq carries: the reference our scorer is checked against.

``elastiq eval`` scores with its own small scorer (``zeroshot``), because it must score models
that are not transformers modules (the elastic runtime, llama.cpp, onnxruntime) through one
logits function, and because the harness's ``HFLM`` re-ties ``lm_head`` to the embedding of any
model handed to it, which would silently change an edited model. This module runs the harness
(optional dependency ``lm-eval``, in the ``test`` extra) offline on the same files, with task
configs written from the raw data independently of ``tasks.py``, so that a comparison checks
prompt building as well as scoring.
"""

from __future__ import annotations

import bz2
import json
from pathlib import Path
from typing import Sequence

def _metrics(*names: str) -> list[dict]:
    return [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in names]


def _config(task: str, data_file: Path, doc_to_text: str, doc_to_choice: str, doc_to_target: str,
            metrics: tuple[str, ...] = ("acc", "acc_norm")) -> dict:
    return {
        "task": f"elastiq_{task}", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": doc_to_text, "doc_to_choice": doc_to_choice,
        "doc_to_target": doc_to_target, "target_delimiter": " ", "metric_list": _metrics(*metrics),
        "metadata": {"version": 1.0},
    }


def write_task_configs(data: Path, out: Path) -> Path:
    """Write the five task configs (and PIQA / HellaSwag converted to jsonl) under ``out``.

    Configs are JSON, which is valid YAML; each task is named ``elastiq_<task>``.
    """
    out.mkdir(parents=True, exist_ok=True)
    tasks = data / "tasks"
    labels = (tasks / "piqa_valid-labels.lst").read_text().split()
    with open(tasks / "piqa_valid.jsonl", encoding="utf-8") as src, open(out / "piqa.jsonl", "w") as dst:
        for line, label in zip(src, labels):
            dst.write(json.dumps({**json.loads(line), "label": int(label)}) + "\n")
    lines = bz2.decompress((tasks / "hellaswag_val_full.txt.bz2").read_bytes()).decode("utf-8").splitlines()
    with open(out / "hellaswag.jsonl", "w") as dst:
        for i in range(0, len(lines) - 5, 6):
            dst.write(json.dumps({"ctx": lines[i], "label": int(lines[i + 1]), "endings": lines[i + 2:i + 6]}) + "\n")
    configs = [
        _config("arc_easy", tasks / "arc_easy.jsonl", "{{query}}\nAnswer:", "choices", "gold"),
        _config("arc_challenge", tasks / "arc_challenge.jsonl", "{{query}}\nAnswer:", "choices", "gold"),
        _config("piqa", out / "piqa.jsonl", "Question: {{goal}}\nAnswer:", "{{[sol1, sol2]}}", "label"),
        # An integer doc_to_text makes the harness score one context per option (partial scoring);
        # its choices are then the contexts, so acc_norm would divide by their lengths: acc only,
        # as in the harness's own winogrande task.
        _config("winogrande", tasks / "winogrande.jsonl", "gold", "context_options", "continuation", ("acc",)),
        _config("hellaswag", out / "hellaswag.jsonl", "{{ctx}}", "endings", "label"),
    ]
    for config in configs:
        (out / f"{config['task']}.yaml").write_text(json.dumps(config, indent=1))
    return out


def run_lm_eval(model, tokenizer, tasks: Sequence[str], data: Path, workdir: Path, limit: int,
                batch_size: int = 8) -> dict[str, dict]:
    """Run the harness on ``tasks``; per task: acc, acc_norm (where defined) and each doc's
    choice log-likelihoods.

    ``model`` must be a transformers causal LM whose tied weights really are tied (see above).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(write_task_configs(data, workdir)), include_defaults=False)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    names = [f"elastiq_{t}" for t in tasks]
    out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                                  log_samples=True, bootstrap_iters=0)
    results = {}
    for task, name in zip(tasks, names):
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        metrics = out["results"][name]
        results[task] = {"loglikelihoods": [[float(r[0][0]) for r in s["resps"]] for s in samples],
                         **{m: metrics[f"{m},none"] for m in ("acc", "acc_norm") if f"{m},none" in metrics}}
    return results
