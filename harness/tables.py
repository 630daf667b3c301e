"""The report's numbers as pandas tables: records loaded and normalised, the Spec-Bench speed table with
bootstrap intervals, peers, repeat spread, the budget sweep and the quality table. No formatting, no plots."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from harness.results import read_records

# Spec-Bench's column order; categories it does not know follow alphabetically.
CATEGORY_ORDER = ["mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag"]
PAIR_KEY = ["category", "item_id", "turn"]
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
MAT = "#MAT"
OVERALL = "Overall speed-up"
TOKENS_PER_S = "Tokens/s"
CI_LOW = "Overall CI low"
CI_HIGH = "Overall CI high"
# Columns a record may lack (older or partial runs); filled so every later step can rely on them.
RECORD_DEFAULTS = {
    "method": None, "suite": "", "category": "uncategorized", "item_id": None, "turn": 0, "repeat": 0,
    "new_tokens": None, "wall_s": None, "tokens_per_s": None, "mean_accepted": None,
    "target_calls": None, "target_tokens": None, "draft_calls": None, "draft_tokens": None,
    "peak_mem_bytes": None, "energy_j": None, "temperature": None, "lossless_check": None, "error": None,
    "budget": "", "max_target_calls": None, "max_target_tokens": None, "max_wall_s": None,
    "method_state_bytes": None, "output_perplexity": None, "alternatives_text": None,
}
BUDGET_KINDS = {"max_target_calls": "target passes", "max_target_tokens": "target tokens", "max_wall_s": "seconds"}
NUMERIC_COLUMNS = [
    "turn", "repeat", "new_tokens", "wall_s", "tokens_per_s", "mean_accepted", "target_calls",
    "target_tokens", "draft_calls", "draft_tokens", "peak_mem_bytes", "energy_j", "temperature",
    "method_state_bytes", "output_perplexity",
]


def load_records(results_path: str | Path) -> pd.DataFrame:
    """One row per record of results.jsonl; unparsable lines (a killed run's last line) are skipped."""
    return normalized(pd.DataFrame(read_records(Path(results_path))))


def normalized(records: pd.DataFrame) -> pd.DataFrame:
    records = records.copy()
    for column, default in RECORD_DEFAULTS.items():
        if column not in records:
            records[column] = default
    for column in NUMERIC_COLUMNS:
        records[column] = pd.to_numeric(records[column], errors="coerce")
    records["category"] = records["category"].fillna(RECORD_DEFAULTS["category"])
    records["turn"] = records["turn"].fillna(0).astype(int)
    return records


def successful(records: pd.DataFrame) -> pd.DataFrame:
    return records[records["error"].isna()]


def ordered_categories(categories) -> list[str]:
    present = set(categories)
    known = [category for category in CATEGORY_ORDER if category in present]
    return known + sorted(present - set(known))


def method_order(records: pd.DataFrame, baseline: str) -> list[str]:
    methods = list(dict.fromkeys(records["method"].dropna()))  # order of first appearance
    if baseline in methods:
        methods.remove(baseline)
        methods.insert(0, baseline)
    return methods


def bootstrap_interval(method_tps: np.ndarray, baseline_tps: np.ndarray) -> tuple[float, float]:
    pairs = len(method_tps)
    if pairs < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(BOOTSTRAP_SEED)  # fresh per method: each row's CI is reproducible alone
    resampled = rng.integers(0, pairs, size=(BOOTSTRAP_RESAMPLES, pairs))
    ratios = method_tps[resampled].mean(axis=1) / baseline_tps[resampled].mean(axis=1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def speed_table(records: pd.DataFrame, baseline: str = "ar") -> pd.DataFrame:
    """The Spec-Bench table, numeric: rows = methods (baseline first), speed-ups as plain ratios.

    Columns: one per category, "#MAT", "Overall speed-up", "Tokens/s", then the overall speed-up's
    bootstrap interval ("Overall CI low", "Overall CI high"). Without the baseline only "#MAT" and
    "Tokens/s" remain. Failed records (error set) are ignored.
    """
    ok = successful(normalized(records))
    methods = method_order(ok, baseline)
    by_method = ok.groupby("method")
    if baseline not in methods:
        table = pd.DataFrame(index=pd.Index(methods, name="method"), columns=[MAT, TOKENS_PER_S], dtype=float)
    else:
        categories = ordered_categories(ok["category"])
        columns = [*categories, MAT, OVERALL, TOKENS_PER_S, CI_LOW, CI_HIGH]
        table = pd.DataFrame(index=pd.Index(methods, name="method"), columns=columns, dtype=float)
        # Repeats of one (item, turn) are averaged first so every pair weighs the same.
        per_pair = ok.groupby(["method", *PAIR_KEY])["tokens_per_s"].mean().unstack("method")
        for method in methods:
            matched = per_pair[method].notna() & per_pair[baseline].notna()
            if not matched.any():
                continue
            method_tps, baseline_tps = per_pair.loc[matched, method], per_pair.loc[matched, baseline]
            by_category = (
                method_tps.groupby(level="category").mean() / baseline_tps.groupby(level="category").mean()
            )
            table.loc[method, by_category.index] = by_category.to_numpy()
            table.loc[method, OVERALL] = method_tps.mean() / baseline_tps.mean()
            if method != baseline:
                interval = bootstrap_interval(method_tps.to_numpy(), baseline_tps.to_numpy())
                table.loc[method, [CI_LOW, CI_HIGH]] = interval
    table[MAT] = by_method["mean_accepted"].mean().reindex(methods)
    table[TOKENS_PER_S] = by_method["tokens_per_s"].mean().reindex(methods)
    return table


def peer_table(records: pd.DataFrame, methods_manifest: dict) -> pd.DataFrame:
    """Our implementation's tokens/s over its transformers counterpart's, on the same (item, turn) pairs.

    A reference method names the method it is a peer of (`counterpart` in the manifest).
    """
    ok = successful(normalized(records))
    per_pair = ok.groupby(["method", *PAIR_KEY])["tokens_per_s"].mean().unstack("method")
    rows = []
    for reference, described in methods_manifest.items():
        ours = described.get("counterpart")
        if not ours or ours not in per_pair or reference not in per_pair:
            continue
        matched = per_pair[ours].notna() & per_pair[reference].notna()
        if not matched.any():
            continue
        ours_tps, ref_tps = per_pair.loc[matched, ours].to_numpy(), per_pair.loc[matched, reference].to_numpy()
        low, high = bootstrap_interval(ours_tps, ref_tps)
        rows.append({"ours": ours, "transformers": reference, "pairs": int(matched.sum()),
                     "ours tokens/s": ours_tps.mean(), "transformers tokens/s": ref_tps.mean(),
                     "ratio": ours_tps.mean() / ref_tps.mean(), "CI low": low, "CI high": high})
    return pd.DataFrame(rows)


def repeat_spread(records: pd.DataFrame) -> pd.DataFrame:
    """Per method: how much tokens/s of the same (item, turn) varies over repeats (mean coefficient of
    variation, and the worst one). Empty when no record was repeated."""
    ok = successful(normalized(records))
    per_pair = ok.groupby(["method", *PAIR_KEY])["tokens_per_s"].agg(["count", "mean", "std"])
    repeated = per_pair[per_pair["count"] > 1]
    if repeated.empty:
        return pd.DataFrame()
    cv = (repeated["std"] / repeated["mean"]).groupby(level="method")
    return pd.DataFrame({"repeats": repeated["count"].groupby(level="method").max(),
                         "mean CV": cv.mean(), "max CV": cv.max()})


def main_budget(records: pd.DataFrame) -> str:
    """The budget label the main tables use: unlimited if present, else the largest sweep point."""
    labels = list(dict.fromkeys(records["budget"].fillna("")))
    if "" in labels or len(labels) <= 1:
        return "" if "" in labels or not labels else labels[0]
    kind = _swept_kind(records)
    return records.sort_values(kind)["budget"].iloc[-1] if kind else labels[-1]


def _swept_kind(records: pd.DataFrame) -> str | None:
    for kind in BUDGET_KINDS:
        if kind in records and records[kind].dropna().nunique() > 1:
            return kind
    return None


def main_records(records: pd.DataFrame) -> pd.DataFrame:
    """The records of the main budget point: every table but the sweep's compares one budget."""
    return records[records["budget"].fillna("") == main_budget(records)]


def budget_sweep(records: pd.DataFrame) -> pd.DataFrame:
    """Per method and sweep point: what a fixed compute budget buys (tokens produced, passes, tokens/pass)."""
    ok = successful(normalized(records))
    kind = _swept_kind(ok)
    if kind is None:
        return pd.DataFrame()
    ok = ok[ok[kind].notna()]
    for quality in ("output_perplexity", "task_score"):  # absent from runs made before quality metrics
        ok = ok.assign(**{quality: pd.to_numeric(ok.get(quality), errors="coerce")})
    grouped = ok.groupby(["method", kind])
    return pd.DataFrame({
        "new tokens": grouped["new_tokens"].mean(),
        "target calls": grouped["target_calls"].mean(),
        "tokens per target call": grouped["new_tokens"].sum() / grouped["target_calls"].sum(),
        "stopped by budget": grouped["stop_reason"].apply(lambda s: (s == "budget").mean()),
        "output perplexity": grouped["output_perplexity"].mean(),
        "task score": grouped["task_score"].mean(),
    }).reset_index().rename(columns={kind: "budget"}).assign(kind=BUDGET_KINDS[kind])


OUTPUT_PPL = "Output PPL"
MEAN_TASK_SCORE = "Mean task score"


def quality_table(records: pd.DataFrame, baseline: str = "ar") -> pd.DataFrame:
    """Per method (rows): mean output perplexity, mean task score per (category, metric), their mean, and
    the mean of every figure methods put in ctx.extras. Empty when no record carries any of them."""
    ok = successful(normalized(records))
    columns: dict[str, pd.Series] = {}
    if "output_perplexity" in ok and ok["output_perplexity"].notna().any():
        columns[OUTPUT_PPL] = pd.to_numeric(ok["output_perplexity"], errors="coerce").groupby(ok["method"]).mean()
    if "task_score" in ok:
        scored = ok[ok["task_score"].notna()]
        score_columns = []
        for category in ordered_categories(scored["category"]):
            rows = scored[scored["category"] == category]
            name = f"{category} ({rows['task_metric'].iloc[0]})"
            columns[name] = pd.to_numeric(rows["task_score"]).groupby(rows["method"]).mean()
            score_columns.append(name)
        if score_columns:
            columns[MEAN_TASK_SCORE] = pd.DataFrame({c: columns[c] for c in score_columns}).mean(axis=1)
    if "extras" in ok:
        extras = pd.DataFrame([e if isinstance(e, dict) else {} for e in ok["extras"]], index=ok.index)
        for key in extras.columns:
            columns[key] = pd.to_numeric(extras[key], errors="coerce").groupby(ok["method"]).mean()
    if not columns:
        return pd.DataFrame()
    return pd.DataFrame(columns).reindex(method_order(ok, baseline))
