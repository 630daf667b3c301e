"""One report for a sweep folder: a row per job and method, a column per setting the grid varies.

Each job's figures are its own run's (harness.tables.speed_table over its main budget point, its speed-ups
over its own baseline); SWEEP/jobs/<id> is a run folder, so `decodebench report SWEEP/jobs/<id>` gives one
job's full report. Writes SWEEP/report/report.md and report.html.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from harness.report import _table
from harness.results import read_records
from harness.sweep import varying
from harness.sweeprun import read_state
from harness.tables import MAT, OVERALL, TOKENS_PER_S, normalized, speed_table


def sweep_rows(folder: Path, baseline: str = "ar") -> tuple[list[str], list[dict]]:
    """The varying settings, and one row per job and method (a job without records: one row, its status)."""
    state = read_state(folder / "sweep.jsonl")
    keys = varying([row["settings"] for row in state])
    rows = []
    for job in state:
        settings = {k: _text(job["settings"].get(k)) for k in keys}
        base = {**settings, "job": job["job"], "status": job["status"], "attempts": job["attempts"]}
        raw = read_records(folder / "jobs" / job["job"] / "results.jsonl")
        if not raw:
            rows.append({**base, "method": "", "error": job.get("error") or ""})
            continue
        records = normalized(pd.DataFrame(raw))
        table = speed_table(records, baseline)
        for method, figures in table.iterrows():
            mine = records[records["method"] == method]
            failed = int(mine["error"].notna().sum())
            rows.append({**base, "method": method, "records": len(mine), "failed records": failed,
                         "tokens/s": figures.get(TOKENS_PER_S), "speed-up": figures.get(OVERALL, math.nan),
                         "#MAT": figures.get(MAT), "lossless mismatches": _mismatches(mine),
                         "error": job.get("error") or ""})
    return keys, rows


def _mismatches(records: pd.DataFrame) -> int | str:
    checks = [c for c in records["lossless_check"] if isinstance(c, dict)]
    if not checks:
        return ""
    return sum(not c.get("equal") and not c.get("numerical_tie") for c in checks)


def _text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _cell(value) -> str:
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.2f}"
    return "" if value is None else str(value)


def build_sweep_report(folder: str | Path, baseline: str = "ar") -> Path:
    """SWEEP/report: the jobs' status and figures (a row per job and method, a column per varied setting), then
    the jobs as runs side by side (harness/runsreport.py: Spec-Bench and cost tables by job, or perplexity by
    job and the perturbation sweep for a likelihood grid), each job labelled by the settings it varies."""
    from harness.runsreport import build_runs_report

    folder = Path(folder)
    keys, rows = sweep_rows(folder, baseline)
    columns = [*keys, "job", "method", "status", "attempts", "records", "failed records", "tokens/s", "speed-up",
               "#MAT", "lossless mismatches", "error"]
    table = _table(columns, [[_cell(row.get(c)) for c in columns] for row in rows])
    varied = ", ".join(keys) or "nothing (one job)"
    note = (f"Settings the grid varies: {varied}. One row per job and method. Speed-up is over the job's own "
            f"{baseline} (Spec-Bench's, as in a run's report); `decodebench report {folder}/jobs/JOB` gives a job's "
            "full report.")
    labels = {}
    for row in rows:
        labels.setdefault(row["job"], " ".join(row[k] for k in keys) or row["job"])
    runs = [(folder / "jobs" / job, label) for job, label in labels.items()
            if (folder / "jobs" / job / "results.jsonl").is_file()]
    return build_runs_report(runs, folder / "report", baseline, title=f"decodebench sweep: {folder.name}",
                             sweep={"note": note, **table})
