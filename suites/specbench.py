"""Spec-Bench-style generation tasks: six categories, multi-turn chat through the model's template.

Data format is Spec-Bench's question.jsonl: question_id, category, turns, optional reference.
Spec-Bench's own file labels its MT-bench questions (ids 81-160) with MT-bench's eight categories, which its
evaluation/speed.py groups as `mt_bench`; so does this loader, keeping the label as the item's subcategory.
The built-in set (suites/data/specbench.jsonl) was written for this project.
"""
from __future__ import annotations

import json
from pathlib import Path

from suites.base import (
    Item,
    Suite,
    SuiteDataError,
    first_per_category,
    read_text_file,
    register,
)

CATEGORIES = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")
MT_BENCH_SUBCATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
BUILTIN = Path(__file__).parent / "data" / "specbench.jsonl"


def load_questions(path: Path) -> list[Item]:
    """Parse a question.jsonl file; any malformed line is an error naming the line number."""
    items, seen = [], set()
    for lineno, line in enumerate(read_text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise SuiteDataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict):
            raise SuiteDataError(f"{where}: expected a JSON object")
        missing = [k for k in ("question_id", "category", "turns") if k not in row]
        if missing:
            raise SuiteDataError(f"{where}: missing field(s) {', '.join(missing)}")
        turns = row["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
            raise SuiteDataError(f"{where}: 'turns' must be a non-empty list of non-empty strings")
        item_id = str(row["question_id"])
        if item_id in seen:
            raise SuiteDataError(f"{where}: duplicate question_id {item_id!r}")
        seen.add(item_id)
        reference = row.get("reference")
        if isinstance(reference, str):
            reference = [reference]
        if reference is not None and not isinstance(reference, list):
            raise SuiteDataError(f"{where}: 'reference' must be a string or a list of strings")
        category, subcategory = str(row["category"]), None
        if category in MT_BENCH_SUBCATEGORIES:
            category, subcategory = "mt_bench", category
        items.append(Item(item_id, category, tuple(turns), tuple(map(str, reference)) if reference else None,
                          subcategory=subcategory))
    if not items:
        raise SuiteDataError(f"{path}: no questions")
    return items


@register("specbench")
class SpecBench(Suite):
    description = "Spec-Bench's six categories (built-in original set, or --data question.jsonl)"

    def items(self, limit: int | None = None) -> list[Item]:
        items = load_questions(Path(self.data) if self.data else BUILTIN)
        # known categories first in Spec-Bench's order, unknown ones kept under their own name
        order = {c: i for i, c in enumerate(CATEGORIES)}
        items.sort(key=lambda it: (order.get(it.category, len(order)), it.category))
        return first_per_category(items, limit)
