"""Uniform round-to-nearest quantization (simulated: quantize, then dequantize to floats) and the sign-preserving
power transform of non-uniform quantization, shared by the transforms (methods/quant_perturbation.py,
methods/int8.py). Rows are quantized along their last dimension, on one grid per row or per group of
consecutive columns.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def rtn(x: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest over the last dimension, one grid per row: (dequantized values, scale per row).

    symmetric: scale = max|x| / (2^(b-1) - 1), integers in [-(2^(b-1) - 1), 2^(b-1) - 1] (the restricted range,
    so that the grid is symmetric about 0); asymmetric: min-max, scale = (max - min) / (2^b - 1) with an integer
    zero point. Either way |x - q(x)| <= scale / 2. A constant row (scale 0) is kept as it is."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = x.abs().amax(-1, keepdim=True) / qmax
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        return torch.round(x / safe).clamp_(-qmax, qmax).mul_(safe), scale
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = (hi - lo) / (2**bits - 1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / safe)
    q = (torch.round(x / safe) + zero).clamp_(0, 2**bits - 1)
    return torch.where(scale > 0, (q - zero) * safe, x), scale


def per_group(x: torch.Tensor, group_size: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`fn` (which works along the last dimension) applied to each group of `group_size` consecutive columns of
    each row; 0 = the whole row. A row whose length is not a multiple of the group size ends in a shorter group."""
    cols = x.shape[-1]
    size = group_size if 0 < group_size < cols else cols
    full = cols // size * size
    lead = x.shape[:-1]
    parts = [fn(x[..., :full].reshape(*lead, full // size, size)).reshape(*lead, full)]
    if full < cols:
        parts.append(fn(x[..., full:]))
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


def signed_power(x: torch.Tensor, exponent: float) -> torch.Tensor:
    """sign(x) |x|^exponent: the non-uniform quantizer's transform (exponent < 1 spreads small values over more
    levels); `signed_power(signed_power(x, p), 1 / p)` is x up to float rounding."""
    return torch.sign(x) * x.abs().pow(exponent)


def fake_quantize(x: torch.Tensor, bits: int, symmetric: bool = True, group_size: int = 0,
                  power: float | None = None) -> torch.Tensor:
    """x quantized and dequantized in float32 (returned in x's dtype): uniform RTN per row or per group, or, with
    `power`, RTN of signed_power(x, power) mapped back by signed_power(., 1 / power) (non-uniform levels)."""
    y = x.float()
    if power is not None:
        y = signed_power(y, power)
    y = per_group(y, group_size, lambda g: rtn(g, bits, symmetric)[0])
    if power is not None:
        y = signed_power(y, 1.0 / power)
    return y.to(x.dtype)
