"""The method contract: one `Method` subclass per paper, registered by name.

A method sees a `DecodeContext` (prompt, models, sampling settings, trace) and
returns the new token ids. It never counts its own cost: the harness hooks the
models and counts every forward pass and every token processed.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch


@dataclass(frozen=True)
class Paper:
    title: str
    arxiv: str | None = None
    url: str | None = None
    venue: str | None = None

    def cite(self) -> str:
        where = f"arXiv:{self.arxiv}" if self.arxiv else (self.url or self.venue or "")
        return f"{self.title} ({where})" if where else self.title


@dataclass(frozen=True)
class Needs:
    draft: bool = False  # a separate draft model sharing the target's tokenizer
    trained: bool = False  # trained parts beyond the target (heads, adapters)

    def describe(self) -> str:
        parts = [name for name, on in (("draft model", self.draft), ("trained parts", self.trained)) if on]
        return ", ".join(parts) or "nothing"


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


class BudgetExhausted(Exception):
    """Raised by the harness's model hooks when a compute budget runs out."""


@dataclass
class Trace:
    """Per-step proposal/acceptance record; the harness checks it against its own counts."""

    proposed: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)  # tokens kept per target pass, bonus included

    def step(self, proposed: int, accepted: int) -> None:
        self.proposed.append(int(proposed))
        self.accepted.append(int(accepted))


@dataclass
class DecodeContext:
    prompt_ids: list[int]
    target: torch.nn.Module
    sampling: Sampling
    max_new_tokens: int
    eos_token_ids: frozenset[int]
    draft: torch.nn.Module | None = None
    tokenizer: Any = None
    generator: torch.Generator | None = None
    trace: Trace = field(default_factory=Trace)
    output: list[int] = field(default_factory=list)
    # per-item figures a method reports (copied into the record as they are, e.g. acceptance of a search)
    extras: dict[str, float] = field(default_factory=dict)
    # the method's own data structures (tables, matrices, datastores): the HARNESS measures their bytes
    # (`method_state_bytes`), so the memory a method adds is not a self-reported figure
    state: dict[str, Any] = field(default_factory=dict)
    # other outputs a multi-draft method produced besides `output` (kept in the record, decoded)
    alternatives: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.generator is None:
            self.generator = torch.Generator(device="cpu").manual_seed(self.sampling.seed)

    @property
    def done(self) -> bool:
        return len(self.output) >= self.max_new_tokens or (
            bool(self.output) and self.output[-1] in self.eos_token_ids
        )

    def emit(self, tokens: list[int], proposed: int = 0, record_step: bool = True) -> list[int]:
        """Append one target pass's tokens, cut at EOS (kept) and at max_new_tokens; return those kept."""
        kept: list[int] = []
        for tok in tokens:
            if self.done:
                break
            self.output.append(int(tok))
            kept.append(int(tok))
        if record_step:
            self.trace.step(proposed, len(kept))
        return kept


SELF_DRAFT_FLAG = "_decodebench_self_drafting"


@contextmanager
def self_drafting(model: torch.nn.Module):
    """Mark the passes a method runs through the target itself to draft (layers skipped, say): the
    harness's hooks count them as draft passes, not as target passes that must each emit tokens."""
    setattr(model, SELF_DRAFT_FLAG, True)
    try:
        yield model
    finally:
        setattr(model, SELF_DRAFT_FLAG, False)


def is_self_drafting(model: torch.nn.Module) -> bool:
    return bool(getattr(model, SELF_DRAFT_FLAG, False))


class Method:
    """Base class. Subclasses set `paper`, `needs`, `lossless`, a `Config` dataclass, and `generate`."""

    name: ClassVar[str] = ""
    paper: ClassVar[Paper | None] = None
    needs: ClassVar[Needs] = Needs()
    lossless: ClassVar[bool] = True  # output distribution equals the target's (greedy: same tokens)
    reference: ClassVar[bool] = False  # an outside implementation shown as a peer, not ours
    counterpart: ClassVar[str | None] = None  # for a reference: which of our methods it is compared with

    @dataclass
    class Config:
        pass

    def __init__(self, **overrides: Any) -> None:
        known = {f.name: f for f in dataclasses.fields(self.Config)}
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise ValueError(
                f"method {self.name!r} has no setting {', '.join(unknown)}; it has: {', '.join(known) or 'none'}"
            )
        coerced = {k: _coerce(v, known[k].type) for k, v in overrides.items()}
        self.config = self.Config(**coerced)

    def generate(self, ctx: DecodeContext) -> list[int]:
        raise NotImplementedError

    @classmethod
    def describe(cls) -> dict[str, Any]:
        return {
            "paper": cls.paper.title if cls.paper else "",
            "arxiv": cls.paper.arxiv if cls.paper else None,
            "url": cls.paper.url if cls.paper else None,
            "needs": cls.needs.describe(),
            "lossless": cls.lossless,
            "reference": cls.reference,
            "counterpart": cls.counterpart,
        }


def _coerce(value: Any, annotation: Any) -> Any:
    """Turn CLI strings into the Config field's type (annotations are strings under __future__)."""
    if not isinstance(value, str):
        return value
    kind = str(annotation)
    if kind.startswith("int"):
        return int(value)
    if kind.startswith("float"):
        return float(value)
    if kind.startswith("bool"):
        return value.lower() in ("1", "true", "yes", "on")
    return value


_REGISTRY: dict[str, type[Method]] = {}


def register(name: str):
    def wrap(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method name {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _discover() -> None:
    """Import every module in methods/ so that one new file is enough to add a method."""
    import methods

    for info in pkgutil.iter_modules(methods.__path__):
        if info.name not in ("base", "common"):
            importlib.import_module(f"methods.{info.name}")


def registry() -> dict[str, type[Method]]:
    _discover()
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> type[Method]:
    methods = registry()
    if name not in methods:
        raise KeyError(f"unknown method {name!r}; known methods: {', '.join(methods)}")
    return methods[name]
