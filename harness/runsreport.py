"""`decodebench report RUN1 RUN2 ... --out DIR`: several runs (machines, models, dates) in one report.

Each run's figures are computed as its own report computes them (harness/report.py): its main budget point,
speed-ups over its own baseline (`ar` unless --baseline), so a row's speed-up compares methods on one machine,
never across machines. The tables put the runs one under another with a Run column telling them apart; a run's
label is its folder name, or LABEL when given as RUN=LABEL. The Runs section says what each label ran on
(device, target, date, commit). One run's report (`decodebench report RUN`) is unchanged by this.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from harness import longtables
from harness.plots import draw_run_plots
from harness.report import (
    MISSING_IN_SPEED_TABLE,
    _cost_table,
    _load_manifest,
    _lossless_section,
    _method_label,
    _perturbation_section,
    _prediction_display,
    _speed_display,
    _table,
    _without_duplicates,
    load_templates,
)
from harness.results import read_records
from harness.tables import (
    BOOTSTRAP_RESAMPLES,
    MAT,
    OVERALL,
    TOKENS_PER_S,
    main_budget,
    main_records,
    method_order,
    normalized,
    ordered_categories,
    speed_table,
    successful,
)

NOTE = (
    "Every run's figures are computed as its own report computes them: Spec-Bench's speed-up of each method over "
    "{baseline} of the same run (same machine, model and date), its #MAT and tokens/s, the bracket a 95% "
    "bootstrap interval over questions ({resamples} resamples). Speed-ups are therefore comparable across runs, "
    "tokens/s only between runs on the same device. A category a run did not cover is shown as {missing}."
)


class RunsReportError(ValueError):
    """A run argument that names no run folder, or two runs with one label."""


@dataclass
class Run:
    label: str
    path: Path
    manifest: dict
    records: pd.DataFrame  # the main budget point's records
    raw: list[dict]  # the same as stored (what the cost model reads)
    table: pd.DataFrame  # speed_table over its own baseline
    ok: pd.DataFrame  # its successful records of generated text
    methods: list[str]
    duplicates: str | None


def parse_runs(arguments: list[str]) -> list[tuple[Path, str]]:
    """RUN or RUN=LABEL -> (folder, label), checked before any work: every folder holds results.jsonl, labels
    differ. A default label is the folder's name; two folders of one name get their parents' names too."""
    parsed = []
    for argument in arguments:
        path, label = Path(argument), None
        if not path.exists() and "=" in argument:
            folder, _, label = argument.rpartition("=")
            path = Path(folder)
            if not label:
                raise RunsReportError(f"{argument!r}: an empty label after '='")
        if not (path / "results.jsonl").is_file():
            raise RunsReportError(f"{path} has no results.jsonl (is it a run folder?)")
        parsed.append((path, label))
    names = [p.resolve().name for p, _ in parsed]
    labels = [label or (f"{p.resolve().parent.name}/{p.resolve().name}" if names.count(p.resolve().name) > 1
                        else p.resolve().name) for p, label in parsed]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise RunsReportError(f"two runs are labelled {repeated[0]!r}; give each its own label with RUN=LABEL")
    return [(path, label) for (path, _), label in zip(parsed, labels)]


def load_run(path: Path, label: str, baseline: str) -> Run:
    """One run's records and tables, as build_report computes them."""
    raw, duplicates = _without_duplicates(read_records(path / "results.jsonl"))
    records = normalized(pd.DataFrame(raw))
    label_budget = main_budget(records)
    records = main_records(records)
    likelihood_suites = longtables.likelihood_suites()
    raw = [r for r in raw if r.get("budget", "") == label_budget and not isinstance(r.get("token_nll"), list)
           and r.get("suite") not in likelihood_suites]
    generated = longtables.generation_records(records)
    ok = successful(generated)
    return Run(label=label, path=path, manifest=_load_manifest(path / "manifest.json"), records=records, raw=raw,
               table=speed_table(generated, baseline), ok=ok, methods=method_order(ok, baseline),
               duplicates=duplicates)


def _runs_table(runs: list[Run]) -> dict:
    rows = []
    for run in runs:
        m = run.manifest
        git = m.get("git") or {}
        commit = (git.get("commit") or "?")[:12] + (" (uncommitted changes)" if git.get("dirty") else "")
        failed = int(run.records["error"].notna().sum())
        rows.append([run.label, m.get("device", "?"), _spec(m.get("target")), _spec(m.get("draft")),
                     m.get("suite", "?"), m.get("created", "?"), commit, len(run.records), failed, str(run.path)])
    return _table(["Run", "Device", "Target", "Draft", "Suite", "Created", "Commit", "Records", "Failed",
                   "Folder"], rows)


def _spec(model) -> str:
    return model.get("spec", "?") if isinstance(model, dict) else str(model or "none")


def _speed_by_run(runs: list[Run]) -> dict:
    """The Spec-Bench table of every run, one under another; categories are the union over runs."""
    categories = ordered_categories({c for run in runs for c in run.table.columns
                                     if c not in (MAT, OVERALL, TOKENS_PER_S) and "CI" not in c})
    columns = [*categories, MAT, OVERALL, TOKENS_PER_S]
    rows = []
    for run in runs:
        shown = _speed_display(run.table)
        for method in shown.index:
            rows.append([run.label, _method_label(method, run.manifest.get("methods")),
                         *(shown.loc[method, c] if c in shown.columns else MISSING_IN_SPEED_TABLE for c in columns)])
    return _table(["Run", "Method", *columns], rows)


def _cost_by_run(runs: list[Run]) -> dict:
    rows, columns = [], []
    for run in runs:
        cost = _cost_table(run.ok, run.methods)
        columns = list(cost.columns)
        rows += [[run.label, _method_label(method, run.manifest.get("methods")), *values]
                 for method, values in zip(cost.index, cost.itertuples(index=False))]
    return _table(["Run", "Method", *columns], rows)


def _lossless_by_run(runs: list[Run], baseline: str) -> dict | None:
    rows = [[run.label, check["label"], check["summary"]] for run in runs
            for check in _lossless_section(run.ok, run.manifest, baseline)["methods"]]
    return _table(["Run", "Method", "Lossless check (greedy outputs)"], rows) if rows else None


def _prediction_by_run(runs: list[Run], baseline: str, profiles: list[str] | None) -> dict | None:
    """The cost model's speed-ups from every run's trace, priced with the same profiles (the --profile files)."""
    if not profiles:
        return None
    rows, columns = [], []
    for run in runs:
        shown = _prediction_display(run.path, run.raw, run.table, baseline, profiles)
        if shown:
            columns = shown["columns"]
            rows += [[run.label, *row] for row in shown["rows"]]
    return _table(["Run", *columns], rows) if rows else None


def _reading(runs: list[Run]) -> pd.DataFrame:
    """Every run's scored documents (likelihood suites), with the run's label and target model."""
    frames = [longtables.likelihood_records(successful(run.records)).assign(
        run=run.label, model=_spec(run.manifest.get("target"))) for run in runs]
    frames = [frame for frame in frames if not frame.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _perplexity_by_run(reading: pd.DataFrame, baseline: str) -> dict | None:
    """Per run and method, pooled as a single run's perplexity table pools them, with the change in word
    perplexity against the run's own baseline."""
    if reading.empty:
        return None
    rows = []
    for label, own in reading.groupby("run", sort=False):
        table = longtables.perplexity_table(own, list(dict.fromkeys(own["method"])), None)
        reference = table["word ppl"].get(baseline)
        for method, r in table.iterrows():
            change = f"{100 * (r['word ppl'] / reference - 1):+.2f}%" if reference and reference > 0 else "—"
            rows.append([label, own["model"].iloc[0], method, int(r["documents"]), int(r["bytes"]),
                         _number(r["token ppl"], "{:.2f}"), _number(r["word ppl"], "{:.2f}"), change,
                         _number(r["bits per byte"], "{:.4f}")])
    return _table(["Run", "Model", "Method", "Documents", "Bytes", "Token PPL", "Word PPL", f"Word PPL vs {baseline}",
                   "Bits/byte"], rows)


def _number(value, fmt: str) -> str:
    return MISSING_IN_SPEED_TABLE if pd.isna(value) else fmt.format(value)


def build_runs_report(runs: list[tuple[Path, str]], out: str | Path, baseline: str = "ar",
                      profile: list[str] | None = None, title: str | None = None, sweep: dict | None = None) -> Path:
    """Write OUT/report.md, OUT/report.html (self-contained, plots embedded) and OUT's PNG plots for several
    runs; returns OUT."""
    markdown_template, html_template = load_templates("runs")  # fail before any work if they are missing
    loaded = [load_run(path, label, baseline) for path, label in runs]
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    reading = _reading(loaded)
    generates = any(not run.ok.empty for run in loaded) or reading.empty
    context = {
        "generates": generates,
        "perplexity": _perplexity_by_run(reading, baseline),
        "perturbation": _perturbation_section(reading, baseline, folder),
        "title": title or f"decodebench report: {len(loaded)} runs",
        "sweep": sweep,
        "baseline": baseline,
        "runs": _runs_table(loaded),
        "missing_baseline": [run.label for run in loaded if baseline not in run.methods],
        "note": NOTE.format(baseline=baseline, resamples=BOOTSTRAP_RESAMPLES, missing=MISSING_IN_SPEED_TABLE),
        "speed": _speed_by_run(loaded),
        "cost": _cost_by_run(loaded),
        "lossless": _lossless_by_run(loaded, baseline),
        "prediction": _prediction_by_run(loaded, baseline, profile),
        "duplicates": [f"{run.label}: {run.duplicates}" for run in loaded if run.duplicates],
        "plots": draw_run_plots({run.label: run.table for run in loaded}, baseline, folder),
    }
    (folder / "report.md").write_text(markdown_template.render(context), encoding="utf-8")
    (folder / "report.html").write_text(html_template.render(context), encoding="utf-8")
    return folder
