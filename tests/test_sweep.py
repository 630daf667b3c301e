"""Sweep files (harness/sweep.py): the grid, stable job ids, and every error said before anything runs.
Fast: no model loads (one would fail the test)."""
from __future__ import annotations

import json

import pytest

from harness import cli, sweep
from harness import models as model_specs
from harness.sweeprun import SweepState, _failure

ISSUE_EXAMPLE = {"suite": "specbench", "target": "smollm2-135m", "methods": ["ar", "pld", "token_recycling"],
                 "limit": 1, "max_new_tokens": 16, "temperature": [0.0, 1.0],
                 "budget": ["target_calls=8", "target_calls=16"]}


@pytest.fixture(autouse=True)
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded while a sweep file was checked")

    monkeypatch.setattr(model_specs, "load", refuse)


def ids(spec: dict) -> list[str]:
    return [job.id for job in sweep.expand(spec)]


def test_the_issue_example_is_four_jobs_each_running_all_three_methods():
    jobs = sweep.expand(ISSUE_EXAMPLE)
    assert len(jobs) == 4
    assert sweep.varying(jobs) == ["temperature", "budget"]
    assert {(j.settings["temperature"], tuple(j.settings["budget"])) for j in jobs} == {
        (t, (b,)) for t in (0.0, 1.0) for b in ("target_calls=8", "target_calls=16")}
    for job in jobs:
        assert job.settings["methods"] == "ar,pld,token_recycling"
        argv = job.run_argv("OUT")
        assert argv[argv.index("--methods") + 1] == "ar,pld,token_recycling"
        assert argv[argv.index("--max-new-tokens") + 1] == "16" and argv[-2:] == ["--out", "OUT"]
    assert len(set(ids(ISSUE_EXAMPLE))) == 4


def test_ids_do_not_depend_on_order_spelling_or_other_jobs():
    reordered = dict(reversed(list(ISSUE_EXAMPLE.items())))
    reordered["temperature"] = [1, 0]  # ints: run parses them as the same floats
    reordered["max-new-tokens"] = reordered.pop("max_new_tokens")
    assert sorted(ids(reordered)) == sorted(ids(ISSUE_EXAMPLE))
    grown = {**ISSUE_EXAMPLE, "temperature": [0.0, 1.0, 0.5]}
    assert set(ids(ISSUE_EXAMPLE)) < set(ids(grown))
    assert not set(ids(ISSUE_EXAMPLE)) & set(ids({**ISSUE_EXAMPLE, "limit": 2}))


def test_methods_sets_mappings_and_several_flags_per_job():
    jobs = sweep.expand({"methods": [["ar", "sps"], "ar,pld"], "set": {"sps.gamma": [2, 4], "pld.max_ngram_size": 3},
                         "budget": [["target_calls=8", "wall_s=5"]], "no_warmup": [True, False]})
    assert len(jobs) == 2 * 2 * 1 * 2
    assert {j.settings["methods"] for j in jobs} == {"ar,sps", "ar,pld"}
    first = jobs[0]
    assert first.settings["set"] == ["pld.max_ngram_size=3", "sps.gamma=2"]
    assert first.settings["budget"] == ["target_calls=8", "wall_s=5"]
    assert "--no-warmup" in first.argv and "--no-warmup" not in jobs[1].argv
    assert sweep.varying(jobs) == ["methods", "set", "no_warmup"]


@pytest.mark.parametrize("spec, says", [
    ({"temprature": [0, 1]}, "unknown key 'temprature' (did you mean 'temperature'?)"),
    ({"out": "runs/x"}, "unknown key 'out'"),
    ({"temperature": []}, "temperature: an empty list leaves the grid empty"),
    ({"set": {"sps.gamma": []}}, "set.sps.gamma: an empty list leaves the grid empty"),
    ({"limit": "abc"}, "argument --limit: invalid int value: 'abc'"),
    ({"limit": True}, "limit: expected a value for --limit, got True"),
    ({"limit": None}, "limit: no value"),
    ({"limit": {"a": 1}}, "limit: expected a value for --limit"),
    ({"no_warmup": "yes"}, "no_warmup: expected true or false, got 'yes'"),
    ({"method_state": "warm"}, "argument --method-state: invalid choice: 'warm'"),
    ({"temperature": [0, 0.0]}, "the grid holds one job twice (temperature=0.0)"),
    ({"methods": []}, "methods: an empty list leaves the grid empty"),
])
def test_a_bad_file_is_refused_with_what_is_wrong(spec, says):
    with pytest.raises(sweep.SweepError) as err:
        sweep.check(sweep.expand(spec), __import__("pathlib").Path("unused"))
    assert says in str(err.value)


@pytest.mark.parametrize("text, says", [
    ("", "is empty"),
    ("- a\n- b\n", "expected a mapping of run settings"),
    ("temperature: [0, 1\n", "is not valid YAML"),
])
def test_a_file_that_is_not_a_sweep_is_refused(tmp_path, text, says):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(sweep.SweepError, match=says.replace("[", r"\[")):
        sweep.load(path)


def test_run_checks_every_job_and_names_the_jobs_each_problem_hits(tmp_path):
    jobs = sweep.expand({"methods": [["ar", "nope"], ["ar", "pld"]], "limit": [0, 1]})
    with pytest.raises(sweep.SweepError) as err:
        sweep.check(jobs, tmp_path)
    text = str(err.value)
    assert "unknown method 'nope'" in text and "(methods=ar,nope limit=1)" in text and "every job" not in text
    assert "--limit must be at least 1; got 0 (methods=ar,nope limit=0; methods=ar,pld limit=0)" in text
    jobs = sweep.expand({"methods": ["ar", "pld"], "set": {"pld.max_ngram_size": [3, "x"]}})
    with pytest.raises(sweep.SweepError, match=r"pld.max_ngram_size must be int; got 'x' \(set=pld.max_ngram_size=x\)"):
        sweep.check(jobs, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_model_path_that_is_not_a_model_is_refused_before_the_sweep_starts(tmp_path):
    (tmp_path / "empty").mkdir()
    jobs = sweep.expand({"target": [str(tmp_path / "empty"), str(tmp_path / "gone")], "methods": "ar"})
    with pytest.raises(sweep.SweepError) as err:
        sweep.check(jobs, tmp_path / "sweep")
    assert "is a folder without config.json" in str(err.value) and "does not exist" in str(err.value)


def test_cli_refuses_a_bad_file_before_any_folder_is_made(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text("methods: [ar, pld]\ntemperature: [0, -1]\n")
    out = tmp_path / "sweep"
    assert cli.main(["sweep", str(path), "--out", str(out)]) == cli.EXIT_USAGE
    said = capsys.readouterr().out
    assert "error:" in said and "--temperature must be >= 0" in said and "temperature=-1.0" in said
    assert not out.exists()


def test_cli_dry_run_lists_the_jobs_and_runs_nothing(tmp_path, capsys):
    path = tmp_path / "grid.yaml"
    path.write_text(json.dumps(ISSUE_EXAMPLE))  # JSON is YAML
    out = tmp_path / "sweep"
    assert cli.main(["sweep", str(path), "--out", str(out), "--dry-run"]) == cli.EXIT_OK
    said = capsys.readouterr().out
    assert "4 jobs" in said and "varying temperature, budget" in said
    assert all(job_id in said for job_id in ids(ISSUE_EXAMPLE))
    assert not out.exists()


def test_state_file_resumes_a_killed_drivers_running_job_and_keeps_the_rest(tmp_path):
    jobs = sweep.expand({"temperature": [0.0, 1.0, 0.5]})
    state = SweepState(tmp_path, jobs)
    state.set(jobs[0].id, status="done", attempts=1)
    state.set(jobs[1].id, status="running")
    state.set(jobs[2].id, status="failed", attempts=2, error="exit 2: error: boom")
    again = SweepState(tmp_path, jobs)
    assert [again.rows[j.id]["status"] for j in jobs] == ["done", "pending", "failed"]
    assert again.rows[jobs[2].id]["error"] == "exit 2: error: boom"
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.jsonl"]  # no temporary file left behind


def test_a_failed_jobs_error_is_runs_own_line():
    output = "loading target x\nsps q-1 turn 0: RuntimeError: boom\n1 of 4 records failed (see the report's ...)\n"
    assert _failure(3, output) == "exit 3: 1 of 4 records failed (see the report's ...)"
    assert _failure(-9, "loading target x\n") == "killed by signal 9: loading target x"
