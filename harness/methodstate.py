"""The harness's side of `Method.stateful`: the lifecycle of the state a method keeps across prompts.

One state dict per stateful method. Before the first attempt at an (item, turn) the state is
snapshotted; every attempt at it (each repeat, each budget point) runs on its own deep copy of that
snapshot, so repeats and budget points see the same state and none sees another's continuation. The
state carried on to the next (item, turn) is the one the canonical attempt left (repeat 0 at the
first budget point). `carry` is the papers' hot start over distinct items in run order (the turns of
one item follow each other); `fresh` empties the state before every item.

Resume stays exact: the snapshot of the (item, turn) under way and the state its canonical attempt
left are saved in the run folder (`state/<method>.before.pt`, `state/<method>.after.pt`, each written
atomically), and loaded when a run resumes. Where they cannot be, the records say so (`state_note`).
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

MODES = ("carry", "fresh")
Key = tuple[str, int]  # (item_id, turn)


@dataclass
class Held:
    """A state, the (item, turn) it belongs to, and the distinct items it has seen."""

    key: Key | None
    state: dict = field(default_factory=dict)
    items: list[str] = field(default_factory=list)
    note: str | None = None  # why this state is not the one an uninterrupted run would have

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"key": list(self.key) if self.key else None, "state": self.state, "items": self.items,
                    "note": self.note}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Held | None:
        if not path.is_file():
            return None
        saved = torch.load(path, weights_only=False)  # our own file: the method's objects, pickled
        return cls(tuple(saved["key"]) if saved["key"] else None, saved["state"], list(saved["items"]), saved["note"])


@dataclass
class Slot:
    before: Held | None = None  # the snapshot of the (item, turn) under way
    after: Held | None = None  # the state carried on: left by the last canonical attempt
    loaded: bool = False


class MethodStates:
    def __init__(self, folder: Path, mode: str, order: list[Key], attempts: int = 1) -> None:
        """`order`: every (item, turn) in run order; `attempts`: repeats x budget points per (item, turn)."""
        if mode not in MODES:
            raise ValueError(f"method state must be one of {', '.join(MODES)}; got {mode!r}")
        self.folder, self.mode = Path(folder), mode
        # with one attempt per (item, turn) its snapshot is never needed again once it has run (or, not
        # yet run, it is the carried state saved after the previous one): not saved
        self.save_snapshots = attempts > 1
        self.save_errors: dict[str, str] = {}  # method -> why its state could not be saved (a resume will say)
        # run order of the (item, turn)s: the one before each, whose carried state it starts from
        self.previous = {key: (order[i - 1] if i else None) for i, key in enumerate(order)}
        self.slots: dict[str, Slot] = {}

    def _paths(self, name: str) -> tuple[Path, Path]:
        return self.folder / f"{name}.before.pt", self.folder / f"{name}.after.pt"

    def attempt(self, name: str, key: Key) -> tuple[dict, int, str | None]:
        """A private copy of the snapshot for (item, turn), how many earlier distinct items it has seen,
        and a note when it is not what an uninterrupted run would have given."""
        slot = self.slots.setdefault(name, Slot())
        if slot.before is None or slot.before.key != key:
            slot.before = self._snapshot(name, slot, key)
        before = slot.before
        return copy.deepcopy(before.state), sum(item != key[0] for item in before.items), before.note

    def _snapshot(self, name: str, slot: Slot, key: Key) -> Held:
        before_path, after_path = self._paths(name)
        if not slot.loaded:  # first use in this process: a resumed run picks up where it stopped
            slot.loaded = True
            try:
                saved_before, saved_after = Held.load(before_path), Held.load(after_path)
            except Exception as err:  # noqa: BLE001 - said in the records, the run goes on
                saved_before = saved_after = None
                slot.after = Held(None, note=f"the saved method state could not be read ({type(err).__name__}: {err})")
            if saved_before is not None and saved_before.key == key:
                slot.after = saved_after if saved_after is not None and saved_after.key == key else None
                return saved_before
            slot.after = saved_after or slot.after
        _item, turn = key
        if self.mode == "fresh" and turn == 0:
            held = Held(key)
        elif slot.after is not None and slot.after.key == self._from(key):
            held = Held(key, slot.after.state, slot.after.items, slot.after.note)
        elif self._from(key) is None:
            held = Held(key)  # the first item of the run
        else:
            reason = slot.after.note if slot.after is not None and slot.after.note else (
                "the state carried from earlier items was not found (a resumed run)")
            held = Held(key, note=f"{reason}; started from an empty state")
        slot.after = None  # set by this (item, turn)'s canonical attempt
        if self.save_snapshots:
            self._save(name, held, before_path)
        return held

    def _from(self, key: Key) -> Key | None:
        """The (item, turn) whose carried state `key` starts from."""
        if self.mode == "fresh":
            return (key[0], key[1] - 1) if key[1] else None
        return self.previous.get(key)

    def carry(self, name: str, key: Key, state: dict | None) -> None:
        """After the canonical attempt at `key`: the state it left goes on to the next (item, turn).
        `state` None (the attempt failed) carries the snapshot on unchanged."""
        slot = self.slots.get(name)
        before = slot.before if slot else None
        if before is None or before.key != key:
            return  # the attempt failed before its snapshot was taken: nothing ran on it
        if state is None:
            slot.after = Held(key, before.state, before.items, before.note)
        else:
            items = before.items + ([key[0]] if key[0] not in before.items else [])
            slot.after = Held(key, state, items, before.note)
        self._save(name, slot.after, self._paths(name)[1])

    def _save(self, name: str, held: Held, path: Path) -> None:
        try:
            held.save(path)
        except Exception as err:  # noqa: BLE001 - an unpicklable state: this run is exact, a resumed one
            path.unlink(missing_ok=True)  # finds no (stale) file and says so in its records
            self.save_errors[name] = f"{type(err).__name__}: {err}"
