"""Scores do not depend on how requests are batched.

Float32 sets a floor: `hf` itself moves by up to 1.5e-5 between batch sizes on long
multi-token continuations scored near -70 (about 2 float32 ulps there), because CPU
kernels reduce in an order that depends on the padded length. The bound is 1e-5 or two
float32 ulps of the score, whichever is larger, checked on the workload the method is
for: real ARC questions with letter answers, and rolling perplexity of story sentences
(a total near -104 has an ulp of 7.6e-6, and two machines here differed by two ulps).
"""

from __future__ import annotations

import numpy as np
import pytest
from lmutil import STORIES, arc_requests, loglikelihood_requests, make_lm, rolling_requests

pytestmark = pytest.mark.shared  # reads ../shared (tests/conftest.py)


def _max_diff(a, b):
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def _within_float32_floor(a, b) -> bool:
    """Each pair within 1e-5, or within two float32 ulps of its magnitude."""
    return all(
        abs(x - y) <= max(1e-5, 2 * float(np.spacing(np.float32(abs(x)))))
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("layer", [1, 2, 3, 4])
@pytest.mark.parametrize("decoder", ["spade", "spade_nos", "logit_lens"])
def test_batch_size_1_vs_8(layer, decoder):
    scores = {}
    for batch_size in (1, 8):
        lm = make_lm(
            "spade-exit", STORIES, batch_size=batch_size, exit_layer=layer, decoder=decoder
        )
        scores[batch_size] = (
            lm.loglikelihood(arc_requests(), disable_tqdm=True),
            lm.loglikelihood_rolling(rolling_requests()[1:], disable_tqdm=True),
        )
    (ll1, roll1), (ll8, roll8) = scores[1], scores[8]
    assert _max_diff([a[0] for a in ll1], [b[0] for b in ll8]) <= 1e-5
    assert [a[1] for a in ll1] == [b[1] for b in ll8]
    assert _within_float32_floor(roll1, roll8), (roll1, roll8)


def test_exit_statistics_per_task():
    lm = make_lm("spade-exit", STORIES, exit_layer=2)
    lm.loglikelihood(loglikelihood_requests("mc"), disable_tqdm=True)
    lm.loglikelihood_rolling(rolling_requests("ppl"), disable_tqdm=True)
    info = lm.get_model_info()["spade"]
    config = info["config"]
    settings = ("decoder", "exit_layer", "threshold", "lens")
    assert [config[k] for k in settings] == ["spade", 2, None, None]
    mc, ppl = info["tasks"]["mc"], info["tasks"]["ppl"]
    assert mc["requests"] == 16 and ppl["requests"] == 3
    assert mc["exit_layer"] == 2 and mc["exit_layer_histogram"] == {"2": 16}
    # Rolling scores all n positions: l * n, plus (L - l) * 2 per pair; position 0 is
    # decoded alone (one token), so: (2 n + 3 (2 n - 1)) / 5 n for each text.
    n = sum(len(lm.tok_encode(r.args[0])) for r in rolling_requests())
    assert ppl["compute_fraction"] == pytest.approx((2 * n + 3 * (2 * n - 3)) / (5 * n))
    # Multiple choice runs the trunk to layer 2 and decodes only continuation positions.
    assert mc["compute_fraction"] == mc["block_token_passes"] / mc["block_token_passes_full"]
    assert 2 / 5 < mc["compute_fraction"] < 1
