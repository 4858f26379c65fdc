"""SPADE's start token: where it comes from, and cutting long inputs without losing it.

SPADE pairs every decoded position with position 0 of its sequence, so position 0 must
be a start token. Many tokenizers add none (SmolLM2, Qwen, GPT-2 with
`add_special_tokens`), and lm-eval's left truncation of long contexts cuts the one they
add. spade-exit, whenever it exits early, therefore:

- puts HFLM's prefix token (`prefix_token_id` if given, else BOS, else EOS) in front of
  every request whose first token is not already a start token;
- cuts a context that is too long right *after* its start token instead of before it,
  so the input keeps position 0 and loses the oldest tokens of the text;
- windows rolling documents longer than `max_length` so that every window begins with
  the start token (the first window is lm-eval's own).

Nothing changes for a request that fits and already starts with a start token, so
those scores equal HFLM's exactly.
"""

from __future__ import annotations

from collections.abc import Collection

from lm_eval import utils as lm_utils

Window = tuple[list[int], list[int]]


def with_start(tokens: list[int], start: int, starts: Collection[int]) -> list[int]:
    """`tokens` with `start` in front, unless they already begin with a start token."""
    if tokens and tokens[0] in starts:
        return tokens
    return [start, *tokens]


def cut_after_start(tokens: list[int], length: int, starts: Collection[int]) -> list[int]:
    """The last `length` tokens, but with position 0 kept where it is a start token:
    the cut falls after the start token, so SPADE keeps its `h_0`."""
    if len(tokens) <= length:
        return tokens
    if tokens[0] in starts and length > 1:
        return [tokens[0], *tokens[len(tokens) - length + 1 :]]
    return tokens[len(tokens) - length :]


def rolling_windows(tokens: list[int], start: int, max_length: int) -> list[Window]:
    """lm-eval's disjoint rolling windows of a document, each beginning with `start`.

    A document that fits (one window) gets exactly lm-eval's window. Past the first, a
    window holds the start token, one token of context and `max_length - 2` predicted
    tokens, so its input is still `max_length` tokens long.
    """
    windows = [
        lm_utils.make_disjoint_window(w)
        for w in lm_utils.get_rolling_token_windows(tokens, start, max_length, 1)
    ]
    if len(windows) <= 1:
        return windows
    done = len(windows[0][1])
    rest = lm_utils.get_rolling_token_windows(tokens[done:], tokens[done - 1], max_length - 1, 1)
    return [
        windows[0],
        *(([start, *ctx], cont) for ctx, cont in map(lm_utils.make_disjoint_window, rest)),
    ]
