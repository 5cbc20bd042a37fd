"""Weight quantization of a loaded model, for the attack suite (what a cheating executor runs).

Per-output-channel symmetric fake quantization of every `nn.Linear` weight (the attention and
MLP projections and the LM head): each row is scaled so its largest |w| maps to the largest
integer of the format, rounded, clamped and scaled back. The model then computes in the same
precision as before, with weights an int8 or int4 kernel would hold; this is the arithmetic
effect of weight-only quantization (as in GPTQ/AWQ-style int8/int4 deployments) without their
kernels. Norms stay as they are; embeddings too, unless tied to the LM head (as in gonka-tiny),
in which case they are quantized with it.
"""

from __future__ import annotations

import torch
from torch import nn

BITS = {"int8": 8, "int4": 4}


def fake_quantize_(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize a 2-D weight in place, per output channel (row), symmetric; returns it."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in [2, 16], got {bits}")
    qmax = 2 ** (bits - 1) - 1
    with torch.no_grad():
        w = weight.float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / qmax
        q = torch.clamp(torch.round(w / scale), -qmax, qmax)
        weight.copy_((q * scale).to(weight.dtype))
    return weight


def quantize_model_(model: nn.Module, scheme: str) -> int:
    """Fake-quantize every Linear weight of `model` in place; returns how many were changed."""
    if scheme not in BITS:
        raise ValueError(f"scheme must be one of {sorted(BITS)}, got {scheme!r}")
    n = 0
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            fake_quantize_(module.weight.data, BITS[scheme])
            n += 1
    return n
