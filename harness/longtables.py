"""The long-context report's numbers as pandas tables: RULER-style accuracy by length and depth, the KV cache's
bytes, decode latency against context length, and perplexity against position. No formatting, no plots.

Records come from harness.tables.normalized (successful ones). A longctx record carries item_meta with task,
length (target tokens) and depth (percent; None for tasks without a needle) and task_score; a likelihood
(longppl) record carries token_nll, the NLL of every token after the first, in order.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

PPL_WINDOW = 256  # tokens in the moving window of the running perplexity (shorter documents: a tenth of theirs)
# max_position_embeddings of the embedded models' configs, for runs whose target folder is gone.
KNOWN_WINDOWS = {"smollm2-135m": 8192, "qwen2.5-coder-0.5b": 32768, "qwen2.5-coder-1.5b": 32768}


def likelihood_suites() -> set[str]:
    """The registered suites that score documents (Suite.needs == "loglikelihood")."""
    from suites.base import registry

    return {name for name, suite in registry().items() if suite.needs == "loglikelihood"}


def is_likelihood(records: pd.DataFrame) -> pd.Series:
    """Records of a likelihood suite (a document scored, nothing generated), failed ones included."""
    suites = likelihood_suites()
    return records["token_nll"].map(lambda nll: isinstance(nll, list)) | records["suite"].isin(suites)


def is_evaluation(records: pd.DataFrame) -> pd.Series:
    """An lm-eval task's own record (its metrics; the task's generations are records of their own)."""
    return records["metrics"].map(lambda metrics: isinstance(metrics, dict))


def generation_records(records: pd.DataFrame) -> pd.DataFrame:
    """The records that generated text: the only ones Spec-Bench's speed and #MAT apply to."""
    return records[~is_likelihood(records) & ~is_evaluation(records)]


def likelihood_records(records: pd.DataFrame) -> pd.DataFrame:
    """The records holding a scored document: per-token NLLs, or (a scorer's reading) only its total."""
    scored = records["token_nll"].map(lambda nll: isinstance(nll, list) and bool(nll))
    if "window_loglik" in records:
        scored |= records["window_loglik"].map(lambda loglik: isinstance(loglik, list) and bool(loglik))
    return records[scored]


def document_nll(record) -> float:
    """A scored document's NLL (nats): its tokens' summed, or a scorer's total (its one window's)."""
    nll = record["token_nll"]
    return math.fsum(nll) if isinstance(nll, list) and nll else -math.fsum(record["window_loglik"])


# ---------------------------------------------------------------- long-context accuracy


def scored_items(ok: pd.DataFrame) -> pd.DataFrame:
    """One row per scored longctx record: method, task, length, depth (NaN without a needle), score."""
    rows = []
    for method, meta, score in zip(ok["method"], ok["item_meta"], ok["task_score"]):
        if not isinstance(meta, dict) or "task" not in meta or "length" not in meta or pd.isna(score):
            continue
        depth = meta.get("depth")
        rows.append({"method": method, "task": meta["task"], "length": int(meta["length"]),
                     "depth": math.nan if depth is None else float(depth), "score": float(score)})
    return pd.DataFrame(rows, columns=["method", "task", "length", "depth", "score"])


def needle_grid(ok: pd.DataFrame, methods: list[str]) -> dict[str, pd.DataFrame]:
    """Per method: mean score of the needle tasks (every record with a depth, all needle tasks pooled), rows
    lengths and columns depths; NaN where a cell has no record. Methods without needle records are left out."""
    items = scored_items(ok).dropna(subset=["depth"])
    grids = {}
    for method in methods:
        own = items[items["method"] == method]
        if not own.empty:
            grids[method] = own.pivot_table(index="length", columns="depth", values="score", aggfunc="mean")
    return grids


def accuracy_by_task(ok: pd.DataFrame, methods: list[str]) -> dict[str, pd.DataFrame]:
    """Per task: rows methods, columns lengths then "all", each cell (mean score, records)."""
    items = scored_items(ok)
    tables = {}
    for task in dict.fromkeys(items["task"]):
        own = items[items["task"] == task]
        lengths = sorted(own["length"].unique())
        table = pd.DataFrame(index=pd.Index([m for m in methods if m in set(own["method"])], name="method"),
                             columns=[*lengths, "all"], dtype=object)
        for method in table.index:
            mine = own[own["method"] == method]
            for length in lengths:
                cell = mine.loc[mine["length"] == length, "score"]
                table.loc[method, length] = (cell.mean(), len(cell)) if len(cell) else (math.nan, 0)
            table.loc[method, "all"] = (mine["score"].mean(), len(mine))
        tables[task] = table
    return tables


# ---------------------------------------------------------------- KV cache


def kv_cache_table(ok: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """Per method: records measured, the KV cache's bytes at its peak and at the end (mean and max over the
    records that kept a cache), what a cache policy held beside it (max), and the process's peak memory (max). Empty when no record measured the cache."""
    if ok["kv_cache_peak_bytes"].isna().all():
        return pd.DataFrame()
    rows = {}
    for method in methods:
        own = ok[ok["method"] == method]
        measured = own[own["kv_cache_peak_bytes"].notna()]
        rows[method] = {"records": len(own), "measured": len(measured),
                        "peak mean": measured["kv_cache_peak_bytes"].mean(),
                        "peak max": measured["kv_cache_peak_bytes"].max(),
                        "final mean": measured["kv_cache_final_bytes"].mean(),
                        "final max": measured["kv_cache_final_bytes"].max(),
                        "policy state max": own["policy_state_bytes"].max() if "policy_state_bytes" in own else None,
                        "process peak": own["peak_mem_bytes"].max()}
    return pd.DataFrame.from_dict(rows, orient="index")


# ---------------------------------------------------------------- latency against context length


def prefill_passes(record) -> int:
    """Target passes that read the prompt: the first passes whose widths add up to it (a policy may prefill
    in chunks); 1 when the widths are unknown or never add up to the prompt."""
    widths, prompt = record["target_widths"], record["prompt_tokens"]
    if isinstance(widths, list) and not pd.isna(prompt):
        total = 0
        for passes, width in enumerate(widths, start=1):
            total += width
            if total >= prompt:
                return passes
    return 1


def split_latency(record) -> tuple[float, float]:
    """(prefill seconds, seconds per generated token after the first). Records with `prefill_calls` (schema 3)
    time the prefill to the end of the pass that finished reading the prompt, however many chunks it took.
    In older records prefill_s ended with the first target pass, so when the prompt took several passes
    (chunked prefill) the later ones' times move here from decoding to prefill. Decoding is decode_s /
    (new_tokens - 1), the first token coming from the prefill; without decode_s, the target passes after the
    prefill. NaN where the record lacks the figures."""
    passes = record["target_pass_s"] if isinstance(record["target_pass_s"], list) else []
    counted = record.get("prefill_calls")
    chunks = int(counted) if counted is not None and not pd.isna(counted) else prefill_passes(record)
    moved = 0.0
    if chunks > 1 and (counted is None or pd.isna(counted)):  # an older record: move the later chunks
        moved = sum(passes[1:chunks]) if len(passes) >= chunks else math.nan
    prefill = record["prefill_s"] + moved
    steps = (record["new_tokens"] or 0) - 1
    if not steps > 0:
        return prefill, math.nan
    if not pd.isna(record["decode_s"]):
        decode = record["decode_s"] - moved
    else:
        decode = sum(passes[chunks:]) if len(passes) > chunks else math.nan
    return prefill, decode / steps


def latency_by_length(ok: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """Per method and longctx length: records, mean prompt tokens, and the means of split_latency's prefill
    seconds and seconds per decode step. Empty when no record carries a length (e.g. a Spec-Bench run)."""
    lengths = ok["item_meta"].map(lambda meta: meta.get("length") if isinstance(meta, dict) else None)
    timed = ok.assign(length=pd.to_numeric(lengths, errors="coerce"))
    timed = timed[timed["length"].notna() & timed["method"].isin(methods)]
    if timed.empty:
        return pd.DataFrame()
    split = [split_latency(r) for _, r in timed.iterrows()]
    timed = timed.assign(prefill=[p for p, _ in split], step=[d for _, d in split])
    grouped = timed.groupby(["method", "length"], sort=False)
    table = pd.DataFrame({"records": grouped.size(), "prompt tokens": grouped["prompt_tokens"].mean(),
                          "prefill s": grouped["prefill"].mean(), "decode step s": grouped["step"].mean()})
    order = {m: i for i, m in enumerate(methods)}
    return table.reset_index().sort_values(["method", "length"], key=lambda c: c.map(order) if c.name == "method"
                                           else c).reset_index(drop=True)


# ---------------------------------------------------------------- perplexity against position


def mean_nll_by_position(nlls: list[list[float]]) -> np.ndarray:
    """Mean NLL at each scored position over documents (those reaching it): entry i is position i + 1."""
    longest = max(len(nll) for nll in nlls)
    stacked = np.full((len(nlls), longest), np.nan)
    for row, nll in enumerate(nlls):
        stacked[row, :len(nll)] = nll
    return np.nanmean(stacked, axis=0)


def running_window(scored: int) -> int:
    return PPL_WINDOW if scored >= 4 * PPL_WINDOW else max(1, scored // 10)


def running_perplexity(nll: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """exp of the mean NLL over the `window` tokens ending at each position (trailing, so a position's value
    only uses tokens up to it): positions (of the last token, 1-based as token_nll's entry i is position i+1)
    and perplexities."""
    nll = np.asarray(nll, dtype=float)
    if len(nll) < window:
        return np.array([]), np.array([])
    means = np.convolve(nll, np.ones(window) / window, mode="valid")
    return np.arange(window, len(nll) + 1), np.exp(means)


def pooled_perplexity(documents: pd.DataFrame) -> dict:
    """Scored documents pooled as lm-eval pools a corpus: their summed NLL over their words (word perplexity)
    and UTF-8 bytes (byte perplexity, bits per byte)."""
    total = math.fsum(document_nll(record) for _, record in documents.iterrows())
    words, size = documents["words"].sum(), documents["bytes"].sum()
    return {"documents": len(documents), "words": int(words), "bytes": int(size), "nll": total,
            "word ppl": math.exp(total / words) if words > 0 else math.nan,
            "byte ppl": math.exp(total / size) if size > 0 else math.nan,
            "bits per byte": total / (size * math.log(2)) if size > 0 else math.nan}


def perplexity_table(reading: pd.DataFrame, methods: list[str], window: int | None) -> pd.DataFrame:
    """Per method, pooled over its documents as lm-eval pools a corpus: token perplexity exp(sum NLL / scored
    tokens), word exp(sum NLL / words), byte exp(sum NLL / bytes), bits per byte sum NLL / (bytes ln 2); the
    token perplexity of positions before the model's window and from it on; how the document was read; and
    the reading time per document token (wall seconds over prompt tokens)."""
    rows = {}
    for method in methods:
        own = reading[reading["method"] == method]
        if own.empty:
            continue
        nlls = [np.asarray(nll, dtype=float) for nll in own["token_nll"]]
        pooled = pooled_perplexity(own)
        scored = sum(len(nll) for nll in nlls)
        inside, beyond = _split_at(nlls, window)
        rows[method] = {
            **pooled, "scored tokens": scored,
            "token ppl": math.exp(pooled["nll"] / scored) if scored else math.nan,
            "ppl inside window": math.exp(inside.mean()) if len(inside) else math.nan,
            "ppl past window": math.exp(beyond.mean()) if len(beyond) else math.nan,
            "read as": ", ".join(dict.fromkeys(own["task_metric"].fillna("?"))),
            "ms per token": 1000 * own["wall_s"].sum() / own["prompt_tokens"].sum(),
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def _split_at(nlls: list[np.ndarray], window: int | None) -> tuple[np.ndarray, np.ndarray]:
    """NLLs of positions < window and >= window (entry i is position i + 1), pooled over documents."""
    if not window:
        return np.array([]), np.array([])
    cut = window - 1  # entries 0 .. window-2 are positions 1 .. window-1
    return (np.concatenate([nll[:cut] for nll in nlls]), np.concatenate([nll[cut:] for nll in nlls]))


def model_window(manifest: dict, reading: pd.DataFrame) -> tuple[int | None, str]:
    """The target's trained window (max_position_embeddings) and where it was found: the manifest's target
    info, else the target folder's config.json (when the folder is still there), else the embedded models'
    known windows, else the sliding window full attention read with when the suite's `window` option was
    left at 0 (the runner then uses max_position_embeddings)."""
    target = manifest.get("target") or {}
    if target.get("max_position_embeddings"):
        return int(target["max_position_embeddings"]), "max_position_embeddings in the manifest"
    config = Path(str(target.get("source", ""))) / "config.json"
    if target.get("source") and config.is_file():
        try:
            value = json.loads(config.read_text()).get("max_position_embeddings")
        except (OSError, ValueError):
            value = None
        if value:
            return int(value), f"max_position_embeddings in {config}"
    if target.get("spec") in KNOWN_WINDOWS:
        return KNOWN_WINDOWS[target["spec"]], f"the known window of {target['spec']}"
    option = str(((manifest.get("settings") or {}).get("suite_options") or {}).get("window", "0"))
    sliding = [m.split()[1].split("/")[0] for m in reading["task_metric"].dropna() if m.startswith("sliding ")]
    if option == "0" and sliding:
        return int(sliding[0]), "the sliding window full attention read with (max_position_embeddings)"
    return None, "unknown (the target's config is not reachable)"
