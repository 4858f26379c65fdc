"""A sweep runs the head over many columns at once (`scoring._heads`); the scores and
uncertainties must be those of decoding each column alone, however the columns are
grouped into products."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from lmutil import TINY_CONFIGS

from lm_eval_spade.architectures import architecture_for
from lm_eval_spade.confidence import Confidence, uncertainty
from lm_eval_spade.decoders import DecoderKind, decode
from lm_eval_spade.sweeps import scoring
from lm_eval_spade.sweeps.spec import Decoding, Layout, Signal

KINDS = (DecoderKind.LOGIT_LENS, DecoderKind.SPADE, DecoderKind.SPADE_NOS)


def _arch():
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(TINY_CONFIGS["llama"]()).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    return architecture_for(model)


@torch.no_grad()
@pytest.mark.parametrize("columns", [1, 5, None])  # per product: one, a few, all
def test_grouped_heads_equal_each_column_decoded_alone(monkeypatch, columns):
    arch = _arch()
    vocab = arch.lm_head.out_features
    if columns is not None:  # 4 scored positions per column
        monkeypatch.setattr(scoring, "HEAD_CHUNK_LOGITS", columns * 4 * vocab)
    torch.manual_seed(1)
    ids = torch.randint(3, vocab, (2, 9))
    ids[:, 0] = 1
    input_lens, cont_lens = [9, 7], [2, 2]
    targets = [[ids[0, 7:].tolist()], [ids[1, 5:7].tolist()]]
    layout = Layout.build(
        [Decoding(k) for k in KINDS],
        [Signal(Decoding(DecoderKind.LOGIT_LENS), Confidence.ENTROPY)],
        arch.num_layers,
        {},
    )
    rows = scoring.score_layers(arch, layout, {}, ids, input_lens, cont_lens, targets, False)

    positions = torch.arange(9)[None]
    hidden = arch.embed(ids, positions)
    for layer in range(arch.num_layers + 1):
        if layer:
            hidden = arch.run_blocks(hidden, layer - 1, layer, positions)
        for r, (n, c) in enumerate(zip(input_lens, cont_lens, strict=True)):
            cols = torch.arange(n - c, n)
            for kind in KINDS:
                logits = decode(arch, kind, layer, hidden[r, [0] * c], hidden[r, cols], cols).logits
                want = F.log_softmax(logits, dim=-1)[torch.arange(c), targets[r][0]].sum()
                got = rows[r].loglik[0, layout.column(Decoding(kind), layer)]
                assert abs(float(got) - float(want)) < 1e-5
            if layer < arch.num_layers:
                u = uncertainty(arch.head(hidden[r, n - c][None]), Confidence.ENTROPY)
                assert abs(float(rows[r].uncertainty[0, layer]) - float(u)) < 1e-5
