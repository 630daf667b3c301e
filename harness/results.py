"""results.jsonl: one JSON record (harness.record's schema) per method x item x turn (x repeat), appended atomically.

A run killed mid-write leaves at most a partial last line; `ResultStore` drops it (and
failed records, which are retried) when a run resumes, so nothing is lost or duplicated.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from harness.record import KEY_DEFAULTS, KEY_FIELDS, SCHEMA_VERSION, Record, upgrade


def record_key(record: dict | Record) -> tuple:
    if isinstance(record, Record):
        return tuple(getattr(record, k) for k in KEY_FIELDS)
    return tuple(record.get(k, KEY_DEFAULTS.get(k)) for k in KEY_FIELDS)


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (the shorter length when one is a prefix of the other); None if equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def read_records(path: Path) -> list[dict]:
    """Every complete record, as the current schema's fields (`harness.record.upgrade`); an unparsable line
    (an interrupted write) is skipped with a warning; a record of an unknown schema version is an error."""
    records = []
    if not path.is_file():
        return records
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            warnings.warn(f"{path}:{lineno}: skipping an unparsable record (an interrupted write?)", stacklevel=2)
            continue
        records.append(upgrade(record, f"{path}:{lineno}"))
    return records


class ResultStore:
    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "results.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: dict[tuple, dict] = {}
        self._resume()

    def _resume(self) -> None:
        """Keep finished records; rewrite the file without partial lines and failed attempts."""
        records = read_records(self.path)
        duplicates = []
        for r in records:
            if r.get("error"):
                continue
            if record_key(r) in self.done:
                duplicates.append(r)
            else:
                self.done[record_key(r)] = r
        if duplicates:  # two writers on one folder (before the lock): one record per key, the rest set aside
            with open(self.path.with_name("results.duplicates.jsonl"), "a", encoding="utf-8") as side:
                side.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in duplicates)
        if len(self.done) != len(records) or (self.path.is_file() and not self.path.read_bytes().endswith(b"\n")
                                               and self.path.stat().st_size):
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.done.values()),
                           encoding="utf-8")
            os.replace(tmp, self.path)

    def has(self, key: tuple) -> bool:
        return key in self.done

    def get(self, key: tuple) -> dict | None:
        return self.done.get(key)

    def append(self, record: Record | dict) -> None:
        """One write(2) of one line with O_APPEND, then fsync: a record is in the file whole or not at all.
        A dict (written now: the current schema version unless it says otherwise) goes through the schema too."""
        if not isinstance(record, Record):
            record = Record.from_json({"schema_version": SCHEMA_VERSION, **record})
        record = record.to_json()
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        if not record.get("error"):
            self.done[record_key(record)] = record
