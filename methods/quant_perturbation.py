"""Quantization as perturbation (Gong et al., AAAI 2024): simulated post-training quantization of the weights and
activations, and the paper's artificial perturbations at a set relative strength, as a model transform.

SIMULATED: weights are quantized and dequantized back to floats (fake quantization) and activations likewise in a
forward pre-hook on each nn.Linear; the model computes in its own dtype, so this measures what quantization does
to likelihoods and outputs, never its speed (methods/int8.py runs real int8 kernels).

The paper views quantization as a perturbation added to weights and activations, X_q = X + D, and probes LLMs
with artificial perturbations of equal L2 norm: distribution-free ones (Gaussian, uniform, Rademacher),
magnitude-dependent ones (D grows with |x|, or shrinks), and clipping. Its finding: larger values tolerate larger
perturbations and small values are the vulnerable ones, while clipping (outliers) hurts most; so it quantizes
sign(x)|x|^(1/3) uniformly and maps back (non-uniform levels, dense near 0), near-lossless at W4A16 and W8A8.

Paper defaults and how we read them (the full text was not reachable from this machine; these follow its
abstract and a detailed summary, and the lines marked "ours" are our choices):
- uniform quantizer: round-to-nearest with a scale factor and no zero point, i.e. symmetric (ours: restricted
  range +-(2^(b-1) - 1)); per output channel, or per group of `group_size` input columns; asymmetric min-max is
  `symmetric=false`.
- non-uniform: exponent 1/3 (`power`), the same grid applied to sign(x)|x|^(1/3), inverted after.
- activations (W8A8): 8 bits, dynamic, one grid per token (ours: per-token is the paper's W8A8 reading; the same
  `symmetric` and non-uniform settings as the weights).
- layers: every nn.Linear of the decoder, the LM head left in full precision (ours, the usual PTQ convention;
  `head=true` includes it).
- perturbations: strength = ||D|| / ||X|| per weight matrix (per token for activations), the L2 norm the paper
  equalises across kinds; `match_quant=true` sets each matrix's (token's) strength to that of its own
  quantization error under the quantizer settings, the paper's fair comparison. Kinds (D = c * E, c fixing the
  norm): gaussian E ~ N(0, 1); uniform E ~ U(-1, 1); rademacher E = +-1; magnitude E = |x| * (+-1) (the paper's
  D_M+); inverse_magnitude E = (max|x| - |x|) * (+-1) (its D_M-, ours: this linear form); clip: x clipped to
  [-t, t], t chosen so that the clipping error has the set norm (its D_C, ours: set by norm, not by a fraction
  of clipped values). Seeded: each weight matrix's noise comes from (seed, layer name); activation noise from a
  generator seeded at attach, drawn anew at every pass (so a decoder under it is not lossless).
"""
from __future__ import annotations

import dataclasses
import typing
import zlib
from dataclasses import dataclass
from typing import Literal

import torch

from methods.base import Paper, SettingError, register_transform, setting
from methods.common.quantize import fake_quantize
from methods.common.transform import (
    Edit,
    ModelTransform,
    TransformSettings,
    linear_layers,
)

KINDS = ("gaussian", "uniform", "rademacher", "magnitude", "inverse_magnitude", "clip")


class QuantPerturbation(ModelTransform):
    paper = Paper("What Makes Quantization for Large Language Models Hard? An Empirical Study from the Lens of "
                  "Perturbation", arxiv="2403.06408", venue="AAAI 2024")
    simulated = True

    @dataclass
    class Config(TransformSettings):
        mode: Literal["quant", "perturb"] = setting("quant", "quant: simulated quantization; perturb: the paper's "
                                                             "artificial perturbations")
        bits: int = setting(8, "weight bits (quant mode; perturb mode with match_quant)", low=2, high=8)
        granularity: Literal["channel", "group"] = setting("channel", "one grid per output channel, or per group "
                                                                      "of group_size input columns")
        group_size: int = setting(128, "columns per group (granularity=group)", low=2)
        symmetric: bool = setting(True, "symmetric grid (scale only, the paper's); false: asymmetric min-max "
                                        "with a zero point")
        nonuniform: bool = setting(False, "quantize sign(x)|x|^power and map back (the paper's non-uniform "
                                          "quantizer)")
        power: float = setting(1 / 3, "exponent of the non-uniform transform (paper: 1/3)", low=0.01, high=1.0)
        activation_bits: int = setting(0, "bits of per-token dynamic activation quantization at every Linear's "
                                          "input; 0 = off (W8A8: 8)", low=0, high=8)
        kind: Literal[KINDS] = setting("gaussian", "perturbation (perturb mode)")
        strength: float = setting(0.01, "relative L2 norm ||D|| / ||X|| of the perturbation (per matrix; per "
                                        "token for activations)", low=0.0, high=10.0)
        match_quant: bool = setting(False, "perturb with the L2 norm of each matrix's (token's) own quantization "
                                           "error under bits/granularity/symmetric/nonuniform (and "
                                           "activation_bits) instead of strength")
        on: Literal["weights", "activations", "both"] = setting("weights", "what the perturbation is added to "
                                                                           "(perturb mode)")
        seed: int = setting(0, "seed of the perturbation noise", low=0)
        head: bool = setting(False, "also transform the LM head (tied to the embedding: only the head's copy)")

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.activation_bits == 1:
                raise SettingError("activation_bits must be 0 (off) or 2-8; got 1")
            acts = self.mode == "perturb" and self.on != "weights"
            if acts and self.match_quant and not self.activation_bits:
                raise SettingError("match_quant on activations needs activation_bits (the quantizer whose error "
                                   "norm the perturbation takes)")
            if self.mode == "perturb" and not self.match_quant and self.strength <= 0:
                raise SettingError("strength must be > 0 in perturb mode (or set match_quant=true)")

    # --- what the settings mean ---
    def _group(self) -> int:
        return self.config.group_size if self.config.granularity == "group" else 0

    def _power(self) -> float | None:
        return self.config.power if self.config.nonuniform else None

    def quantize_weight(self, w: torch.Tensor) -> torch.Tensor:
        c = self.config
        return fake_quantize(w, c.bits, c.symmetric, self._group(), self._power())

    def quantize_activation(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        return fake_quantize(x, c.activation_bits, c.symmetric, 0, self._power())  # one grid per token

    def _perturbs(self, what: str) -> bool:
        return self.config.mode == "perturb" and self.config.on in (what, "both")

    @property
    def token_wise(self) -> bool:
        """Random activation noise is drawn anew at every pass; everything else acts on each token alone."""
        return not (self._perturbs("activations") and self.config.kind != "clip")

    # --- the transform ---
    def apply(self, model: torch.nn.Module, edit: Edit) -> None:
        c = self.config
        layers = linear_layers(model, c.head)
        for name, module in layers:
            w = module.weight
            if c.mode == "quant":
                edit.replace_weight(module, self.quantize_weight(w))
            elif self._perturbs("weights"):
                strength = relative_error(w, self.quantize_weight(w)) if c.match_quant else c.strength
                generator = torch.Generator(device=w.device).manual_seed(zlib.crc32(f"{c.seed}:{name}".encode()))
                edit.replace_weight(module, perturbed(w, c.kind, strength, generator))
        if c.mode == "quant" and c.activation_bits:
            for _, module in layers:
                edit.hook(module.register_forward_pre_hook(self._quantize_input))
        elif self._perturbs("activations"):
            device = next(model.parameters()).device
            generator = torch.Generator(device=device).manual_seed(c.seed)
            for _, module in layers:
                edit.hook(module.register_forward_pre_hook(self._perturb_input(generator)))

    def _quantize_input(self, module, args):
        return (self.quantize_activation(args[0]), *args[1:])

    def _perturb_input(self, generator: torch.Generator):
        c = self.config

        def hook(module, args):
            x = args[0]
            strength = (relative_error(x, self.quantize_activation(x), per_row=True) if c.match_quant
                        else c.strength)
            return (perturbed(x, c.kind, strength, generator, per_row=True), *args[1:])
        return hook


def relative_error(x: torch.Tensor, q: torch.Tensor, per_row: bool = False) -> torch.Tensor | float:
    """||q - x|| / ||x||, over the whole tensor or per row (last dimension, kept)."""
    x, q = x.float(), q.float()
    if per_row:
        return (q - x).norm(dim=-1, keepdim=True) / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return ((q - x).norm() / x.norm().clamp_min(1e-30)).item()


def perturbed(x: torch.Tensor, kind: str, strength, generator: torch.Generator,
              per_row: bool = False) -> torch.Tensor:
    """x + D with ||D|| = strength * ||x|| (over the tensor, or per row), D of the given kind (module docstring)."""
    y = x.float()
    if kind == "clip":
        return clipped(y, strength, per_row).to(x.dtype)
    dims = {"dim": -1, "keepdim": True} if per_row else {}
    if kind == "gaussian":
        e = torch.randn(y.shape, generator=generator, device=y.device)
    elif kind == "uniform":
        e = torch.rand(y.shape, generator=generator, device=y.device) * 2 - 1
    else:
        e = torch.randint(0, 2, y.shape, generator=generator, device=y.device).float() * 2 - 1  # Rademacher
        if kind == "magnitude":
            e = e * y.abs()
        elif kind == "inverse_magnitude":
            e = e * (y.abs().amax(**dims) - y.abs())
    scale = strength * y.norm(**dims) / e.norm(**dims).clamp_min(1e-30)
    return (y + e * scale).to(x.dtype)


def clipped(x: torch.Tensor, strength, per_row: bool = False) -> torch.Tensor:
    """x clipped to [-t, t], t such that ||clip(x) - x|| = strength * ||x|| (exactly: the top-k magnitudes are
    clipped to the root t of sum_{i<=k} (a_i - t)^2 = target^2 that lies in [a_(k+1), a_k]). Strength >= 1 would
    need t < 0: clipped to 0."""
    rows = x.reshape(-1, x.shape[-1]) if per_row else x.reshape(1, -1)
    a = rows.abs().double().sort(dim=-1, descending=True).values  # a_1 >= a_2 >= ...
    target2 = (torch.as_tensor(strength, dtype=torch.float64, device=x.device).reshape(-1, 1) ** 2
               * (a**2).sum(-1, keepdim=True))
    k = torch.arange(1, a.shape[-1] + 1, device=x.device, dtype=torch.float64)
    s1, s2 = a.cumsum(-1), (a**2).cumsum(-1)
    disc = (s1**2 - k * (s2 - target2)).clamp_min(0)
    t = (s1 - disc.sqrt()) / k  # the smaller root: the error falls as t rises towards the top-k mean
    below = torch.cat((a[:, 1:], torch.zeros_like(a[:, :1])), dim=-1)  # a_(k+1)
    fits = (t >= below) & (t <= a)
    first = torch.where(fits.any(-1), fits.float().argmax(-1), torch.full_like(fits[:, 0], a.shape[-1] - 1,
                                                                             dtype=torch.long))
    threshold = t.gather(-1, first[:, None]).clamp_min(0).to(x.dtype)
    out = torch.maximum(torch.minimum(rows, threshold), -threshold)
    return out.reshape(x.shape)


def _with_defaults(config: type, **defaults) -> type:
    """`config` with other defaults (help and ranges kept): the short names' Configs."""
    hints = typing.get_type_hints(config)
    fields = [(f.name, hints[f.name], dataclasses.field(default=defaults[f.name], metadata=f.metadata))
              for f in dataclasses.fields(config) if f.name in defaults]
    return dataclasses.make_dataclass("Config", fields, bases=(config,))


register_transform("quant_perturbation")(QuantPerturbation)


def _short(name: str, doc: str, **defaults) -> type:
    cls = type(name, (QuantPerturbation,), {"__doc__": doc, "Config": _with_defaults(QuantPerturbation.Config,
                                                                                       **defaults)})
    return register_transform(name)(cls)


# What a user types: the paper's settings under short names (everything else: --set NAME.KNOB=VALUE)
_short("w8", "8-bit weights, per channel, uniform (simulated)")
_short("w4", "4-bit weights, groups of 128, uniform (simulated)", bits=4, granularity="group")
_short("w4_nonuniform", "4-bit weights, groups of 128, the paper's non-uniform x^(1/3) (simulated)", bits=4,
       granularity="group", nonuniform=True)
_short("w8a8", "8-bit weights per channel and 8-bit per-token activations, uniform (simulated)", activation_bits=8)
_short("w8a8_nonuniform", "W8A8 with the paper's non-uniform x^(1/3) (simulated)", activation_bits=8,
       nonuniform=True)
_short("perturb", "the paper's artificial perturbations (kind, strength) on the weights", mode="perturb")
