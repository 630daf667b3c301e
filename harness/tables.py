"""The report's numbers as pandas tables: records loaded and normalised, the Spec-Bench speed table with
bootstrap intervals, peers, repeat spread, the budget sweep and the quality table. No formatting, no plots.

The speed table is computed the way Spec-Bench's evaluation/speed.py computes it: a question's speed is its new
tokens summed over its turns divided by its wall time summed over them; a method's speed is the mean over
questions; its speed-up is that mean over the baseline's (within a category: over that category's questions);
#MAT pools the accepted lengths of every step of every record. Repeats play the part of speed.py's repeated
runs (its mean report): the speed-up is the mean over repeats of each repeat's speed-up.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from harness import record as schema
from harness.longtables import generation_records
from harness.results import read_records

# Spec-Bench's column order; categories it does not know follow alphabetically.
CATEGORY_ORDER = ["mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag"]
QUESTION = list(schema.QUESTION_FIELDS)  # a question's id; its turns are summed
PAIR_KEY = ["category", *QUESTION, "turn"]  # one record of a question (repeats and budgets aside)
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
MAT = "#MAT"
OVERALL = "Overall speed-up"
TOKENS_PER_S = "Tokens/s"
CI_LOW = "Overall CI low"
CI_HIGH = "Overall CI high"
BUDGET_KINDS = {"max_target_calls": "target passes", "max_target_tokens": "target tokens", "max_wall_s": "seconds"}


def load_records(results_path: str | Path) -> pd.DataFrame:
    """One row per record of results.jsonl; unparsable lines (a killed run's last line) are skipped."""
    return normalized(pd.DataFrame(read_records(Path(results_path))))


def normalized(records: pd.DataFrame) -> pd.DataFrame:
    """Every schema field present (records from older or partial runs lack some), numbers as numbers."""
    records = records.copy()
    for column, default in schema.defaults().items():
        if column not in records:
            records[column] = [default] * len(records) if isinstance(default, (list, dict)) else default
    for column in schema.numeric_fields():
        records[column] = pd.to_numeric(records[column], errors="coerce")
    records["category"] = records["category"].fillna(schema.FIELDS["category"].default)
    records["suite"] = records["suite"].fillna("")
    records["turn"] = records["turn"].fillna(0).astype(int)
    records["repeat"] = records["repeat"].fillna(0).astype(int)
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


# ---------------------------------------------------------------- Spec-Bench's speed and #MAT


def question_speeds(records: pd.DataFrame) -> pd.Series:
    """Tokens/s per (method, repeat, category, question): new tokens summed over the question's turns divided
    by wall seconds summed over them. Only complete questions count: every turn of the item (item_turns; for
    older records, the most turns any record of the question shows) has a successful record."""
    records = normalized(records)
    if records.empty:
        return pd.Series(dtype=float)
    seen_turns = records.groupby(QUESTION, dropna=False)["turn"].max() + 1
    turns = records.groupby(QUESTION, dropna=False)["item_turns"].max().fillna(seen_turns).rename("turns")
    ok = successful(records)
    grouped = ok.groupby(["method", "repeat", "category", *QUESTION], dropna=False)
    sums = pd.DataFrame({"tokens": grouped["new_tokens"].sum(min_count=1), "wall": grouped["wall_s"].sum(min_count=1),
                         "done": grouped["turn"].nunique()}).join(turns, on=QUESTION)
    complete = sums[(sums["done"] == sums["turns"]) & (sums["wall"] > 0)]
    return (complete["tokens"] / complete["wall"]).rename("tokens_per_s")


def _speed_matrix(speeds: pd.Series, method: str) -> pd.DataFrame:
    """One method's question speeds: rows (category, question), columns repeats."""
    if method not in speeds.index.get_level_values("method"):
        return pd.DataFrame()
    return speeds.xs(method, level="method").unstack("repeat")


def _mean_rows(values: np.ndarray, used: np.ndarray) -> np.ndarray:
    """Mean over the question axis (-2) of the entries `used`; NaN where none is."""
    count = used.sum(axis=-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.where(used, values, 0.0).sum(axis=-2) / count, np.nan)


def _mean_over_repeats(values: np.ndarray) -> np.ndarray:
    valid = np.isfinite(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(valid.any(axis=-1), np.where(valid, values, 0.0).sum(axis=-1) / valid.sum(axis=-1), np.nan)


def speedup(method: np.ndarray, baseline: np.ndarray) -> float | np.ndarray:
    """Spec-Bench's speed-up from question speeds (questions x repeats, NaN where missing; a 1-D array is one
    repeat): per repeat, the mean over the questions both have of the method's speeds over the baseline's;
    then the mean over repeats. Leading axes (bootstrap resamples) are kept."""
    method, baseline = np.asarray(method, dtype=float), np.asarray(baseline, dtype=float)
    if method.ndim == 1:
        method, baseline = method[:, None], baseline[:, None]
    both = np.isfinite(method) & np.isfinite(baseline)
    per_repeat = _mean_rows(method, both) / _mean_rows(baseline, both)
    result = _mean_over_repeats(per_repeat)
    return float(result) if np.ndim(result) == 0 else result


def mean_speed(matrix: np.ndarray) -> float:
    """A method's tokens/s as speed.py reports it: mean over questions, then over repeats."""
    matrix = np.asarray(matrix, dtype=float)
    if matrix.ndim == 1:
        matrix = matrix[:, None]
    return float(_mean_over_repeats(_mean_rows(matrix, np.isfinite(matrix))))


def bootstrap_interval(method_tps: np.ndarray, baseline_tps: np.ndarray) -> tuple[float, float]:
    """95% interval of `speedup` over resampled questions (rows); NaN with fewer than two matched questions."""
    method_tps, baseline_tps = np.asarray(method_tps, dtype=float), np.asarray(baseline_tps, dtype=float)
    if method_tps.ndim == 1:
        method_tps, baseline_tps = method_tps[:, None], baseline_tps[:, None]
    matched = (np.isfinite(method_tps) & np.isfinite(baseline_tps)).any(axis=1)
    method_tps, baseline_tps = method_tps[matched], baseline_tps[matched]
    pairs = len(method_tps)
    if pairs < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(BOOTSTRAP_SEED)  # fresh per method: each row's CI is reproducible alone
    resampled = rng.integers(0, pairs, size=(BOOTSTRAP_RESAMPLES, pairs))
    ratios = speedup(method_tps[resampled], baseline_tps[resampled])
    low, high = np.nanpercentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def _aligned(speeds: pd.Series, method: str, baseline: str) -> tuple[np.ndarray, np.ndarray, pd.Index]:
    """Two methods' question-speed matrices on the same rows and repeat columns (NaN where one lacks)."""
    ours, theirs = _speed_matrix(speeds, method), _speed_matrix(speeds, baseline)
    rows = ours.index.union(theirs.index).set_names(["category", *QUESTION])
    columns = ours.columns.union(theirs.columns)
    return (ours.reindex(index=rows, columns=columns).to_numpy(float),
            theirs.reindex(index=rows, columns=columns).to_numpy(float), rows)


def pooled_mat(records: pd.DataFrame) -> float:
    """#MAT as speed.py pools it: the mean accepted length over every step of every record, the bonus token
    counted. The steps are the harness's target passes (a chunked prefill as one), so this is all new tokens
    over all steps: the mean of the records' accept_lengths flattened, since the runner checks each trace has
    one entry per step summing to the output (trace_error says where a method's trace disagrees; the counts are the harness's)."""
    calls = decoding_steps(records).sum()
    return float(records.loc[records["target_calls"] > 0, "new_tokens"].sum() / calls) if calls > 0 else math.nan


def decoding_steps(records: pd.DataFrame) -> pd.Series:
    """Target passes per record with a prompt read in several chunks (a cache policy's chunked prefill)
    counted as one step; records from before `prefill_calls` existed count every pass."""
    extra = records["prefill_calls"].fillna(1).clip(lower=1) - 1 if "prefill_calls" in records else 0
    return records["target_calls"] - extra


def speed_table(records: pd.DataFrame, baseline: str = "ar") -> pd.DataFrame:
    """The Spec-Bench table, numeric: rows = methods (baseline first), speed-ups as plain ratios.

    Columns: one per category, "#MAT", "Overall speed-up", "Tokens/s", then the overall speed-up's
    bootstrap interval over questions ("Overall CI low", "Overall CI high"). Without the baseline only
    "#MAT" and "Tokens/s" remain. Failed records (error set) are ignored; one budget point (the main one);
    records of a likelihood suite (a document read, nothing generated) have no place in it and are left out.
    """
    records = generation_records(main_records(normalized(records)))
    ok = successful(records)
    methods = method_order(ok, baseline)
    speeds = question_speeds(records)
    if baseline not in methods:
        table = pd.DataFrame(index=pd.Index(methods, name="method"), columns=[MAT, TOKENS_PER_S], dtype=float)
    else:
        categories = ordered_categories(ok["category"])
        columns = [*categories, MAT, OVERALL, TOKENS_PER_S, CI_LOW, CI_HIGH]
        table = pd.DataFrame(index=pd.Index(methods, name="method"), columns=columns, dtype=float)
        for method in methods:
            ours, theirs, rows = _aligned(speeds, method, baseline)
            if not len(rows):
                continue
            category_of = rows.get_level_values("category")
            for category in categories:
                inside = np.asarray(category_of == category)
                table.loc[method, category] = speedup(ours[inside], theirs[inside])
            table.loc[method, OVERALL] = speedup(ours, theirs)
            if method != baseline:
                table.loc[method, [CI_LOW, CI_HIGH]] = bootstrap_interval(ours, theirs)
    for method in methods:
        table.loc[method, MAT] = pooled_mat(ok[ok["method"] == method])
        own = _speed_matrix(speeds, method)
        table.loc[method, TOKENS_PER_S] = mean_speed(own.to_numpy(float)) if not own.empty else math.nan
    return table


HOST_MS = "Host ms/target pass"
HOST_SHARE = "Host share of wall time"


def host_overhead(records: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """Per method: time outside the timed forward passes. Per record host_s = wall_s - sum(target_pass_s)
    - sum(draft_pass_s) (at least 0); the table pools it: all host seconds over all target passes, and over
    all wall seconds. Records without per-pass times (older runs) are left out."""
    ok = successful(normalized(records))
    timed = ok[ok["target_pass_s"].map(lambda t: isinstance(t, list) and bool(t)) & ok["wall_s"].notna()]
    forward = [sum(t) + sum(d if isinstance(d, list) else []) for t, d in zip(timed["target_pass_s"], timed["draft_pass_s"])]
    timed = timed.assign(host_s=(timed["wall_s"] - forward).clip(lower=0))
    rows = {}
    for method in methods:
        own = timed[timed["method"] == method]
        if own.empty or not own["target_calls"].sum():
            continue
        rows[method] = {HOST_MS: 1000 * own["host_s"].sum() / own["target_calls"].sum(),
                        HOST_SHARE: own["host_s"].sum() / own["wall_s"].sum()}
    return pd.DataFrame.from_dict(rows, orient="index", columns=[HOST_MS, HOST_SHARE])


def peer_table(records: pd.DataFrame, methods_manifest: dict) -> pd.DataFrame:
    """Our implementation's speed over its transformers counterpart's, as the speed table defines speed-up,
    on the questions both completed. A reference method names the method it is a peer of (`counterpart`)."""
    speeds = question_speeds(main_records(normalized(records)))
    present = set(speeds.index.get_level_values("method")) if len(speeds) else set()
    rows = []
    for reference, described in methods_manifest.items():
        ours = described.get("counterpart")
        if not ours or ours not in present or reference not in present:
            continue
        mine, theirs, _ = _aligned(speeds, ours, reference)
        matched = (np.isfinite(mine) & np.isfinite(theirs)).any(axis=1)
        if not matched.any():
            continue
        low, high = bootstrap_interval(mine, theirs)
        both = np.isfinite(mine) & np.isfinite(theirs)
        rows.append({"ours": ours, "transformers": reference, "questions": int(matched.sum()),
                     "ours tokens/s": mean_speed(np.where(both, mine, np.nan)),
                     "transformers tokens/s": mean_speed(np.where(both, theirs, np.nan)),
                     "ratio": speedup(mine, theirs), "CI low": low, "CI high": high})
    return pd.DataFrame(rows)


def repeat_spread(records: pd.DataFrame) -> pd.DataFrame:
    """Per method: how much tokens/s of the same (item, turn) varies over repeats (mean coefficient of
    variation, and the worst one). Empty when no record was repeated."""
    ok = successful(normalized(records))
    per_pair = ok.groupby(["method", *PAIR_KEY], dropna=False)["tokens_per_s"].agg(["count", "mean", "std"])
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
    if ok["output_perplexity"].notna().any():
        columns[OUTPUT_PPL] = ok["output_perplexity"].groupby(ok["method"]).mean()
    scored = ok[ok["task_score"].notna()]
    score_columns = []
    for category in ordered_categories(scored["category"]):
        rows = scored[scored["category"] == category]
        name = f"{category} ({rows['task_metric'].iloc[0]})"
        columns[name] = rows["task_score"].groupby(rows["method"]).mean()
        score_columns.append(name)
    if score_columns:
        columns[MEAN_TASK_SCORE] = pd.DataFrame({c: columns[c] for c in score_columns}).mean(axis=1)
    extras = pd.DataFrame([e if isinstance(e, dict) else {} for e in ok["extras"]], index=ok.index)
    for key in extras.columns:
        columns[key] = pd.to_numeric(extras[key], errors="coerce").groupby(ok["method"]).mean()
    if not columns:
        return pd.DataFrame()
    return pd.DataFrame(columns).reindex(method_order(ok, baseline))


# ---------------------------------------------------------------- lm-eval tasks


def evaluation_table(ok: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """One row per lm-eval task x metric x method from the tasks' records (`metrics`, each metric's
    `<name>_stderr` beside it): task, metric, method, value, stderr (NaN where lm-eval gave none), whether
    higher is better (None when the task did not say), documents; empty without such records."""
    columns = ["task", "metric", "method", "value", "stderr", "higher is better", "documents"]
    rows = []
    order = {method: i for i, method in enumerate(methods)}
    for record in ok[ok["metrics"].map(lambda m: isinstance(m, dict))].itertuples():
        meta = record.item_meta if isinstance(record.item_meta, dict) else {}
        higher = meta.get("higher_is_better") or {}
        for key, value in record.metrics.items():
            name, comma, filt = key.partition(",")
            if name.endswith("_stderr"):
                continue
            stderr = record.metrics.get(f"{name}_stderr{comma}{filt}", math.nan)
            rows.append([meta.get("task", record.item_id), key, record.method, value, stderr, higher.get(name),
                         meta.get("documents")])
    table = pd.DataFrame(rows, columns=columns)
    if table.empty:
        return table
    table["order"] = table["method"].map(lambda m: order.get(m, len(order)))
    tasks = {task: i for i, task in enumerate(dict.fromkeys(table["task"]))}
    metrics = {metric: i for i, metric in enumerate(dict.fromkeys(table["metric"]))}  # lm-eval's order
    table["task order"], table["metric order"] = table["task"].map(tasks), table["metric"].map(metrics)
    table = table.sort_values(["task order", "metric order", "order"], kind="stable")
    return table.drop(columns=["order", "task order", "metric order"]).reset_index(drop=True)
