"""Helpers shared by the tests: real models on disk, real lm-eval requests."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as T
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

import lm_eval_spade  # noqa: F401  (registers spade-exit)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
DATA = SHARED / "data"
#: stories260K's tokenizer, kept with the tests (`data/tok512/SOURCE.md`): the tiny random
#: models need nothing from `../shared`.
TOKENIZER = Path(__file__).resolve().parent / "data" / "tok512"

_COMMON = dict(
    vocab_size=512,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
)

#: A tiny random config for every supported family, with the stories260K vocabulary.
TINY_CONFIGS = {
    "llama": lambda: T.LlamaConfig(**_COMMON, num_key_value_heads=2),
    "mistral": lambda: T.MistralConfig(**_COMMON, num_key_value_heads=2, sliding_window=16),
    "qwen2": lambda: T.Qwen2Config(**_COMMON, num_key_value_heads=2),
    "qwen3": lambda: T.Qwen3Config(**_COMMON, num_key_value_heads=2, head_dim=8),
    "gemma": lambda: T.GemmaConfig(**_COMMON, num_key_value_heads=2, head_dim=8),
    "gpt_neox": lambda: T.GPTNeoXConfig(**_COMMON),
    "gpt2": lambda: T.GPT2Config(
        vocab_size=512,
        n_embd=32,
        n_layer=3,
        n_head=4,
        n_positions=256,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "opt": lambda: T.OPTConfig(
        vocab_size=512,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        ffn_dim=64,
        max_position_embeddings=256,
        word_embed_proj_dim=16,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
}


def save_tiny_model(config: T.PretrainedConfig, out: Path, seed: int = 0) -> Path:
    """A seeded random model in HF format, with stories260K's tokenizer beside it."""
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config)
    # Random init draws tiny weights; widen them so layers differ visibly.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    model.save_pretrained(out)
    T.AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(out)
    return out


def make_lm(name: str, pretrained: Path | str, batch_size: int = 4, **model_args):
    args = dict(pretrained=str(pretrained), device="cpu", dtype="float32", batch_size=batch_size)
    args.update(model_args)
    return get_model(name).create_from_arg_obj(args)


CONTEXTS = [
    "Once upon a time, there was a little girl named Lily. She loved to play",
    "Tom was sad because he lost his red ball. His mom",
    "One day, a big dog came to the park. The dog was very happy and",
    "Q",
]
CONTINUATIONS = [" outside", " a", " with her toys in the garden.", " helped him look for it."]
STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play with her toys "
    "in the garden. One day, a big dog came to the park. The dog was very happy and wanted "
    "to play with the kids. Tom was sad because he lost his red ball."
)


def loglikelihood_requests(task: str = "story") -> list[Instance]:
    """One-token and multi-token continuations; several share a context."""
    pairs = [(c, k) for c in CONTEXTS for k in CONTINUATIONS]
    return [
        Instance("loglikelihood", {}, pair, i, metadata=(task, i, 1))
        for i, pair in enumerate(pairs)
    ]


def arc_requests(n_questions: int = 12, task: str = "arc") -> list[Instance]:
    """Real ARC-Easy dev questions with the letter-answer prompt: one request per choice."""
    import json

    lines = (DATA / "arc" / "ARC-Easy" / "ARC-Easy-Dev.jsonl").read_text().splitlines()
    requests = []
    for doc_id, line in enumerate(lines[:n_questions]):
        question = json.loads(line)["question"]
        options = "\n".join(f"{c['label']}. {c['text']}" for c in question["choices"])
        context = f"Question: {question['stem']}\n{options}\nAnswer:"
        for choice in question["choices"]:
            pair = (context, " " + choice["label"])
            requests.append(
                Instance("loglikelihood", {}, pair, len(requests), metadata=(task, doc_id, 1))
            )
    return requests


def rolling_requests(task: str = "story_ppl") -> list[Instance]:
    texts = [STORY, CONTEXTS[0], CONTEXTS[2] + CONTINUATIONS[2]]
    return [
        Instance("loglikelihood_rolling", {}, (t,), i, metadata=(task, i, 1))
        for i, t in enumerate(texts)
    ]


ARC_LETTER_TASK = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    train: {root}/ARC-Easy-Train.jsonl
    validation: {root}/ARC-Easy-Dev.jsonl
    test: {root}/ARC-Easy-Test.jsonl
output_type: multiple_choice
training_split: train
validation_split: validation
test_split: test
doc_to_text: "Question: {{{{question.stem}}}}\\n{{% for c in question.choices %}}{{{{c.label}}}}. \\
{{{{c.text}}}}\\n{{% endfor %}}Answer:"
doc_to_choice: "{{{{question.choices | map(attribute='label') | list}}}}"
doc_to_target: "{{{{(question.choices | map(attribute='label') | list).index(answerKey)}}}}"
metric_list:
  - metric: acc
"""


def write_arc_letter_task(root: Path, name: str = "arc_easy_letters_test") -> str:
    """A local lm-eval task over the real ARC-Easy files, with letter answers."""
    root.mkdir(parents=True, exist_ok=True)
    data = DATA / "arc" / "ARC-Easy"
    (root / f"{name}.yaml").write_text(ARC_LETTER_TASK.format(name=name, root=data))
    return name


#: A generate_until task over a JSON-lines file of {"prompt", "ending"} documents.
GENERATION_YAML = """\
task: story_generation_test
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{ending}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 20
  do_sample: false
metric_list:
  - metric: exact_match
"""

SENTENCES = [  # the story sentences of ../shared/models/SOURCES.md
    "Once upon a time, there was a little girl named Lily. She loved to play with her toys "
    "in the garden.",
    "One day, a big dog came to the park. The dog was very happy and wanted to play with the kids.",
    "Tom was sad because he lost his red ball. His mom helped him look for it under the bed.",
]


def sample_stories(n: int = 32, tokens: int = 160, seed: int = 0) -> list[str]:
    """Story text drawn from stories260K itself (seeded), to train lenses on."""
    from lm_eval_spade.lens.data import sample_texts

    model = T.AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32)
    return sample_texts(model, T.AutoTokenizer.from_pretrained(STORIES), n, tokens, seed)


VOCABS = REPO / ".cache" / "tokenizers"  # filled by scripts/setup.sh


def real_tokenizers() -> dict[str, T.PreTrainedTokenizerBase]:
    """The Llama (SentencePiece), GPT-2 and GPT-NeoX tokenizers, from llama.cpp's
    tokenizer-test vocabularies (GGUF). transformers reads the first two; GPT-NeoX's is a
    byte-level BPE built here from the file's tokens and merges."""
    from gguf import GGUFReader
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if not (VOCABS / "ggml-vocab-gpt-neox.gguf").is_file():
        raise FileNotFoundError(f"{VOCABS} lacks the GGUF vocabularies: run scripts/setup.sh")
    out = {
        name: T.AutoTokenizer.from_pretrained(VOCABS, gguf_file=f"ggml-vocab-{file}.gguf")
        for name, file in (("llama", "llama-spm"), ("gpt2", "gpt-2"))
    }
    reader = GGUFReader(VOCABS / "ggml-vocab-gpt-neox.gguf")

    def strings(key: str) -> list[str]:
        field = reader.fields[key]
        return [bytes(field.parts[i]).decode() for i in field.data]

    vocab = {token: i for i, token in enumerate(strings("tokenizer.ggml.tokens"))}
    merges = [tuple(m.split(" ", 1)) for m in strings("tokenizer.ggml.merges")]
    core = Tokenizer(models.BPE(vocab, merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    out["gpt_neox"] = T.PreTrainedTokenizerFast(tokenizer_object=core)
    return out


def run_cli(*argv: str) -> str:
    """`lm-eval-spade ARGV...` in this process; what it printed."""
    import contextlib
    import io

    from lm_eval_spade.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(list(argv))
    return out.getvalue()
