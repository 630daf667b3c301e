"""Model transforms: what a model computes with, changed for one run (quantized or perturbed weights, quantized
activations, int8 kernels), in the spirit of cache_policy.py: one transform per file, a Config of knobs, and a
context manager that attaches to the models.

A transform subclasses `ModelTransform` and fills `apply(model, edit)`, making every change through `edit`:
`edit.replace(obj, name, value)` (a module's weight Parameter, a submodule, an instance attribute) and
`edit.hook(handle)` (forward pre-hooks on layers). `transform.attach(target, draft)` applies it to each model
given and, on exit, exception or not, undoes every change in reverse order: the original Parameter objects go
back in place, untouched (never written in place), so the weights are restored bit for bit and one loaded model
serves `ar` and `ar+w8` in one run. One transform per model at a time (attaching the same transform again inside
its own attach is a no-op, so the runner can apply it outside the timed region and `generate` again inside).
Between attaches a transform may keep what it derives from a weight (`derived`: int8 packing takes seconds a
model, and the runner attaches once per record), keyed weakly by the weight and checked against its version.

Composition (cache_policy.compose): `DECODER[+POLICY][+TRANSFORM]`; a transform alone runs under `ar`, and it
changes the target and the draft alike (`sps+w8`: both quantized). A decoder that is lossless stays lossless
relative to `ar` on the same transformed model when the transform is `token_wise` (each token's output depends on
that token's inputs only, the same at every pass: weight changes, per-token activation quantization); a transform
that is not (random activation noise drawn per pass, per-tensor activation scales shared by a pass's tokens) makes
the composition lossy.
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from methods.base import Paper, Settings, build_config


@dataclass
class TransformSettings(Settings):
    pass


_MISSING = object()


class Edit:
    """The changes made to one model, undone in reverse order by `undo`."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._undo: list[Callable[[], None]] = []

    def replace(self, obj: Any, name: str, value: Any) -> None:
        """Set `obj.name` (a Parameter, a submodule, an instance attribute such as `forward`); undo puts the
        original object back, or removes an instance attribute the object did not have."""
        if isinstance(obj, torch.nn.Module) and (name in obj._parameters or name in obj._modules):
            old = getattr(obj, name)
            self._undo.append(lambda: setattr(obj, name, old))
        else:
            old = obj.__dict__.get(name, _MISSING)
            self._undo.append(lambda: delattr(obj, name) if old is _MISSING else setattr(obj, name, old))
        setattr(obj, name, value)

    def replace_weight(self, module: torch.nn.Module, tensor: torch.Tensor, name: str = "weight") -> None:
        """A new Parameter holding `tensor` as `module.name` (a tied weight stays with the other module)."""
        self.replace(module, name, torch.nn.Parameter(tensor, requires_grad=False))

    def hook(self, handle) -> None:
        self._undo.append(handle.remove)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


_ACTIVE: dict[int, ModelTransform] = {}  # id(model) -> the transform attached to it
# (transform class, its settings) -> {id(weight): (weakref, version, derived value)}: shared by every instance
# with the same settings, so `int8`, `sps+int8` and `pld+int8` in one run pack the weights once, not thrice
_DERIVED: dict[tuple[type, str], dict[int, tuple]] = {}


class ModelTransform:
    """Base of every model transform: `paper`, a `Config` (TransformSettings), and `apply`."""

    name: ClassVar[str] = ""
    paper: ClassVar[Paper | None] = None
    simulated: ClassVar[bool] = True  # fake quantization: float weights that hold quantized values (no speed-up)
    # the dtype its layers compute in where coarser than the model's (int8_wo: bfloat16 activations and outputs):
    # the lossless check's numerical-tie threshold is that dtype's (kernels sum in other orders at other widths)
    compute_dtype: ClassVar[str | None] = None

    @dataclass
    class Config(TransformSettings):
        pass

    def __init__(self, **overrides: Any) -> None:
        self.config = build_config(self.name, self.Config, overrides)

    @property
    def token_wise(self) -> bool:
        """Each token's output depends on that token's inputs only, identically at every pass (see the module
        docstring): lossless decoders stay lossless relative to `ar` under this transform."""
        return True

    def apply(self, model: torch.nn.Module, edit: Edit) -> None:
        """Change `model` through `edit` only."""
        raise NotImplementedError

    def bytes_saved(self, model: torch.nn.Module) -> int:
        """Weight bytes a decoding step reads less under this transform (its int8 weights and their scales in
        place of the float weights); 0 for a simulated one, which reads what the model reads."""
        return 0

    def derived(self, weight: torch.Tensor, make: Callable[[torch.Tensor], Any]) -> Any:
        """`make(weight)`, computed once per weight (and per transform settings) while the weight lives and is
        not changed in place."""
        cache = self.derived_cache()
        key = id(weight)
        held = cache.get(key)
        if held is None or held[0]() is not weight or held[1] != weight._version:
            ref = weakref.ref(weight, lambda _, key=key: cache.pop(key, None))  # gone with the weight
            held = cache[key] = (ref, weight._version, make(weight))
        return held[2]

    def derived_cache(self) -> dict[int, tuple]:
        """What `derived` holds for this transform's class and settings: id(weight) -> (ref, version, value)."""
        return _DERIVED.setdefault((type(self), repr(sorted(self.settings().items()))), {})

    def attached_to(self, model: torch.nn.Module) -> bool:
        return _ACTIVE.get(id(model)) is self

    @contextlib.contextmanager
    def attach(self, *models: torch.nn.Module | None) -> Iterator[None]:
        """Transform each model given (None and models already under this transform are skipped) for the
        duration of the block; every change is undone on exit, exception or not."""
        edits: list[Edit] = []
        try:
            for model in models:
                if model is None or self.attached_to(model) or any(e.model is model for e in edits):
                    continue
                other = _ACTIVE.get(id(model))
                if other is not None:
                    raise RuntimeError(f"transform {other.name} is already attached to this model; one at a time")
                edit = Edit(model)
                edits.append(edit)
                _ACTIVE[id(model)] = self
                with torch.no_grad():
                    self.apply(model, edit)
            yield
        finally:
            for edit in reversed(edits):
                edit.undo()
                _ACTIVE.pop(id(edit.model), None)

    def settings(self) -> dict[str, Any]:
        return asdict(self.config)

    @classmethod
    def describe(cls) -> dict[str, Any]:
        return {"paper": cls.paper.title if cls.paper else "", "arxiv": cls.paper.arxiv if cls.paper else None,
                "simulated": cls.simulated}


def linear_layers(model: torch.nn.Module, head: bool) -> list[tuple[str, torch.nn.Linear]]:
    """The model's nn.Linear layers by name, the output head (lm_head) only if `head`."""
    out_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and (head or m is not out_head)]
