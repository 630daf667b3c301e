"""Sweeps that run: the driver killed by SIGKILL mid-sweep and run again (tiny models, local executor), a job
that keeps failing, and the ray executor giving the local executor's records (smollm2-135m, integration)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness import cli, sweep
from harness import models as model_specs
from harness.console import make_console
from harness.results import read_records, record_key
from harness.sweeprun import Sweep, read_state

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = ["the cat reads", "one plus two equals", "red blue green house", "the robot paints a river"]


def questions(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"question_id": f"q-{i}", "category": "qa", "turns": [t], "reference": ["x"]})
                            + "\n" for i, t in enumerate(texts)))
    return path


def sweep_argv(spec: dict, folder: Path, *extra: str) -> list[str]:
    path = folder.parent / f"{folder.name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return ["sweep", str(path), "--out", str(folder), *extra]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def job_keys(folder: Path, job: str) -> list[tuple]:
    return [record_key(r) for r in read_records(folder / "jobs" / job / "results.jsonl")]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def test_sigkill_of_the_driver_mid_sweep_then_rerun_loses_and_duplicates_nothing(model_dirs, tmp_path, capsys):
    spec = {"target": model_dirs[0], "draft": model_dirs[1], "data": str(questions(tmp_path / "q.jsonl", QUESTIONS)),
            "methods": ["ar", "pld"], "max_new_tokens": 12, "no_warmup": True, "temperature": [0.0, 1.0]}
    out = tmp_path / "sweep"
    argv = sweep_argv(spec, out)
    first, second = (job.id for job in sweep.expand(spec))
    driver = subprocess.Popen([sys.executable, "-m", "harness.cli", *argv], cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    writer = out / "jobs" / second / ".writer"
    while time.monotonic() < deadline:  # the first job done, the second one's process writing its folder
        state = {row["job"]: row["status"] for row in read_state(out / "sweep.jsonl")} if out.exists() else {}
        if state.get(first) == "done" and state.get(second) == "running" and writer.exists():
            try:
                pid = json.loads(writer.read_text())["pid"]
                break
            except (ValueError, OSError):  # being written
                pass
        assert driver.poll() is None, driver.stdout.read().decode()
        time.sleep(0.05)
    else:
        pytest.fail("the sweep never reached its second job")
    finished = (out / "jobs" / first / "results.jsonl").read_bytes()
    driver.kill()  # SIGKILL: no handler runs
    driver.wait()
    for _ in range(100):  # the job's process dies with the driver (PR_SET_PDEATHSIG)
        if not alive(pid):
            break
        time.sleep(0.1)
    assert not alive(pid), "the killed sweep's job is still running"

    assert cli.main(argv) == cli.EXIT_OK  # the same command, run again (here, in this process)
    assert "resuming: 1 of 2 jobs already done" in capsys.readouterr().out
    rows = {row["job"]: row for row in read_state(out / "sweep.jsonl")}
    assert [rows[j]["status"] for j in (first, second)] == ["done", "done"]
    assert rows[first]["attempts"] == 1  # skipped, not run again
    assert (out / "jobs" / first / "results.jsonl").read_bytes() == finished
    expected = {(m, "specbench", f"q-{i}", 0, 0, "") for m in ("ar", "pld") for i in range(len(QUESTIONS))}
    for job in (first, second):
        keys = job_keys(out, job)
        assert len(keys) == len(set(keys)) and set(keys) == expected, job
        assert not any(r.get("error") for r in read_records(out / "jobs" / job / "results.jsonl"))
    report = (out / "report" / "report.md").read_text()
    assert report.count("| done |") == 4 and "| temperature | job | method |" in report


def test_a_failing_job_is_retried_then_recorded_failed_and_the_others_run(model_dirs, tmp_path, capsys):
    # a hub id, which this offline test cannot fetch: the job fails when it loads, after the file was checked
    spec = {"target": [model_dirs[0], "no-such-org/no-such-model"],
            "data": str(questions(tmp_path / "q.jsonl", QUESTIONS[:1])), "methods": "ar", "max_new_tokens": 4,
            "no_warmup": True}
    out = tmp_path / "sweep"
    assert cli.main(sweep_argv(spec, out, "--retries", "1")) == cli.EXIT_PARTIAL  # some jobs failed
    said = capsys.readouterr().out
    good, bad = (job.id for job in sweep.expand(spec))
    rows = {row["job"]: row for row in read_state(out / "sweep.jsonl")}
    assert rows[good]["status"] == "done" and rows[good]["attempts"] == 1
    assert rows[bad]["status"] == "failed" and rows[bad]["attempts"] == 2
    assert rows[bad]["error"].startswith("exit 2: error: cannot load 'no-such-org/no-such-model'")
    assert (out / "logs" / f"{bad}.log").read_text().count("--- ") == 2  # both attempts logged
    assert "failed, trying again" in said and "FAILED" in said
    assert cli.main(["report", str(out)]) == cli.EXIT_OK  # the sweep's report, built again from the folder
    report = (out / "report" / "report.md").read_text()
    assert "| target | job | method |" in report and "| failed | 2 |" in report and "| done | 1 | 1 | 0 |" in report


@pytest.mark.integration
def test_ray_executor_gives_the_records_of_the_local_executor(tmp_path):
    pytest.importorskip("ray")
    if not model_specs.installed(model_specs.EMBEDDED["smollm2-135m"]):
        pytest.skip("smollm2-135m is not installed (decodebench models install smollm2-135m)")
    import ray

    spec = {"target": "smollm2-135m", "data": str(questions(tmp_path / "q.jsonl", ["Name three colours."])),
            "methods": ["ar", "pld", "token_recycling"], "max_new_tokens": 8, "no_warmup": True,
            "temperature": [0.0, 1.0]}
    jobs = sweep.expand(spec)
    sweep.check(jobs, tmp_path)
    console = make_console(quiet=True)
    assert Sweep(jobs, tmp_path / "local", console).run("local")["done"] == 2
    # one worker of one CPU: both jobs on one actor, which loads the model once
    assert Sweep(jobs, tmp_path / "ray", console).run("ray", ray_cpus=1, num_cpus=1)["done"] == 2
    assert not ray.is_initialized()  # the Ray it started is shut down
    logs = "".join((tmp_path / "ray" / "logs" / f"{job.id}.log").read_text() for job in jobs)
    assert logs.count("loading smollm2-135m (once for this worker)") == 1
    for job in jobs:
        local, remote = ({record_key(r): r for r in read_records(tmp_path / kind / "jobs" / job.id / "results.jsonl")}
                         for kind in ("local", "ray"))
        assert local.keys() == remote.keys() and len(local) == 3
        assert not any(r["error"] for r in [*local.values(), *remote.values()])
        if job.settings["temperature"] == 0.0:
            assert all(local[k]["output_ids"] == remote[k]["output_ids"] for k in local)
