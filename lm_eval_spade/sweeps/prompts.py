"""Calibration from a file of prompts: no choices, no labels, only the next token.

Each prompt becomes one loglikelihood request whose continuation is the full model's
greedy next token, so a layer-wise pass tells, per layer, whether SPADE there would pick
the same token (its greedy flag). The continuation is text, as lm-eval's requests are;
a prompt whose greedy token does not survive the round trip through the tokenizer
(decoded, then encoded after the prompt as HFLM encodes pairs) is left out and counted.
"""

from __future__ import annotations

import logging

import torch
from lm_eval.api.instance import Instance
from tqdm import tqdm

from lm_eval_spade.lens.data import load_texts
from lm_eval_spade.sweeps.model import LayerwiseLM
from lm_eval_spade.sweeps.spec import SweepError

logger = logging.getLogger(__name__)

TASK_NAME = "prompts"


def next_token_request(lm: LayerwiseLM, prompt: str, number: int) -> Instance | None:
    """The request (prompt, full model's greedy next token), or None if that token's
    text does not encode back to it."""
    context = prompt.rstrip()  # HFLM moves a context's trailing spaces to the continuation
    ids = lm.tok_encode(context)
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids[-lm.max_length :]], device=lm.device)).logits
    token = int(logits[0, -1].argmax())
    base, text = lm.tokenizer.decode(ids), lm.tokenizer.decode([*ids, token])
    continuation = text[len(base) :] if text.startswith(base) else ""
    if not continuation or lm._encode_pair(context, continuation) != (ids, [token]):
        return None
    return Instance(
        "loglikelihood", {"prompt": prompt}, (context, continuation), 0, (TASK_NAME, number, 1)
    )


def prompt_requests(
    lm: LayerwiseLM, source: str, limit: int | None = None, include_path: str | None = None
) -> list[Instance]:
    """Requests for the prompts of `source` (.jsonl with a prompt/text field, or .txt of
    blank-line separated prompts)."""
    prompts = load_texts(source, documents=False, include_path=include_path, limit=limit)
    requests = []
    for number, prompt in enumerate(tqdm(prompts, desc="full model's next token")):
        request = next_token_request(lm, prompt, number)
        if request is not None:
            requests.append(request)
    left_out = len(prompts) - len(requests)
    if left_out:
        logger.warning(
            "%d of %d prompts left out: their full model's next token does not encode back "
            "to itself after the prompt",
            left_out,
            len(prompts),
        )
    if not requests:
        raise SweepError(
            f"none of the {len(prompts)} prompts of {source} gives a next token that encodes "
            "back to itself; end each prompt where a whole word would follow."
        )
    return requests
