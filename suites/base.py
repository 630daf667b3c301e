"""The suite contract: a named set of items, each with user turns and optional references."""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar


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

    def messages(self, turn: int, answers: list[str]) -> list[dict]:
        """The chat up to user turn `turn`, earlier turns answered by the model's own `answers`."""
        chat: list[dict] = []
        for i in range(turn):
            chat += [{"role": "user", "content": self.turns[i]}, {"role": "assistant", "content": answers[i]}]
        return chat + [{"role": "user", "content": self.turns[turn]}]


class Suite:
    name: ClassVar[str] = ""
    needs: ClassVar[str] = "generation"  # or "loglikelihood"
    description: ClassVar[str] = ""

    def __init__(self, data: str | None = None) -> None:
        self.data = data

    def items(self, limit: int | None = None) -> list[Item]:
        raise NotImplementedError


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
        digest.update(json.dumps(dataclasses.astuple(item), ensure_ascii=False).encode())
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


def get_suite(name: str) -> type[Suite]:
    known = registry()
    if name not in known:
        raise KeyError(f"unknown suite {name!r}; known suites: {', '.join(known)}")
    return known[name]
