"""A self-contained run of `lm_eval --model spade-exit`, for machines with nothing on them.

It builds everything locally (no hub): a word-level tokenizer, a small seeded random
Llama, and a multiple-choice task whose answers are one token. Then it runs the real
`lm_eval` command for `hf` and for spade-exit at a few exit layers, so a user sees the
plumbing work end to end. The weights are random: accuracies are chance-level.
"""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
from pathlib import Path

import torch
import transformers as T
from tokenizers import Tokenizer, models, pre_tokenizers, processors

logger = logging.getLogger(__name__)

WORDS = [f"w{i}" for i in range(200)]
SPECIAL = ["<unk>", "<s>", "</s>"]
TASK = "spade_demo"


def build_tokenizer() -> T.PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate([*SPECIAL, "Question:", "Answer:", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    return T.PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def build_model(out: Path, layers: int = 6, seed: int = 0) -> Path:
    tokenizer = build_tokenizer()
    config = T.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    T.AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_task(out: Path, docs: int = 20, seed: int = 0) -> Path:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{TASK}.jsonl"
    with data.open("w") as f:
        for _ in range(docs):
            words = rng.sample(WORDS, 8)
            f.write(json.dumps({"question": " ".join(words[:4]), "choices": words[4:], "label": 0}))
            f.write("\n")
    (out / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\ntest_split: test\n"
        'doc_to_text: "Question: {{question}} Answer:"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n"
    )
    return out


def run(out: Path, exit_layers: list[int]) -> list[dict]:
    """Build the model and task under `out`, run lm_eval for each setting, return results."""
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(out / "model")
    tasks = build_task(out / "tasks")
    settings = [("hf", "")] + [("spade-exit", f",exit_layer={k}") for k in exit_layers]
    results = []
    for name, extra in settings:
        target = out / "results" / f"{name}{extra.replace(',', '_').replace('=', '')}"
        command = [
            str(Path(sys.executable).parent / "lm_eval"), "--model", name,
            "--model_args", f"pretrained={model},dtype=float32{extra}",
            "--tasks", TASK, "--include_path", str(tasks), "--device", "cpu",
            "--batch_size", "8", "--output_path", str(target),
        ]  # fmt: skip
        logger.info("running: %s", " ".join(command))
        subprocess.run(command, check=True)
        (path,) = target.rglob("results_*.json")
        results.append(json.loads(path.read_text()))
    return results


def summary(results: list[dict]) -> str:
    lines = ["| model | exit layer | acc | compute fraction |", "|---|---|---|---|"]
    for r in results:
        acc = r["results"][TASK]["acc,none"]
        spade = r["config"].get("spade")
        if spade is None:
            lines.append(f"| hf | full | {acc:.3f} | 1.000 |")
            continue
        stats = spade["tasks"][TASK]
        lines.append(
            f"| spade-exit | {stats['exit_layer']} | {acc:.3f} | {stats['compute_fraction']:.3f} |"
        )
    return "\n".join(lines)
