"""Perplexity of texts under an lm-eval model, as lm-eval's perplexity tasks score it."""

from __future__ import annotations

import math
from collections.abc import Sequence

from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM


def rolling_perplexity(lm: TemplateLM, texts: Sequence[str], task: str = "perplexity") -> float:
    """Token-level perplexity over all `texts` pooled, from rolling loglikelihoods."""
    requests = [
        Instance("loglikelihood_rolling", {}, (text,), i, metadata=(task, i, 1))
        for i, text in enumerate(texts)
    ]
    logprob = sum(lm.loglikelihood_rolling(requests, disable_tqdm=True))
    tokens = sum(len(lm.tok_encode(text)) for text in texts)
    return math.exp(-logprob / tokens)
