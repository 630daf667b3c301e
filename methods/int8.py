"""Real int8 inference (not simulated): every nn.Linear of the decoder, the LM head included, computed by int8
kernels while the transform is attached. Weights: symmetric int8, one scale per output channel.

- `int8`: dynamic W8A8 with one activation scale per token. On the CPU, PyTorch's quantized dynamic linear
  (fbgemm/oneDNN, the kernel behind torch.ao.quantization.quantize_dynamic), which quantizes its input to uint8
  with ONE affine scale for the whole pass, then an int8 GEMM with int32 accumulation. Used as is, a token's
  output would depend on the other tokens of its pass (a speculative decoder's verification pass would see other
  scales than `ar`'s one-token passes: outputs differed from `ar+int8` in 4 of 7 Spec-Bench turns). So each token
  is divided by its own max |x| and two rows (+1 and -1) are appended: the pass's range is then always [-1, 1],
  the grid the same for every token, the integer products exact, and the row's output, times its scale, is
  bit-for-bit the same whatever else is in the pass (tested): per-token quantization (as llama.cpp's and
  SmoothQuant's W8A8), for 15-35% more time per layer call than the per-pass kernel (0.61 vs 0.52 ms at 1 token,
  0.81 vs 0.60 at 8, one 1536x8960 layer). Still NOT token-wise as a model: attention sums in another order in a
  k-token pass than in a 1-token one, and a last-bit difference that moves an activation across a rounding
  boundary changes it by a whole quantization step (on the demo: sps+int8 5/6 and pld+int8 4/6 turns equal to
  ar+int8, against 3/7 with the per-pass scale). So decoders under `int8` are not checked token for token;
  `int8_wo` (below) is.
- `int8_wo`: weight-only int8. On the CPU, torch._weight_int8pack_mm with bfloat16 activations (its fast path;
  float32 inputs take a path slower than float32 matmul), output cast back: each token alone, so lossless
  decoders stay lossless relative to `ar+int8_wo` up to the GEMM's summation order, which differs between a
  1-token and an 8-token pass and shows at bfloat16's resolution (logits of 30 in steps of 0.25): the lossless
  check judges ties at bfloat16's threshold under it (`compute_dtype`).
- `backend=torchao`: torchao's Int8DynamicActivationInt8WeightConfig / Int8WeightOnlyConfig, the default on a
  GPU. On this CPU (torch 2.13, torchao 0.18, AVX-512 VNNI) its eager int8 paths ran 6-7x SLOWER than float32 on
  one 1536x8960 layer (28-36 ms vs 4.4 ms at 1 token), while the quantized dynamic linear ran it in 0.65 ms
  (README, "Model transforms"); hence the CPU default. torchao is imported only when asked for.

The layers keep their modules, hooks and float weights (never written): the int8 weights are packed at attach
and each Linear's `forward` is replaced on the instance (no class is patched), restored on exit.
"""
from __future__ import annotations

import types
import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from methods.base import Paper, SettingError, register_transform, setting
from methods.common.transform import (
    Edit,
    ModelTransform,
    TransformSettings,
    linear_layers,
)

PAPER = Paper("Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference",
              arxiv="1712.05877")


def int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 weights (values in [-127, 127]) and one float32 scale per output row."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


class _Int8(ModelTransform):
    paper = PAPER
    simulated = False
    dynamic = True  # activations quantized too

    @dataclass
    class Config(TransformSettings):
        backend: Literal["auto", "cpu", "torchao"] = setting("auto", "auto: the PyTorch CPU kernels on a CPU, "
                                                                     "torchao elsewhere")
        head: bool = setting(True, "also the LM head (28M of SmolLM2-135M's 135M weights, read at every step)")

    def _backend(self, model: torch.nn.Module) -> str:
        device = next(model.parameters()).device.type
        backend = self.config.backend
        if backend == "auto":
            backend = "cpu" if device == "cpu" else "torchao"
        if backend == "cpu" and device != "cpu":
            raise SettingError(f"{self.name}.backend=cpu: the model is on {device}")
        return backend

    def apply(self, model: torch.nn.Module, edit: Edit) -> None:
        layers = linear_layers(model, self.config.head)
        if self._backend(model) == "torchao":
            _torchao(model, layers, edit, self.dynamic)
            return
        for _, module in layers:
            edit.replace(module, "forward", types.MethodType(self._cpu_forward(module), module))

    def _cpu_forward(self, module: torch.nn.Linear):
        raise NotImplementedError

    def bytes_saved(self, model: torch.nn.Module) -> int:
        """Each layer's float weight read as int8 plus one float32 scale per output channel."""
        return sum(m.weight.numel() * (m.weight.element_size() - 1) - 4 * m.weight.shape[0]
                   for _, m in linear_layers(model, self.config.head))


@register_transform("int8")
class Int8Dynamic(_Int8):
    """Dynamic W8A8 on int8 kernels (module docstring)."""

    @dataclass
    class Config(_Int8.Config):
        reduce_range: bool = setting(False, "on the CPU: 7-bit activations, for CPUs without VNNI (their u8*s8 "
                                            "products can saturate)")

    @property
    def token_wise(self) -> bool:
        return False  # activation rounding amplifies summation-order differences (module docstring)

    def _cpu_forward(self, module: torch.nn.Linear):
        packed = self.derived(module.weight, lambda w: _packed(w, None))
        bias, reduce_range, dtype = module.bias, self.config.reduce_range, module.weight.dtype

        def forward(self_, x: torch.Tensor) -> torch.Tensor:
            flat = x.reshape(-1, x.shape[-1]).float()
            scale = flat.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
            bounds = flat.new_zeros(2, flat.shape[1])
            bounds[0, 0], bounds[1, 0] = 1.0, -1.0  # the pass's range is [-1, 1] whatever its tokens
            rows = torch.ops.quantized.linear_dynamic(torch.cat([flat / scale, bounds]), packed, reduce_range)
            out = (rows[:-2] * scale).to(dtype).reshape(*x.shape[:-1], rows.shape[1])
            return out if bias is None else out + bias
        return forward


@register_transform("int8_wo")
class Int8WeightOnly(_Int8):
    """Weight-only int8 (module docstring)."""

    dynamic = False
    compute_dtype = "bfloat16"  # on the CPU path: greedy ties are judged at bfloat16's resolution

    def _cpu_forward(self, module: torch.nn.Linear):
        q, scale = self.derived(module.weight, _int8pack)
        bias, dtype = module.bias, module.weight.dtype

        def forward(self_, x: torch.Tensor) -> torch.Tensor:
            flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
            out = torch._weight_int8pack_mm(flat, q, scale).to(dtype).reshape(*x.shape[:-1], q.shape[0])
            return out if bias is None else out + bias
        return forward


def _int8pack(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weights and bfloat16 scales, as torch._weight_int8pack_mm takes them."""
    q, scale = int8_per_channel(weight)
    return q.contiguous(), scale.to(torch.bfloat16)


def _packed(weight: torch.Tensor, bias: torch.Tensor | None):
    """The int8 weight (and float bias) packed for PyTorch's quantized dynamic linear."""
    q, scale = int8_per_channel(weight)
    with warnings.catch_warnings():  # quantized tensors are deprecated (torch 2.13), the kernels are not yet
        warnings.simplefilter("ignore", UserWarning)
        qweight = torch.quantize_per_channel(q.float() * scale[:, None], scale.double(),
                                             torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(qweight, bias)


def _torchao(model: torch.nn.Module, layers: list, edit: Edit, dynamic: bool) -> None:
    """torchao's int8 configs on each layer; its new weight Parameters go through `edit` (restored on exit)."""
    import logging

    logging.getLogger("torchao").setLevel(logging.ERROR)  # it logs every optional kernel library it lacks
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    config = Int8DynamicActivationInt8WeightConfig() if dynamic else Int8WeightOnlyConfig()
    for _, module in layers:
        original, repr_before = module.weight, module.__dict__.get("extra_repr")
        quantize_(module, config, filter_fn=lambda m, fqn, target=module: m is target)
        new = module.weight
        module.weight = original  # back for a moment, so that `edit` records the original Parameter
        edit.replace(module, "weight", new)
        if module.__dict__.get("extra_repr") is not repr_before:  # torchao may set its own repr on the instance
            shown = module.__dict__.pop("extra_repr")
            edit.replace(module, "extra_repr", shown)
