"""Results people can share: a run exported to Parquet and CSV, and several runs in one report."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from harness import cli
from harness.export import MANIFEST_KEY, RUN_COLUMNS, json_fields
from harness.record import FIELDS, SCHEMA_VERSION
from harness.results import read_records


def _plain(value):
    """A pandas cell as the JSON value it came from: arrays as lists, missing as None, numpy scalars as Python."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value


def test_parquet_export_round_trips_through_pandas(tiny_runs, tmp_path):
    run = tiny_runs[0]
    out = tmp_path / "shared" / "a.parquet"
    assert cli.main(["export", str(run), "--format", "parquet", "--out", str(out)]) == 0
    records = read_records(run / "results.jsonl")
    manifest = json.loads((run / "manifest.json").read_text())

    schema = pq.read_schema(out)  # the types come from the record schema, not from pandas' guesses
    assert schema.field("target_widths").type == pa.list_(pa.int64())
    assert schema.field("target_pass_s").type == pa.list_(pa.float64())
    assert schema.field("alternatives").type == pa.list_(pa.list_(pa.int64()))
    assert schema.field("new_tokens").type == pa.int64() and schema.field("wall_s").type == pa.float64()
    assert pa.types.is_struct(schema.field("lossless_check").type)
    assert schema.field("item_meta").metadata == {b"decodebench.encoding": b"json"}
    assert json.loads(schema.metadata[MANIFEST_KEY]) == manifest

    frame = pd.read_parquet(out, dtype_backend="numpy_nullable")
    assert len(frame) == len(records) == 3 * 4  # 3 methods x (one two-turn question + two one-turn ones)
    assert list(frame.columns) == [*FIELDS, *RUN_COLUMNS]
    assert (frame["schema_version"] == SCHEMA_VERSION).all()
    assert set(frame["run_name"]) == {run.name} and set(frame["run_device"]) == {manifest["device"]}
    assert set(frame["run_commit"].fillna("none")) == {manifest["git"]["commit"] or "none"}
    decoded = set(json_fields())
    for record, (_, row) in zip(records, frame.iterrows()):
        back = {name: _plain(row[name]) for name in FIELDS}
        for name in decoded:
            back[name] = None if back[name] is None else json.loads(back[name])
        assert back == record, record["method"]
    sps = frame[frame["method"] == "sps"]
    assert all(isinstance(check, dict) and check["equal"] for check in sps["lossless_check"])
    assert all(len(widths) == calls for widths, calls in zip(frame["target_widths"], frame["target_calls"]))


def test_csv_export_keeps_nested_fields_as_json(tiny_runs, tmp_path):
    run = tiny_runs[0]
    assert cli.main(["export", str(run), "--format", "csv"]) == 0  # default: RUN/results.csv
    frame = pd.read_csv(run / "results.csv")
    records = read_records(run / "results.jsonl")
    assert len(frame) == len(records)
    assert [json.loads(w) for w in frame["target_widths"]] == [r["target_widths"] for r in records]
    assert list(frame["new_tokens"]) == [r["new_tokens"] for r in records]
    assert frame["wall_s"].tolist() == [r["wall_s"] for r in records]


def test_export_refuses_a_folder_without_results(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path), "--format", "parquet"]) == 2
    assert "has no results.jsonl" in capsys.readouterr().out


def _section(markdown, title):
    return markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_report_of_several_runs_groups_tables_by_run(tiny_runs, tmp_path, capsys):
    a, b = tiny_runs
    single_before = (a / "report" / "report.md").read_text() if (a / "report" / "report.md").exists() else None
    out = tmp_path / "both"
    assert cli.main(["report", str(a), f"{b}=swapped", "--out", str(out)]) == 0
    assert "report of 2 runs (tiny-a, swapped)" in capsys.readouterr().out
    markdown = (out / "report.md").read_text()
    runs = _section(markdown, "Runs")
    assert "| tiny-a |" in runs and "| swapped |" in runs
    speed = _section(markdown, "Spec-Bench table by run").splitlines()
    header = next(line for line in speed if line.startswith("| Run | Method |"))
    assert "mt_bench" in header and "qa" in header and "Overall speed-up" in header
    rows = {tuple(cell.strip() for cell in line.strip("|").split("|")[:2]): line for line in speed
            if line.startswith(("| tiny-a", "| swapped"))}
    assert set(rows) == {(run, m) for run in ("tiny-a", "swapped") for m in ("ar", "sps", "pld")}
    for run in ("tiny-a", "swapped"):  # each run's speed-up is over its own ar
        assert "| 1.00x |" in rows[(run, "ar")]
    cost = _section(markdown, "Cost per method by run")
    assert sum(line.startswith(("| tiny-a |", "| swapped |")) for line in cost.splitlines()) == 6
    assert "Lossless check by run" in markdown
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "swapped" in html
    for name in ("runs_speedup.png", "runs_tokens_per_s.png"):
        assert (out / name).stat().st_size > 0
    if single_before is not None:  # a run's own report is not touched
        assert (a / "report" / "report.md").read_text() == single_before


def test_report_of_several_runs_needs_out_and_distinct_labels(tiny_runs, tmp_path, capsys):
    a, b = tiny_runs
    assert cli.main(["report", str(a), str(b)]) == 2
    assert "give --out DIR" in capsys.readouterr().out
    assert cli.main(["report", f"{a}=same", f"{b}=same", "--out", str(tmp_path / "x")]) == 2
    assert "two runs are labelled 'same'" in capsys.readouterr().out
    assert cli.main(["report", str(a), str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "has no results.jsonl" in capsys.readouterr().out
    assert not (tmp_path / "x").exists()  # refused before any work


def test_single_run_report_is_unchanged(tiny_runs):
    """`report RUN` still writes RUN/report as before."""
    a = tiny_runs[0]
    assert cli.main(["report", str(a)]) == 0
    assert "## Spec-Bench table\n" in (a / "report" / "report.md").read_text()
