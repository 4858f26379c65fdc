"""What the benchmarks share: the shared folder's model and data, and prompt formats."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
ARC_EASY = SHARED / "data" / "arc" / "ARC-Easy"
RESULTS = REPO / "results"

SENTENCES = [  # the story sentences of ../shared/models/SOURCES.md
    "Once upon a time, there was a little girl named Lily. She loved to play with her toys "
    "in the garden.",
    "One day, a big dog came to the park. The dog was very happy and wanted to play with the kids.",
    "Tom was sad because he lost his red ball. His mom helped him look for it under the bed.",
]


def arc_questions(
    path: Path, limit: int | None = None, offset: int = 0
) -> list[tuple[str, list[str]]]:
    """ARC questions in the letter-answer format (options listed, answer after
    `Answer:`), each with its option letters."""
    questions = []
    end = None if limit is None else offset + limit
    for line in path.read_text().splitlines()[offset:end]:
        question = json.loads(line)["question"]
        options = "".join(f"{c['label']}. {c['text']}\n" for c in question["choices"])
        labels = [c["label"] for c in question["choices"]]
        questions.append((f"Question: {question['stem']}\n{options}Answer:", labels))
    return questions


def arc_prompts(path: Path, limit: int | None = None) -> list[str]:
    return [prompt for prompt, _ in arc_questions(path, limit)]


def random_llama(blocks: int, hidden: int):
    """A seeded random-weight Llama with the stories260K vocabulary, for wall-clock runs
    (weights do not matter where exits are forced)."""
    import torch
    import transformers as T

    torch.manual_seed(0)
    config = T.LlamaConfig(
        vocab_size=512, hidden_size=hidden, intermediate_size=1376, num_hidden_layers=blocks,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return T.LlamaForCausalLM(config)


def write_result(name: str, title: str, intro: str, *tables: str) -> None:
    """Write `results/<name>` (markdown: title, intro, tables) and print it."""
    text = f"# {title}\n\n{intro}\n\n" + "\n\n".join(tables) + "\n"
    (RESULTS / name).parent.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text(text)
    print(text)


def sweep_cost(model: str, tasks: list[str], limit: int | None, *extra: str) -> dict:
    """`lm-eval-spade sweep layers` over `tasks` in this process: the cost it reports
    (`sweep.json`'s `cost`: both ratios and the seconds of each part)."""
    import tempfile

    from lm_eval_spade.cli import main as cli

    with tempfile.TemporaryDirectory() as tmp:
        args = ["sweep", "layers", "--model", model, "--tasks", *tasks, "--out", tmp + "/s"]
        cli(args + (["--limit", str(limit)] if limit else []) + list(extra))
        return json.loads((Path(tmp) / "s" / "sweep.json").read_text())["cost"]
