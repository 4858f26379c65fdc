"""What spade-exit adds to lm-eval's own output: the numbers this package exists for.

- `exit_table`: after lm-eval's results table, one row per task: requests, mean exit
  layer of L, compute fraction and a compact exit histogram, from `config.spade` of the
  results (what `--output_path` writes), so it needs no output file.
- `summary_line`: the same in one log line.
- `annotate_samples`: each sample of `--log_samples` gets `spade_exits`, the exit layer
  and confidence of each of its requests, in the order of its `arguments`.

`_startup/lm_eval_output.py` places these in lm-eval's flow.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from operator import itemgetter
from typing import Any

logger = logging.getLogger(__name__)


def _histogram(stats: dict[str, Any]) -> str:
    """`layer:count` for every layer anything exited at, shallowest first."""
    text = " ".join(f"{layer}:{n}" for layer, n in stats["exit_layer_histogram"].items())
    return text + (" tokens" if stats.get("generated_tokens") is not None else "")


def heading(spade: dict[str, Any]) -> str:
    """Which exit rule made the table's numbers."""
    config, layers = spade["config"], spade["num_layers"]
    if config.get("exit_layer") is not None:
        rule = f"fixed exit at layer {config['exit_layer']} of {layers}"
    elif config.get("threshold") is not None:
        rule = (
            f"adaptive exits ({config['confidence']} of {config['confidence_decoder']} "
            f"<= {config['threshold']} nats)"
        )
    elif config.get("patience") is not None:
        rule = (
            f"adaptive exits (answer of {config['confidence_decoder']} held over "
            f"{config['patience'] + 1} checks)"
        )
    else:
        return f"spade-exit: no exit setting, every request at full depth ({layers} layers)"
    return f"spade-exit: {rule}, decoded with {config['decoder']}"


def exit_table(spade: dict[str, Any]) -> str:
    """Per task: requests, mean exit layer of L, compute fraction, exit histogram."""
    from pytablewriter import MarkdownTableWriter  # as lm-eval's make_table, only when used

    writer = MarkdownTableWriter()
    writer.headers = [
        "Tasks",
        "Requests",
        "Mean exit layer",
        "Compute fraction",
        "Exits (layer:count)",
    ]
    writer.value_matrix = [
        [
            task,
            stats["requests"],
            f"{stats['mean_exit_layer']:.2f} of {stats['num_layers']}",
            f"{stats['compute_fraction']:.4f}",
            _histogram(stats),
        ]
        for task, stats in spade["tasks"].items()
    ]
    return f"{heading(spade)}\n{writer.dumps()}"


def summary_line(tasks: dict[str, dict[str, Any]]) -> str:
    """The exit statistics of every task in one line, for the log."""
    parts = [
        f"{task}: mean exit layer {s['mean_exit_layer']:.2f} of {s['num_layers']}, "
        f"compute {s['compute_fraction']:.3f}, {s['requests']} requests"
        for task, s in tasks.items()
    ]
    return "spade-exit exits: " + ("; ".join(parts) if parts else "no requests")


def log_summary(tasks: dict[str, dict[str, Any]]) -> None:
    logger.info(summary_line(tasks))


def annotate_samples(
    samples: dict[str, list[dict[str, Any]]],
    exits: list[dict[str, Any]],
    doc_ids: dict[str, list[int]] | None = None,
) -> None:
    """Add `spade_exits` to every logged sample whose requests were all recorded.

    `exits` are the model's records (task, doc_id, idx, exit_layer, confidence, ...).
    `doc_ids` is lm-eval's `samples` argument: where it picks documents by index, a
    logged sample's `doc_id` is that index and the requests' doc_id its position.
    """
    by_doc: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for record in exits:
        by_doc[record["task"], record["doc_id"]].append(record)
    for task, task_samples in samples.items():
        position = {doc: i for i, doc in enumerate((doc_ids or {}).get(task) or [])}
        for sample in task_samples:
            records = by_doc.get((task, position.get(sample["doc_id"], sample["doc_id"])), [])
            if len(records) == len(sample["arguments"]):
                ordered = sorted(records, key=itemgetter("idx"))
                sample["spade_exits"] = [_sample_exit(r) for r in ordered]


def _sample_exit(record: dict[str, Any]) -> dict[str, Any]:
    out = {"exit_layer": record["exit_layer"], "confidence": record["confidence"]}
    if record.get("token_exit_layers") is not None:
        out["token_exit_layers"] = record["token_exit_layers"]
    return out
