"""Runs lm-eval-harness' simple_evaluate on the tasks of one directory and writes its results and samples as JSON.
A script, run in its own process by test_lm_eval.py: the hub's offline switches are read when its packages import.

usage: run_lm_eval.py TASK_DIR MODEL MODEL_ARGS OUT_JSON TASK [TASK ...]
"""
from __future__ import annotations

import json
import sys

from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager


def main(task_dir: str, model: str, model_args: str, out_path: str, *tasks: str) -> None:
    # include_defaults=False: indexing lm-eval's thousands of built-in task files takes ~9 s of CPU, for nothing
    evaluated = simple_evaluate(model=model, model_args=model_args, tasks=list(tasks), batch_size=8,
                                task_manager=TaskManager(include_path=task_dir, include_defaults=False),
                                log_samples=True, bootstrap_iters=0)
    with open(out_path, "w") as out:
        json.dump({"results": evaluated["results"], "samples": evaluated["samples"]}, out, default=str)


if __name__ == "__main__":
    main(*sys.argv[1:])
