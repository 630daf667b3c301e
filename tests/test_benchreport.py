"""`pytest --benchmark-only` on the decode-loop benchmarks (a real pytest-benchmark run, in a subprocess, on the
tiny pair), then `decodebench report --pytest-benchmark` on the JSON it saved."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import cli
from harness.benchreport import speedup

REPO = Path(__file__).resolve().parent.parent
LOOPS = "tests/benchmarks/test_decode_loop.py"
METHODS = ["ar", "pld", "sps"]


def pytest_run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=600)


@pytest.fixture(scope="module")
def saved_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = pytest_run("--benchmark-only", f"--benchmark-json={path}",
                      *(f"{LOOPS}::test_decode_loop_tiny[{m}]" for m in METHODS),
                      DECODEBENCH_BENCH_ROUNDS="2", DECODEBENCH_BENCH_TOKENS="8")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return path


def test_plain_pytest_deselects_the_benchmarks():
    proc = pytest_run("--collect-only", LOOPS)
    assert proc.returncode == 5 and "deselected" in proc.stdout, proc.stdout  # 5: nothing collected


def test_saved_benchmarks_carry_the_harness_counts(saved_json):
    benches = {b["extra_info"]["method"]: b for b in json.loads(saved_json.read_text())["benchmarks"]}
    assert sorted(benches) == sorted(METHODS)
    for bench in benches.values():
        info, stats = bench["extra_info"], bench["stats"]
        assert stats["rounds"] == 2 and info["prompts"] == 2 and info["max_new_tokens"] == 8
        assert 0 < info["new_tokens_per_round"] <= 16 and info["tokens_per_s"] > 0
    ar, sps = benches["ar"]["extra_info"], benches["sps"]["extra_info"]
    assert ar["target_calls_per_round"] == ar["new_tokens_per_round"] and ar["mean_accepted"] == 1  # one pass a token
    assert ar["draft_calls_per_round"] == 0 and sps["draft_calls_per_round"] > 0


def test_report_table_from_saved_json(saved_json, tmp_path, capsys):
    out = tmp_path / "report"
    assert cli.main(["report", "--pytest-benchmark", str(saved_json), "--out", str(out)]) == 0
    markdown = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    benches = {b["extra_info"]["method"]: b for b in json.loads(saved_json.read_text())["benchmarks"]}
    rows = {line.split(" | ")[0].removeprefix("| "): line.split(" | ") for line in markdown.splitlines()
            if line.startswith("| ") and not line.startswith(("| Method", "| ---"))}
    assert sorted(rows) == sorted(METHODS)
    assert rows["ar"][-1].startswith("1.00x (baseline)")
    for name in ("pld", "sps"):
        ratio, low, high = speedup(benches["ar"], benches[name])
        assert low <= ratio <= high
        assert rows[name][-1].startswith(f"{ratio:.2f}x [{low:.2f}, {high:.2f}]")
        assert rows[name][6] == f"{benches[name]['extra_info']['mean_accepted']:.2f}"
    assert "decode loop: tiny random pair" in markdown and "<table>" in html and "<td>sps</td>" in html
    assert str(out / "report.md") in capsys.readouterr().out


def test_report_refuses_bad_files_before_any_work(tmp_path, capsys):
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"benchmarks": [{"name": "test_other", "stats": {"mean": 1.0}}]}))
    assert cli.main(["report", "--pytest-benchmark", str(foreign)]) == 2
    assert "no decode-loop benchmark" in capsys.readouterr().out
    (tmp_path / "text.json").write_text("not json")
    assert cli.main(["report", "--pytest-benchmark", str(tmp_path / "text.json")]) == 2
    assert "is not JSON" in capsys.readouterr().out
    assert cli.main(["report", str(tmp_path), "--pytest-benchmark", str(foreign)]) == 2
    assert not (tmp_path / "foreign-report").exists()
