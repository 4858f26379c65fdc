"""Training translators: KL from the target distributions to the lens's, per layer.

Translators of different layers share nothing, so one loss (the sum over layers) trains
them all at once; each step runs the frozen model on a batch of examples to make targets
(`targets.py`), which keeps memory flat however much data there is, as tuned-lens does.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lm_eval_spade.architectures import Architecture, architecture_for
from lm_eval_spade.decoders import SpadePositions
from lm_eval_spade.errors import UserInputError
from lm_eval_spade.finite import check_training_step, is_rate, optimiser_step
from lm_eval_spade.lens.checkpoint import Lens
from lm_eval_spade.lens.targets import Targets, encode, final_layer_targets, lspade_targets
from lm_eval_spade.lens.translators import LensKind

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "sgd")


class LensTrainingError(UserInputError):
    """Lens training settings that cannot work."""


@dataclass
class LensTrainConfig:
    """How to train a lens. `layers=None` means every layer below the last."""

    kind: LensKind
    layers: list[int] | None = None
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    seed: int = 0
    max_length: int = 512
    spade_positions: SpadePositions = SpadePositions.ORIGINAL
    eval_fraction: float = 0.1
    #: Targets of all training examples are made once and kept when they fit in this
    #: many MiB (they do not change between epochs); otherwise each step makes its own.
    cache_mb: int = 2048
    #: The start token examples begin with (spade-exit's `prefix_token_id`); None: BOS,
    #: else EOS. Train with the one the lens will be used with.
    prefix_token_id: int | None = None

    def check(self, num_layers: int) -> list[int]:
        """Validate against the model; return the layers to train."""
        layers = list(range(num_layers)) if self.layers is None else sorted(set(self.layers))
        bad = [layer for layer in layers if not 0 <= layer < num_layers]
        if bad or not layers:
            raise LensTrainingError(
                f"layers {bad or layers} are out of range: this model has {num_layers} blocks, "
                f"so translators exist for layers 0..{num_layers - 1} (layer {num_layers} is "
                "the model's own output and needs none)."
            )
        if self.optimizer not in OPTIMIZERS:
            raise LensTrainingError(
                f"optimizer={self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}."
            )
        for name in ("steps", "batch_size", "max_length", "cache_mb"):
            if getattr(self, name) < (0 if name == "cache_mb" else 1):
                raise LensTrainingError(f"{name}={getattr(self, name)} is too small.")
        if not is_rate(self.lr):
            raise LensTrainingError(
                f"lr must be a positive finite number (at most 3.4e38), not {self.lr}."
            )
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise LensTrainingError(
                f"weight_decay must be a finite number >= 0 (0: none), not {self.weight_decay}."
            )
        if not 0 <= self.eval_fraction < 1:
            raise LensTrainingError(f"eval_fraction must be in [0, 1), not {self.eval_fraction}.")
        return layers

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["kind"], data["spade_positions"] = self.kind.value, self.spade_positions.value
        return data


@dataclass
class TrainedLens:
    lens: Lens
    report: pd.DataFrame  # per layer: KL before (logit lens) and after training
    losses: list[float] = field(default_factory=list)

    def kl_table(self) -> str:
        """The report as markdown; layers stay integers (pandas would print `3.0000`)."""
        return self.report.astype({"layer": object}).to_markdown(index=False, floatfmt=".4f")


@contextmanager
def _frozen(model: torch.nn.Module):
    """No gradients into the model's own weights while the translators train."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def make_targets(
    arch: Architecture, config: LensTrainConfig, ids: list[list[int]], layers: list[int]
) -> Targets:
    if config.kind is LensKind.LSPADE:
        return lspade_targets(arch, ids, layers, config.spade_positions)
    return final_layer_targets(arch, ids, layers)


class TargetSource:
    """Targets for any batch of training examples: from a cache, or made on demand."""

    def __init__(
        self,
        arch: Architecture,
        config: LensTrainConfig,
        ids: list[list[int]],
        layers: list[int],
        progress: bool,
        used: list[int] | None = None,
    ) -> None:
        """`used`: the examples training will ask for (default: all); only their targets
        are made, so a short run on a large split does not wait for the whole split."""
        self.arch, self.config, self.ids, self.layers = arch, config, ids, layers
        self.used = list(range(len(ids))) if used is None else sorted(set(used))
        self.cache: dict[int, Targets] | None = None
        need = self._estimate_bytes()
        if need <= config.cache_mb * 2**20:
            self.cache = {}
            starts = range(0, len(self.used), config.batch_size)
            for start in tqdm(starts, desc="making targets", disable=not progress):
                chunk = self.used[start : start + config.batch_size]
                made = make_targets(arch, config, [ids[i] for i in chunk], layers)
                self.cache.update(zip(chunk, made.per_example(), strict=True))
        else:
            logger.info(
                "targets need %.0f MiB > cache_mb=%d: making them at every step",
                need / 2**20,
                config.cache_mb,
            )

    def _estimate_bytes(self) -> int:
        d, vocab = self.arch.hidden_size, int(self.arch.lm_head.weight.shape[0])
        if self.config.kind is LensKind.LSPADE:
            return 4 * len(self.used) * len(self.layers) * (d + vocab)
        tokens = sum(len(self.ids[i]) for i in self.used)
        return 4 * tokens * (len(self.layers) * d + vocab)

    def batch(self, indices: list[int]) -> Targets:
        if self.cache is not None:
            return Targets.cat([self.cache[i] for i in indices])
        return make_targets(self.arch, self.config, [self.ids[i] for i in indices], self.layers)


def _kl(arch: Architecture, lens: Lens | None, targets: Targets, layer: int) -> torch.Tensor:
    """Summed KL(target || lens) over the batch's positions, at one layer."""
    states = targets.states[layer]
    logits = arch.head(states) if lens is None else lens.logits(arch, states, layer)
    log_q = F.log_softmax(logits.float(), dim=-1)
    return F.kl_div(log_q, targets.log_probs[layer], log_target=True, reduction="sum")


@torch.no_grad()
def evaluate_kl(
    arch: Architecture,
    lens: Lens | None,
    config: LensTrainConfig,
    ids: list[list[int]],
    layers: list[int],
    desc: str | None = None,
) -> dict[int, float]:
    """Mean KL(target || lens) per position at each layer; `lens=None` is logit lens.

    `desc`: show a progress bar with this label (a tuned lens's held-out targets, every
    position through the head at every layer, take minutes on CPU)."""
    totals, count = dict.fromkeys(layers, 0.0), 0
    starts = range(0, len(ids), config.batch_size)
    for start in tqdm(starts, desc=desc, disable=desc is None):
        targets = make_targets(arch, config, ids[start : start + config.batch_size], layers)
        count += targets.positions
        for layer in layers:
            totals[layer] += float(_kl(arch, lens, targets, layer))
    return {layer: total / max(count, 1) for layer, total in totals.items()}


def batch_order(n: int, steps: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """The examples of every step: epochs of seeded permutations, cut into batches."""
    order: list[int] = []
    batches = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(n, generator=generator).tolist()
        batches.append(order[:batch_size])
        order = order[batch_size:]
    return batches


def _split(
    ids: list[list[int]], fraction: float, generator: torch.Generator
) -> tuple[list[list[int]], list[list[int]]]:
    if fraction == 0 or len(ids) < 2:
        return ids, []
    order = torch.randperm(len(ids), generator=generator).tolist()
    n_eval = max(1, round(len(ids) * fraction))
    return [ids[i] for i in order[n_eval:]], [ids[i] for i in order[:n_eval]]


def train_lens(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: list[str],
    config: LensTrainConfig,
    eval_texts: list[str] | None = None,
    data_info: dict[str, Any] | None = None,
    revision: str | None = None,
    progress: bool = True,
) -> TrainedLens:
    """Train a lens on `texts` (prompts for L-SPADE, documents for tuned lens).

    Held-out KL is measured on `eval_texts`, or else on a seeded `eval_fraction` of
    `texts` that training never sees.
    """
    arch = architecture_for(model)
    layers = config.check(arch.num_layers)
    generator = torch.Generator().manual_seed(config.seed)
    ids = encode(tokenizer, texts, config.max_length, config.prefix_token_id)
    if eval_texts is not None:
        train_ids, eval_ids = (
            ids,
            encode(tokenizer, eval_texts, config.max_length, config.prefix_token_id),
        )
    else:
        train_ids, eval_ids = _split(ids, config.eval_fraction, generator)
    lens = Lens.untrained(arch, config.kind, layers, revision=revision)
    lens.to(arch.lm_head.weight.device)
    params = list(lens.parameters())
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.SGD(
            params, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay
        )

    losses: list[float] = []
    batches = batch_order(len(train_ids), config.steps, config.batch_size, generator)
    used = sorted({i for batch in batches for i in batch})
    if len(used) < len(train_ids):
        logger.info(
            "%d steps of %d examples use %d of the %d training examples; targets are made "
            "for those only (more --steps use more)",
            config.steps, config.batch_size, len(used), len(train_ids),
        )  # fmt: skip
    with _frozen(model):
        held_out = "held-out KL, logit lens" if progress else None
        before = evaluate_kl(arch, None, config, eval_ids, layers, held_out) if eval_ids else {}
        source = TargetSource(arch, config, train_ids, layers, progress, used)
        bar = tqdm(batches, desc=f"train {config.kind.value}", disable=not progress)
        for step, batch in enumerate(bar):
            targets = source.batch(batch)
            loss = sum(_kl(arch, lens, targets, layer) for layer in layers) / targets.positions
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            with optimiser_step(step + 1, config.steps, config.lr):
                optimizer.step()
            losses.append(float(loss.detach()) / len(layers))
            check_training_step(
                step + 1, config.steps, losses[-1], lens.named_parameters(), config.lr
            )
            bar.set_postfix(kl=f"{losses[-1]:.4f}")
        held_out = f"held-out KL, {config.kind.value}" if progress else None
        after = evaluate_kl(arch, lens, config, eval_ids, layers, held_out) if eval_ids else {}

    report = pd.DataFrame(
        {
            "layer": layers,
            "kl_logit_lens": [before.get(layer, float("nan")) for layer in layers],
            "kl_trained": [after.get(layer, float("nan")) for layer in layers],
        }
    )
    lens.config.training = {
        **(data_info or {}),
        "train_examples": len(train_ids),
        "train_examples_used": len(used),
        "eval_examples": len(eval_ids),
        "settings": config.to_dict(),
        "final_train_kl": losses[-1] if losses else None,
        "heldout_kl": report.to_dict(orient="records") if eval_ids else [],
    }
    return TrainedLens(lens, report, losses)
