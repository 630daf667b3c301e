"""The suite contract: a named set of items, each with user turns and optional references.

Two kinds of suite (`Suite.needs`):
- "generation": each Item is a chat (`turns`), the model answers each user turn, the answer is scored
  against `reference` (by the harness's per-category metric, or by the suite's own `score`).
- "loglikelihood": each Item is a DOCUMENT: `item_id` names it, `turns == (text,)` holds its whole text,
  `reference` is None (build one with `document(...)`); the runner scores the text's log-likelihood.

A suite may take options (a `Settings` dataclass, `Suite.Options`, checked before any model loads) and the
target's tokenizer (when `needs_tokenizer`: a suite that sizes its prompts in tokens):
    suite = get_suite(name)(data=path_or_None, tokenizer=tok_or_None, **options)
Options arrive as CLI strings or typed values; a bad one is a SettingError naming `suite.option`
(`describe_settings(cls.Options)` lists them). Two hooks the runner calls on the instance:
- `suite.prompt_ids(item)`: the exact prompt ids when the suite renders its own prompts (longctx sizes
  them in tokens, icl gives plain few-shot text); None: the harness's chat template over the turns.
- `suite.score(item, output_text) -> (score, metric)`: the suite's own metric; (None, None): the
  harness's per-category metric applies.
`item.meta` (JSON-able, optional) carries what a generated item knows: task, length, depth, spans ...
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import pkgutil
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from methods.base import SettingError, Settings, parse_setting


class SuiteDataError(ValueError):
    """Malformed suite data; the message names the file and line."""


def read_text_file(path: str | Path) -> str:
    """A data file's text, or a SuiteDataError naming the file and what is wrong with it."""
    path = Path(path)
    if path.is_dir():
        raise SuiteDataError(f"{path} is a folder, not a data file")
    if not path.is_file():
        raise SuiteDataError(f"{path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SuiteDataError(f"{path}: not a UTF-8 text file (byte {err.start}: {err.reason})") from None
    except OSError as err:
        raise SuiteDataError(f"{path}: cannot be read ({err.strerror})") from None


@dataclass(frozen=True)
class Item:
    item_id: str
    category: str
    turns: tuple[str, ...]
    reference: tuple[str, ...] | None = None
    subcategory: str | None = None  # a finer label within the category (MT-bench's 'writing' under mt_bench)
    # what a generated suite knows about the item (task, length, depth, spans ...): JSON-able values only;
    # part of the data's identity (items_sha256) when present, left out of hash(item)
    meta: dict[str, Any] | None = field(default=None, hash=False)

    def messages(self, turn: int, answers: list[str]) -> list[dict]:
        """The chat up to user turn `turn`, earlier turns answered by the model's own `answers`."""
        chat: list[dict] = []
        for i in range(turn):
            chat += [{"role": "user", "content": self.turns[i]}, {"role": "assistant", "content": answers[i]}]
        return chat + [{"role": "user", "content": self.turns[turn]}]


def document(doc_id: str, text: str, category: str = "document", meta: dict[str, Any] | None = None) -> Item:
    """A loglikelihood suite's item: one document, its whole text as the single turn."""
    return Item(doc_id, category, (text,), None, meta=meta)


class Suite:
    name: ClassVar[str] = ""
    needs: ClassVar[str] = "generation"  # or "loglikelihood"
    description: ClassVar[str] = ""
    needs_tokenizer: ClassVar[bool] = False  # True: the target's tokenizer must be passed to the constructor
    # the option `--suite NAME:VALUE` sets (lm-eval:TASK,TASK sets `tasks`); None: the suite takes no argument
    argument: ClassVar[str | None] = None

    @dataclass
    class Options(Settings):
        pass

    def __init__(self, data: str | None = None, tokenizer: Any = None, **options: Any) -> None:
        self.data = data
        self.tokenizer = tokenizer
        self.options = parse_options(self.name, self.Options, options)
        if self.needs_tokenizer and tokenizer is None:
            raise SettingError(f"suite {self.name} sizes its prompts in tokens: pass the target's tokenizer")

    def items(self, limit: int | None = None) -> list[Item]:
        raise NotImplementedError

    def prompt_ids(self, item: Item) -> list[int] | None:
        """The exact prompt ids of a one-turn item when the suite renders its own prompts (sized in
        tokens); None: the harness builds the prompt from the turns (chat template)."""
        return None

    def score(self, item: Item, output_text: str) -> tuple[float | None, str | None]:
        """(score in 0..1, metric name) when the suite scores its own items; (None, None): the harness's
        per-category metric applies."""
        return None, None


def parse_options(suite: str, options_cls: type, raw: dict[str, Any]) -> Any:
    """A suite's Options from CLI strings or typed values; errors name `suite.option`."""
    known = {f.name for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SettingError(f"suite {suite} has no option {', '.join(unknown)}; it has: {', '.join(sorted(known)) or 'none'}")
    hints = typing.get_type_hints(options_cls)
    try:
        return options_cls(**{k: parse_setting(k, v, hints.get(k, Any)) for k, v in raw.items()})
    except SettingError as err:
        raise SettingError(f"{suite}.{err}") from None
    except (TypeError, ValueError) as err:
        raise SettingError(f"{suite}: {err}") from None


def first_per_category(items: list[Item], limit: int | None) -> list[Item]:
    """Keep the first `limit` items of every category, in file order."""
    if limit is None:
        return items
    seen: dict[str, int] = {}
    kept = []
    for item in items:
        seen[item.category] = seen.get(item.category, 0) + 1
        if seen[item.category] <= limit:
            kept.append(item)
    return kept


def items_sha256(items: list[Item]) -> str:
    """One hash of the items a run reads (ids, categories, turns, references): the data's identity,
    whatever file or generator it came from."""
    digest = hashlib.sha256()
    for item in items:
        row = dataclasses.astuple(item)
        if item.meta is None:  # the row as it was before `meta` existed: old runs keep their data hash
            row = row[:-1]
        digest.update(json.dumps(row, ensure_ascii=False, sort_keys=True).encode())
    return digest.hexdigest()


_REGISTRY: dict[str, type[Suite]] = {}


def register(name: str):
    def wrap(cls: type[Suite]) -> type[Suite]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def registry() -> dict[str, type[Suite]]:
    import suites

    for info in pkgutil.iter_modules(suites.__path__):
        if info.name != "base":
            importlib.import_module(f"suites.{info.name}")
    return dict(sorted(_REGISTRY.items()))


def resolve(spec: str, options: dict[str, Any] | None = None) -> tuple[type[Suite], dict[str, Any]]:
    """`NAME` or `NAME:VALUE` (e.g. lm-eval:TASK,TASK): the suite class, and its options with the one VALUE sets."""
    name, colon, value = spec.partition(":")
    cls, options = get_suite(name), dict(options or {})
    if not colon:
        return cls, options
    if cls.argument is None or not value:
        raise SettingError(f"suite {name} takes no ':VALUE' argument" if cls.argument is None else
                           f"suite {spec!r}: nothing after ':' (e.g. {name}:VALUE)")
    if cls.argument in options:
        raise SettingError(f"suite {spec!r} sets {cls.argument}: do not also pass --option {cls.argument}=...")
    return cls, {cls.argument: value, **options}


def get_suite(name: str) -> type[Suite]:
    known = registry()
    if name not in known:
        raise KeyError(f"unknown suite {name!r}; known suites: {', '.join(known)}")
    return known[name]
