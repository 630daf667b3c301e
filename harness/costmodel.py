"""A hardware cost model: measured forward latency as a function of (tokens per pass, context length),
and the speed-up it predicts from a run's hardware-independent trace.

This answers why a higher acceptance length can still be slower: on a 2-core CPU a 6-token
verification costs several one-token steps, on a GPU nearly one. Give a run the profile of another
device to see what the same trace would give there.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from harness import roofline
from harness.instrument import synchronize
from methods.common.kv import crop, extend, new_cache

WIDTHS = (1, 2, 4, 8, 16, 32, 64)
CONTEXTS = (128, 512, 1024)


@dataclass
class LatencyTable:
    """seconds[i][j]: one forward pass of widths[j] new tokens after contexts[i] cached ones."""

    widths: list[int]
    contexts: list[int]
    seconds: list[list[float]]

    def __call__(self, width: float, context: float) -> float:
        """Interpolated latency: linear in width (extrapolated past the widest pass along the last
        segment, since a long prompt's prefill grows about linearly), then in context (clamped)."""
        per_context = [_along_width(width, self.widths, row) for row in self.seconds]
        return float(np.interp(context, self.contexts, per_context))


def _along_width(width: float, widths: list[int], row: list[float]) -> float:
    if width <= widths[-1] or len(widths) < 2:
        return float(np.interp(width, widths, row))
    slope = max(0.0, (row[-1] - row[-2]) / (widths[-1] - widths[-2]))
    return row[-1] + slope * (width - widths[-1])


def measure(model: torch.nn.Module, widths=WIDTHS, contexts=CONTEXTS, repeats: int = 3, progress=None) -> LatencyTable:
    """Median latency of each (width, context) cell, with the cache cropped back between passes."""
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    seconds = []
    for context in contexts:
        cache = new_cache(model)
        extend(model, torch.randint(0, vocab, (context,), generator=generator).tolist(), cache, keep=1)
        row = []
        for width in widths:
            tokens = torch.randint(0, vocab, (width,), generator=generator).tolist()
            samples = []
            for _ in range(repeats + 1):  # the first is a warm-up
                synchronize(model)
                start = time.perf_counter()
                extend(model, tokens, cache)
                synchronize(model)
                samples.append(time.perf_counter() - start)
                crop(cache, context)
            row.append(statistics.median(samples[1:]))
            if progress:
                progress()
        seconds.append(row)
    return LatencyTable(list(widths), list(contexts), seconds)


def profile(models: dict, device: str, widths=WIDTHS, contexts=CONTEXTS, repeats: int = 3,
            bar=None) -> tuple[dict[str, LatencyTable], dict]:
    """`models`: role -> a function giving that role's model. Each is built, measured and dropped in turn
    (two large models need not fit at once); also the roofline: the device's (measured once) and each model's.
    `bar`: a progress display (harness.console.progress), one task per role."""
    tables, roof = {}, {}
    for role, build in models.items():
        model = build()
        if not roof:
            roof["device"] = roofline.measure(device, str(next(model.parameters()).dtype).removeprefix("torch."))
        roof[role] = roofline.model_roof(model)
        task = bar.add_task(f"profile {role}", total=len(widths) * len(contexts)) if bar else None
        tables[role] = measure(model, widths, contexts, repeats, (lambda t=task: bar.advance(t)) if bar else None)
        del model
    return tables, roof


def compare(profile_a: dict, profile_b: dict) -> list[dict]:
    """Cell by cell, A's latency over B's, for every role and (context, width) both profiles measured."""
    rows = []
    for role, a in profile_a["tables"].items():
        b = profile_b["tables"].get(role)
        if b is None:
            continue
        for i, context in enumerate(a.contexts):
            for j, width in enumerate(a.widths):
                if context in b.contexts and width in b.widths:
                    theirs = b.seconds[b.contexts.index(context)][b.widths.index(width)]
                    rows.append({"role": role, "context": context, "width": width, "a_s": a.seconds[i][j],
                                 "b_s": theirs, "ratio": a.seconds[i][j] / theirs if theirs > 0 else float("nan")})
    return rows


def save_profile(path: Path, device: str, tables: dict[str, LatencyTable], models: dict[str, str],
                 roofline: dict | None = None) -> None:
    Path(path).write_text(json.dumps({
        "device": device, "models": models, "roofline": roofline,
        "tables": {role: vars(table) for role, table in tables.items()},
    }, indent=1))


def load_profile(path: Path) -> dict:
    profile = json.loads(Path(path).read_text())
    profile["tables"] = {role: LatencyTable(**table) for role, table in profile["tables"].items()}
    return profile


def predicted_seconds(record: dict, tables: dict[str, LatencyTable]) -> float | None:
    """The time the record's passes would take on the profiled device. Each pass is priced at the
    record's mean context length (prompt + half the output): per-pass context is not recorded."""
    context = record["prompt_tokens"] + record["new_tokens"] / 2
    total = sum(tables["target"](w, context) for w in record.get("target_widths") or [])
    draft_widths = record.get("draft_widths") or []
    if record.get("draft_calls") and len(draft_widths) != record["draft_calls"]:
        return None  # a record from before draft widths were kept: its draft cost is unknown
    # passes a self-drafting method ran through the target come last; each costs a target pass of its
    # width scaled by the parameter bytes it ran over a full pass's (both measured by the harness's hooks)
    own = record.get("self_draft_calls") or 0
    model_widths, self_widths = draft_widths[: len(draft_widths) - own], draft_widths[len(draft_widths) - own:]
    if model_widths:
        if "draft" not in tables:
            return None
        total += sum(tables["draft"](w, context) for w in model_widths)
    if self_widths:
        ran, full = record.get("self_draft_bytes") or [], record.get("target_pass_bytes")
        if len(ran) != len(self_widths) or not full:
            return None  # a record from before the harness measured self-draft passes: their cost is unknown
        total += sum(b / full * tables["target"](w, context) for w, b in zip(self_widths, ran))
    return total if total > 0 else None


def predicted_speedups(records: list[dict], tables: dict[str, LatencyTable], baseline: str = "ar") -> dict[str, float]:
    """The speed table's speed-up (Spec-Bench's definition, harness.tables) with each record's wall time
    replaced by its predicted time; a record that cannot be priced leaves its question out."""
    import pandas as pd

    from harness.tables import OVERALL, speed_table

    priced = []
    for r in records:
        seconds = None if r.get("error") or not r.get("new_tokens") else predicted_seconds(r, tables)
        priced.append({**r, "wall_s": seconds, "error": r.get("error") or (None if seconds else "not priced")})
    if not priced:
        return {}
    table = speed_table(pd.DataFrame(priced), baseline)
    if OVERALL not in table:
        return {}
    return {method: float(value) for method, value in table[OVERALL].items() if not np.isnan(value)}
