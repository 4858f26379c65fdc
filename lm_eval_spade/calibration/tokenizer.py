"""A word-level tokenizer for the calibration prompts.

One token per whitespace-separated word, so every option letter and every number is a
single token, and a start token `<s>` in front of every sequence, since SPADE needs one.
"""

from __future__ import annotations

import transformers as T
from tokenizers import Tokenizer, models, pre_tokenizers, processors

SPECIAL = ["<unk>", "<s>", "</s>"]


def word_level_tokenizer(words: list[str]) -> T.PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate([*SPECIAL, *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    return T.PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="</s>",
    )  # fmt: skip
