"""The method contract: one `Method` subclass per paper, registered by name.

A method sees a `DecodeContext` (prompt, models, sampling settings, trace) and
returns the new token ids. It never counts its own cost: the harness hooks the
models and counts every forward pass and every token processed.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
import types
import typing
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
    # the method's own data structures (tables, matrices, datastores), kept across prompts: the HARNESS
    # owns this dict (carries, snapshots and restores it, see `Method`) and measures its bytes
    # (`method_state_bytes`), so the memory a method adds is not a self-reported figure
    state: dict[str, Any] = field(default_factory=dict)
    # texts a corpus-based method may build its stores from when its settings name no corpus file: the
    # suite's prompts (no references), given by the harness; a method never reads a suite's data itself
    corpus: list[str] = field(default_factory=list)
    # what the suite knows of the item (suites.base.Item.meta: task, spans of the context and of each
    # demonstration ...), for methods that restructure a prompt (JRT, RDSCA); None for plain chat items
    item_meta: dict[str, Any] | None = None
    # other outputs a multi-draft method produced besides `output` (kept in the record, decoded)
    alternatives: list[list[int]] = field(default_factory=list)
    # texts that end the generation once the decoded output contains one (lm-eval's `until`; needs the
    # tokenizer): `emit` keeps the token that completes one and nothing after it, and sets `stopped`
    stop_strings: tuple[str, ...] = ()
    stopped: bool = False

    def __post_init__(self) -> None:
        if self.generator is None:
            self.generator = torch.Generator(device="cpu").manual_seed(self.sampling.seed)

    @property
    def done(self) -> bool:
        return self.stopped or len(self.output) >= self.max_new_tokens or (
            bool(self.output) and self.output[-1] in self.eos_token_ids
        )

    def emit(self, tokens: list[int], proposed: int = 0, record_step: bool = True) -> list[int]:
        """Append one target pass's tokens, cut at EOS (kept), at a stop string's last token and at
        max_new_tokens; return those kept."""
        kept: list[int] = []
        for tok in tokens:
            if self.done:
                break
            self.output.append(int(tok))
            kept.append(int(tok))
            if self.stop_strings:
                text = self.tokenizer.decode(self.output, skip_special_tokens=True)
                self.stopped = any(stop in text for stop in self.stop_strings)
        if record_step:
            self.trace.step(proposed, len(kept))
        return kept


# Self-drafting passes (the target run with sublayers skipped, to draft for itself) are marked by the
# shared layer-skipping mechanism, methods.common.layerskip.skipping, not by methods.


class SettingError(ValueError):
    """A method setting that is unknown, unparsable or out of range; raised before any model loads."""


def setting(default: Any, help: str, *, low: float | None = None, high: float | None = None) -> Any:
    """A Config field with its one-line help and, for numbers, its allowed range (inclusive).

    Choices are a `Literal[...]` annotation; lists are `tuple[int, ...]` (written `2,2,1` on the CLI)."""
    return field(default=default, metadata={"help": help, "low": low, "high": high})


@dataclass
class Settings:
    """Base of every method's `Config`: typed fields made with `setting(...)`, checked when built.

    A subclass adds checks that span fields in its own `__post_init__`, calling `super().__post_init__()`
    first."""

    def __post_init__(self) -> None:
        check_settings(self)


def _hints(config_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(config_cls)


def _kind(annotation: Any) -> tuple[Any, tuple]:
    """(base type, Literal choices) of a field annotation; Optional[X] counts as X."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return typing.Literal, typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _kind(args[0])
    return annotation, ()


def check_settings(config: Any) -> None:
    """Types, ranges and choices of every field, from its annotation and `setting(...)` metadata."""
    hints = _hints(type(config))
    for f in dataclasses.fields(config):
        value, (kind, choices) = getattr(config, f.name), _kind(hints.get(f.name, Any))
        if value is None:
            continue
        if choices and value not in choices:
            raise SettingError(f"{f.name} must be one of {', '.join(map(str, choices))}; got {value!r}")
        if kind is bool and not isinstance(value, bool):
            raise SettingError(f"{f.name} must be true or false; got {value!r}")
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise SettingError(f"{f.name} must be an integer; got {value!r}")
        if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise SettingError(f"{f.name} must be a number; got {value!r}")
        numbers = value if isinstance(value, tuple) else (value,)
        low, high = f.metadata.get("low"), f.metadata.get("high")
        for number in numbers:
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                continue
            if (low is not None and number < low) or (high is not None and number > high):
                span = f"[{_num(low) if low is not None else '-inf'}, {_num(high) if high is not None else 'inf'}]"
                raise SettingError(f"{f.name} must be in {span}; got {value!r}")
        if isinstance(value, tuple) and not value:
            raise SettingError(f"{f.name} must not be empty")


def _num(x: float) -> str:
    return f"{x:g}"


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_setting(name: str, text: Any, annotation: Any) -> Any:
    """A CLI string as the field's type, strictly: `flag=flase` or `gamma=2.5` is an error, not a guess."""
    if not isinstance(text, str):
        return tuple(text) if isinstance(text, list) else text
    kind, choices = _kind(annotation)
    raw = text.strip()
    try:
        if choices:
            match = [c for c in choices if str(c) == raw]
            if not match:
                raise ValueError(raw)
            return match[0]
        if kind is bool:
            if raw.lower() in _TRUE:
                return True
            if raw.lower() in _FALSE:
                return False
            raise ValueError(raw)
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if typing.get_origin(kind) is tuple:
            (element, *_rest) = typing.get_args(kind)
            return tuple(parse_setting(name, part, element) for part in raw.split(",") if part.strip())
        return raw
    except ValueError:
        raise SettingError(f"{name} must be {_type_name(annotation)}; got {text!r}") from None


def _type_name(annotation: Any) -> str:
    """Short type names for help and errors: int, float, bool, str, list of int, one of a, b."""
    kind, choices = _kind(annotation)
    if choices:
        return "one of " + ", ".join(map(str, choices))
    if typing.get_origin(kind) is tuple:
        return f"list of {_type_name(typing.get_args(kind)[0])} (comma-separated)"
    return getattr(kind, "__name__", str(kind))


def describe_settings(config_cls: type) -> list[dict[str, Any]]:
    """Every setting of a Config: name, type, default, allowed values and help (for `decodebench methods NAME`)."""
    hints = _hints(config_cls)
    out = []
    for f in dataclasses.fields(config_cls):
        _, choices = _kind(hints.get(f.name, Any))
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        low, high = f.metadata.get("low"), f.metadata.get("high")
        allowed = ", ".join(map(str, choices)) if choices else (
            f"[{_num(low) if low is not None else '-inf'}, {_num(high) if high is not None else 'inf'}]"
            if low is not None or high is not None else "")
        out.append({"name": f.name, "type": _type_name(hints.get(f.name, Any)), "default": default,
                    "allowed": allowed, "help": f.metadata.get("help", "")})
    return out


def build_config(owner: str, config_cls: type, overrides: dict[str, Any]) -> Any:
    """`config_cls` built from CLI strings or values, every error a SettingError naming `owner.setting`."""
    known = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise SettingError(
            f"method {owner!r} has no setting {', '.join(unknown)}; it has: {', '.join(known) or 'none'}"
        )
    hints = _hints(config_cls)
    try:
        parsed = {k: parse_setting(k, v, hints.get(k, Any)) for k, v in overrides.items()}
        config = config_cls(**parsed)
        if not isinstance(config, Settings):  # a Config written without the base still gets checked
            check_settings(config)
        return config
    except SettingError as err:
        raise SettingError(f"{owner}.{err}") from None
    except (TypeError, ValueError) as err:
        raise SettingError(f"{owner}: {err}") from None


class Method:
    """Base class. Subclasses set `paper`, `needs`, `lossless`, a `Config` dataclass, and `generate`.

    State kept across prompts (a hot start: Token Recycling's matrix, ADED's table, SWIFT's search)
    lives in `ctx.state`, never on the instance: the harness owns it, carries it over distinct items
    in run order, restores the same snapshot for every repeat and budget point of one item, and runs
    the warm-up on a throwaway copy. A method that keeps such state sets `stateful = True`."""

    name: ClassVar[str] = ""
    paper: ClassVar[Paper | None] = None
    needs: ClassVar[Needs] = Needs()
    lossless: ClassVar[bool] = True  # output distribution equals the target's (greedy: same tokens)
    stateful: ClassVar[bool] = False  # keeps state in ctx.state across prompts (see above)
    reference: ClassVar[bool] = False  # an outside implementation shown as a peer, not ours
    counterpart: ClassVar[str | None] = None  # for a reference: which of our methods it is compared with

    @dataclass
    class Config(Settings):
        pass

    def __init__(self, **overrides: Any) -> None:
        self.config = build_config(self.name, self.Config, overrides)

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
            "stateful": cls.stateful,
            "reference": cls.reference,
            "counterpart": cls.counterpart,
        }


_REGISTRY: dict[str, type[Method]] = {}


def register(name: str):
    def wrap(cls: type[Method]) -> type[Method]:
        if (name in _REGISTRY and _REGISTRY[name] is not cls) or name in _POLICIES or name in _TRANSFORMS:
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


# Cache and attention policies (methods.common.cache_policy.CachePolicy): a registry of their own, since a
# policy is not a decoder; a run composes one with a decoder (`ar+streaming_llm`, see cache_policy.compose).
_POLICIES: dict[str, type] = {}


def register_policy(name: str):
    def wrap(cls: type) -> type:
        if (name in _POLICIES and _POLICIES[name] is not cls) or name in _REGISTRY or name in _TRANSFORMS:
            raise ValueError(f"policy name {name!r} registered twice")
        cls.name = name
        _POLICIES[name] = cls
        return cls

    return wrap


def policies() -> dict[str, type]:
    _discover()
    return dict(sorted(_POLICIES.items()))


def get_policy(name: str) -> type:
    known = policies()
    if name not in known:
        raise KeyError(f"unknown policy {name!r}; known policies: {', '.join(known)}")
    return known[name]


# Model transforms (methods.common.transform.ModelTransform): quantization, perturbations. They change the
# weights (or how the layers compute) of the target and the draft for one run; `sps+w8`, `w8` = `ar+w8`.
_TRANSFORMS: dict[str, type] = {}


def register_transform(name: str):
    def wrap(cls: type) -> type:
        if (name in _TRANSFORMS and _TRANSFORMS[name] is not cls) or name in _REGISTRY or name in _POLICIES \
                or name in _SCORERS:
            raise ValueError(f"transform name {name!r} registered twice")
        cls.name = name
        _TRANSFORMS[name] = cls
        return cls

    return wrap


# Scorers (a third modifier kind, beside decoders and cache policies): they change how a likelihood suite turns
# the target's token probabilities into a document's log-likelihood (byte_level: per byte, over every canonical
# tokenization), never what a decoder generates.
_SCORERS: dict[str, type] = {}


class Scorer:
    """Base of every scorer: `paper`, a `Config` (Settings) and `nll(model, tokenizer, text)`, the negative
    log-likelihood (nats) of each scored unit of `text` under `model`, in order."""

    name: ClassVar[str] = ""
    paper: ClassVar[Paper | None] = None
    unit: ClassVar[str] = "byte"  # what one entry of nll() scores

    @dataclass
    class Config(Settings):
        pass

    def __init__(self, **overrides: Any) -> None:
        self.config = build_config(self.name, self.Config, overrides)

    def nll(self, model: torch.nn.Module, tokenizer: Any, text: str) -> list[float]:
        raise NotImplementedError

    def total_nll(self, model: torch.nn.Module, tokenizer: Any, text: str) -> float:
        """The whole text's negative log-likelihood (nats): sum(nll(...)), or a cheaper route to it."""
        return math.fsum(self.nll(model, tokenizer, text))

    @classmethod
    def describe(cls) -> dict[str, Any]:
        return {"paper": cls.paper.title if cls.paper else "", "arxiv": cls.paper.arxiv if cls.paper else None,
                "unit": cls.unit}


def register_scorer(name: str):
    def wrap(cls: type) -> type:
        if (name in _SCORERS and _SCORERS[name] is not cls) or name in _REGISTRY or name in _POLICIES or name in _TRANSFORMS:
            raise ValueError(f"scorer name {name!r} registered twice")
        cls.name = name
        _SCORERS[name] = cls
        return cls

    return wrap


def transforms() -> dict[str, type]:
    _discover()
    return dict(sorted(_TRANSFORMS.items()))


def get_transform(name: str) -> type:
    known = transforms()
    if name not in known:
        raise KeyError(f"unknown transform {name!r}; known transforms: {', '.join(known)}")
    return known[name]


def scorers() -> dict[str, type]:
    _discover()
    return dict(sorted(_SCORERS.items()))


def get_scorer(name: str) -> type:
    known = scorers()
    if name not in known:
        raise KeyError(f"unknown scorer {name!r}; known scorers: {', '.join(known)}")
    return known[name]
