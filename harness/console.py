"""Terminal output: rich where it is installed, plain lines where it is not.

A GPU image may carry only torch, transformers and numpy (`decodebench selfcheck` must run there), so
nothing on the run path imports rich at module level: `make_console`, `escape` and `progress` come from
here. Without rich, markup tags ("[red]", "[/]") are dropped and a progress bar is one line per task.
"""
from __future__ import annotations

import re

try:
    from rich.console import Console
    from rich.markup import escape
except ImportError:  # a bare image: plain text
    Console = None

    def escape(text: str) -> str:
        return text

# rich's style tags: [red], [bold], [/], [/red], [bold red]; not "[1, 2]" or "[x]" in a message
_TAG = re.compile(r"\[/?(?:(?:bold|dim|italic|red|green|yellow|blue|cyan|magenta)(?: \w+)*)?\]")


class PlainConsole:
    """The few Console methods decodebench uses, printing plain lines."""

    def print(self, *objects, markup: bool = True, **_) -> None:
        text = " ".join(str(o) for o in objects)
        print(_TAG.sub("", text) if markup else text, flush=True)


def make_console(**kwargs):
    return Console(**kwargs) if Console is not None else PlainConsole()


class PlainProgress:
    """rich.progress.Progress's add_task / update / advance, saying each task once when it starts."""

    def __init__(self, console=None) -> None:
        self.console = console or PlainConsole()
        self.tasks: dict[int, dict] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: float | None = None) -> int:
        self.tasks[len(self.tasks)] = {"total": total, "done": 0}
        self.console.print(description, markup=False)
        return len(self.tasks) - 1

    def update(self, task: int, description: str | None = None, **_) -> None:
        if description:
            done, total = self.tasks[task]["done"], self.tasks[task]["total"]
            self.console.print(f"[{done + 1}/{total}] {description}" if total else description, markup=False)

    def advance(self, task: int, advance: float = 1) -> None:
        self.tasks[task]["done"] += advance


def progress(console):
    """A progress display: rich's bar with counts and times where rich is installed and `console` is
    rich's; else PlainProgress."""
    if Console is None or not isinstance(console, Console):
        return PlainProgress(console)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console)
