"""What counts as a question's answer, and whether it is right.

- A multiple-choice document (lm-eval's `multiple_choice` tasks): the choice lm-eval's
  metric picks from the choices' loglikelihoods: `acc` the largest loglikelihood,
  `acc_norm` the largest per character of the choice, as lm-eval's `process_results`
  computes them. Whether a choice is right comes from that same `process_results`, so
  gold labels are read exactly as lm-eval reads them.
- A prompt of a file (no choices, no label): the next token. The request's continuation
  is the full model's greedy token, so the answer is "the full model's token" (0) where
  the column's greedy flag holds, else "another token" (1).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from lm_eval.api.instance import Instance

from lm_eval_spade.sweeps.outcomes import Predict, Score
from lm_eval_spade.sweeps.spec import SweepError

#: The multiple-choice metrics whose answer is one choice, and how each picks it.
METRICS = ("acc", "acc_norm")


class MultipleChoice:
    """Answers and their correctness for the documents of lm-eval `multiple_choice` tasks."""

    def __init__(self, tasks: dict[str, Any], metric: str = "acc") -> None:
        if metric not in METRICS:
            raise SweepError(f"--metric {metric} is not one of {', '.join(METRICS)}.")
        for name, task in tasks.items():
            if task.OUTPUT_TYPE != "multiple_choice":
                raise SweepError(
                    f"task {name} is a {task.OUTPUT_TYPE} task; choosing a threshold needs "
                    "answers to agree on: a multiple_choice task, or --prompts FILE."
                )
        self.tasks = tasks
        self.metric = metric

    def _choices(self, instances: list[Instance]) -> list[str]:
        task = self.tasks[instances[0].task_name]
        choices = task.doc_to_choice(instances[0].doc)
        if len(choices) != len(instances):
            raise SweepError(
                f"task {instances[0].task_name} scores {len(instances)} requests for a document "
                f"of {len(choices)} choices (e.g. acc_mutual_info); choose-threshold needs one "
                "request per choice."
            )
        return choices

    def predict(
        self, instances: list[Instance], loglik: np.ndarray, greedy: np.ndarray
    ) -> np.ndarray:
        if self.metric == "acc_norm":
            lengths = np.array([float(len(c)) for c in self._choices(instances)])
            loglik = loglik / lengths[:, None]
        return loglik.argmax(axis=0)

    def score(self, instances: list[Instance]) -> np.ndarray:
        """The metric if the answer were each choice: lm-eval's `process_results` on
        loglikelihoods that make that choice the pick under every rule."""
        task = self.tasks[instances[0].task_name]
        n = len(self._choices(instances))
        values = []
        for pick in range(n):
            results = [(0.0 if i == pick else -1e30, i == pick) for i in range(n)]
            metrics = task.process_results(instances[0].doc, results)
            if self.metric not in metrics:
                raise SweepError(
                    f"task {instances[0].task_name} reports {', '.join(metrics)}, not "
                    f"{self.metric}; pass --metric with one of {', '.join(METRICS)} it reports."
                )
            values.append(float(metrics[self.metric]))
        return np.array(values)

    def rules(self) -> tuple[Predict, Score]:
        return self.predict, self.score


def next_token_rules() -> tuple[Predict, Score]:
    """Prompts: agreement is the exit's greedy token being the full model's (no label)."""

    def predict(instances: list[Instance], loglik: np.ndarray, greedy: np.ndarray) -> np.ndarray:
        return np.where(greedy[0], 0, 1)

    return predict, lambda instances: None
