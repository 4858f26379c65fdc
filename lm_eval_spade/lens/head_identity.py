"""Which final norm + LM head a lens was trained on.

A translator's output only means something through the head it was trained with, so a
checkpoint records two things about it:

- `head_hash`: SHA-256 of the exact float32 values of every head tensor (shapes and
  names included). Equal hashes mean the same head, bit for bit.
- `head_fingerprint`: the head's logits for a few fixed random probe vectors. The same
  checkpoint loaded in bfloat16 or float16 has another hash but nearly the same logits,
  so a lens trained in float32 still loads on a half-precision model; another model's
  head gives unrelated logits and is refused.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from lm_eval_spade.architectures import Architecture

_PROBES = 4
_PROBE_LOGITS = 16
_PROBE_SEED = 20250723


def head_hash(arch: Architecture) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(arch.head_parameters().items()):
        values = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(values.shape)};".encode())
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def head_fingerprint(arch: Architecture) -> list[float]:
    generator = torch.Generator().manual_seed(_PROBE_SEED)
    probes = torch.randn(_PROBES, arch.hidden_size, generator=generator)
    param = arch.lm_head.weight
    logits = arch.head(probes.to(param.device, param.dtype)).float().cpu()
    return [round(float(v), 6) for v in logits[:, :_PROBE_LOGITS].flatten()]


def fingerprints_match(stored: list[float], current: list[float]) -> bool:
    """Equal up to half-precision rounding: 3% of the logits' spread, elementwise."""
    a, b = torch.tensor(stored), torch.tensor(current)
    if a.shape != b.shape:
        return False
    scale = float(a.abs().max().clamp_min(1e-6))
    return bool(((a - b).abs() <= 0.03 * scale).all())


def tuned_lens_unembed_hash(arch: Architecture) -> str:
    """tuned-lens's own `Unembed.unembedding_hash`: the head weight printed to 1 decimal."""
    weight = arch.lm_head.weight.detach().to("cpu", torch.float32).numpy()
    return hashlib.sha256(str.encode(np.array_str(weight, precision=1))).hexdigest()
