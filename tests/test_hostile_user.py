"""Issue 12, as a hostile but fair user would try it: every case gives a clear error with the documented
exit code (README, "Exit codes"), before any model loads where it can, and loses nothing.

Exit codes: 0 done; 1 every record failed (reproduce: outputs or counts differ); 2 usage or input error
(nothing was run); 3 some records failed; 130 interrupted (143 on SIGTERM)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import cli
from harness import models as model_specs
from harness.results import read_records

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = [
    {"question_id": f"q-{i}", "category": "qa", "turns": [text], "reference": ["yes"]}
    for i, text in enumerate(["the cat reads", "one plus two equals", "red blue green house",
                              "the robot paints a river", "hello world and the dog"])
]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path


@pytest.fixture
def base(model_dirs, data_file):
    """A small run's arguments (tiny target/draft folders, our questions, no warm-up)."""
    return ["run", "--target", model_dirs[0], "--draft", model_dirs[1], "--data", str(data_file),
            "--max-new-tokens", "6", "--no-warmup", "--limit", "2"]


@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to load a model fails the test: the error must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(model_specs, "load", refuse)


def run_cli(argv, capsys) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "report" not in p.parts}


def keys(folder: Path) -> list[tuple]:
    return [(r["method"], r["item_id"], r["turn"], r["repeat"], r["budget"])
            for r in read_records(folder / "results.jsonl")]


# ------------------------------------------------------------------ 1. a finished folder and changed settings

@pytest.mark.parametrize("change, named", [
    (["--max-new-tokens", "4"], "max_new_tokens: 6 -> 4"),
    (["--temperature", "0.5"], "temperature: 0.0 -> 0.5"),
    (["--set", "sps.gamma=2"], "sps.gamma: 5 -> 2"),
    (["--target", "TARGET2"], "target"),
])
def test_finished_folder_refuses_changed_settings_before_loading(base, tmp_path, capsys, monkeypatch, change,
                                                                   named, model_dirs):
    out = tmp_path / "run"
    assert run_cli([*base, "--methods", "ar,sps", "--out", out], capsys)[0] == 0
    before = snapshot(out)
    change = [model_dirs[1] if c == "TARGET2" else c for c in change]
    monkeypatch.setattr(model_specs, "load", lambda *a, **k: pytest.fail("loaded a model"))
    code, text = run_cli([*base, "--methods", "ar,sps", "--out", out, *change], capsys)
    assert code == 2 and named in text and "--force-new" in text and "nothing to do" not in text
    assert snapshot(out) == before


def test_force_new_keeps_the_old_run_aside(base, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli([*base, "--methods", "ar", "--out", out], capsys)[0] == 0
    old = snapshot(out)
    code, text = run_cli([*base, "--methods", "ar", "--out", out, "--max-new-tokens", "3", "--force-new"], capsys)
    assert code == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and snapshot(aside[0]) == old and str(aside[0]) in text
    assert {r["new_tokens"] <= 3 for r in read_records(out / "results.jsonl")} == {True}


def test_a_new_method_in_a_finished_folder_is_added(base, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli([*base, "--methods", "ar", "--out", out], capsys)[0] == 0
    assert run_cli([*base, "--methods", "ar,pld", "--out", out, "--set", "pld.num_pred_tokens=3"], capsys)[0] == 0
    assert sorted({k[0] for k in keys(out)}) == ["ar", "pld"]


# ------------------------------------------------------------------ 3. two writers on one folder

def test_second_writer_is_refused_with_the_holders_pid(base, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    code = ("import sys, time; from harness.runfolder import RunFolder; "
            "RunFolder(sys.argv[1]).lock(); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setattr(model_specs, "load", lambda *a, **k: pytest.fail("loaded a model"))
        code, text = run_cli([*base, "--methods", "ar", "--out", out], capsys)
        monkeypatch.undo()
        assert code == 2 and f"process {holder.pid}" in text
    finally:
        holder.kill()
        holder.wait()
    # the lock died with its holder (kill -9): the folder is writable again
    assert run_cli([*base, "--methods", "ar", "--out", out], capsys)[0] == 0


def test_two_concurrent_runs_one_is_refused(base, tmp_path):
    out = tmp_path / "run"
    # the second starts while the first holds the folder: the first is paused (SIGSTOP) after its first record,
    # so it keeps the lock however slowly the second starts (two started together race on a loaded machine)
    argv = [sys.executable, "-m", "harness.cli", *base, "--methods", "ar,pld", "--limit", "5", "--out", str(out)]
    first = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_records(out, 1, first)
    first.send_signal(signal.SIGSTOP)
    try:
        second = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        second_result = (second.wait(timeout=300), second.stdout.read())
    finally:
        first.send_signal(signal.SIGCONT)
    results = [(first.wait(timeout=300), first.stdout.read()), second_result]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(text for code, text in results if code == 2)
    assert "is being written by process" in refused
    found = keys(out)
    assert len(found) == len(set(found)) == 2 * 5


def test_report_warns_on_duplicate_records_instead_of_inventing_repeats(base, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli([*base, "--methods", "ar", "--out", out], capsys)[0] == 0
    results = out / "results.jsonl"
    results.write_text(results.read_text() * 2)  # what two writers did before the lock
    code, text = run_cli(["report", out], capsys)
    assert code == 0 and "duplicate" in text
    report = (out / "report" / "report.md").read_text()
    assert "duplicate" in report and "spread over repeats" not in report.lower()


# ------------------------------------------------------------------ 4. reproduce

def test_reproduce_refuses_nothing_and_itself(base, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli([*base, "--methods", "ar", "--out", out], capsys)[0] == 0
    code, text = run_cli(["reproduce", out, "--out", out], capsys)
    assert code == 2 and "itself" in text
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text((out / "manifest.json").read_text())
    code, text = run_cli(["reproduce", empty, "--out", tmp_path / "again"], capsys)
    assert code == 2 and "no results" in text


def test_reproduce_into_another_runs_folder_is_an_error(base, tmp_path, capsys):
    first, other = tmp_path / "first", tmp_path / "other"
    assert run_cli([*base, "--methods", "ar", "--out", first], capsys)[0] == 0
    assert run_cli([*base, "--methods", "ar", "--out", other, "--max-new-tokens", "3"], capsys)[0] == 0
    code, text = run_cli(["reproduce", first, "--out", other], capsys)
    assert code == 2 and "max_new_tokens" in text and "Traceback" not in text


def test_reproduce_from_another_directory_with_a_relative_data_path(model_dirs, data_file, tmp_path, monkeypatch,
                                                                     capsys):
    monkeypatch.chdir(data_file.parent)
    first = tmp_path / "first"
    argv = ["run", "--target", model_dirs[0], "--data", data_file.name, "--methods", "ar", "--limit", "1",
            "--max-new-tokens", "4", "--no-warmup", "--out", first]
    assert run_cli(argv, capsys)[0] == 0
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["data"]["path"] == str(data_file) and len(manifest["data"]["sha256"]) == 64
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, text = run_cli(["reproduce", first, "--out", tmp_path / "again"], capsys)
    assert code == 0 and "reproduced" in text
    data_file.write_text(data_file.read_text().replace("the cat reads", "the dog reads"))
    code, text = run_cli(["reproduce", first, "--out", tmp_path / "again2"], capsys)
    assert code == 2 and "data" in text and "changed" in text


def test_reproduce_exit_code_says_different(base, tmp_path, capsys):
    first = tmp_path / "first"
    assert run_cli([*base, "--methods", "ar", "--out", first], capsys)[0] == 0
    records = read_records(first / "results.jsonl")
    records[0]["output_ids"][0] += 1
    (first / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    code, text = run_cli(["reproduce", first, "--out", tmp_path / "again"], capsys)
    assert code == 1 and "NOT reproduced" in text


# ------------------------------------------------------------------ 5-7. bad input: exit 2 before any model loads

@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--budget", "target_calls=0"], "--budget target_calls must be positive"),
    (["--budget", "target_calls=abc"], "--budget target_calls: 'abc' is not"),
    (["--budget", "wall_s=-1"], "--budget wall_s must be positive"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--temperature", "nan"], "--temperature must be >= 0"),
    (["--top-p", "2"], "--top-p must be in (0, 1]"),
    (["--top-p", "0", "--temperature", "1"], "--top-p must be in (0, 1]"),
    (["--top-k", "-3"], "--top-k must be >= 0"),
    (["--limit", "0"], "--limit must be at least 1"),
    (["--limit", "-1"], "--limit must be at least 1"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--set", "sps.gamma=-1", "--methods", "ar,sps"], "sps.gamma must be in [1, inf]"),
    (["--set", "spss.gamma=2", "--methods", "ar,sps"], "--set names spss"),
    (["--methods", "ar,nope"], "unknown method 'nope'"),
    (["--methods", ""], "--methods names no method"),
    (["--suite", "nope"], "unknown suite"),
    (["--dtype", "int3"], "unknown dtype 'int3'"),
    (["--device", "cuda"] if not __import__("torch").cuda.is_available() else ["--device", "cuda:99"],
     "--device cuda"),
    (["--device", "tpu"], "--device must be"),
])
def test_bad_arguments_are_errors_before_loading(base, tmp_path, capsys, no_loading, args, message):
    out = tmp_path / "run"
    code, text = run_cli([*base, "--methods", "ar", *args, "--out", out], capsys)
    assert code == 2 and message in text, text
    assert "Traceback" not in text and not (out / "results.jsonl").exists()


def test_bad_data_files_are_named(base, tmp_path, capsys, no_loading):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    folder = tmp_path / "a_folder"
    folder.mkdir()
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question_id": "a", "category": "qa", "turns": ["x"]}\n{"question_id": \n')
    for data, message in ((binary, f"{binary}: not a UTF-8 text file"), (folder, f"{folder} is a folder"),
                          (tmp_path / "absent.jsonl", "no such file"), (broken, f"{broken}:2")):
        code, text = run_cli([*base[:5], "--data", data, *base[7:], "--methods", "ar", "--out", tmp_path / "x"],
                             capsys)
        assert code == 2 and message in text, text


def test_every_record_failing_exits_1_and_some_failing_exits_3(base, tmp_path, capsys, monkeypatch):
    import methods.base as method_base
    from methods.base import Method

    @method_base.register("always_fails_test")
    class AlwaysFails(Method):
        lossless = False

        def generate(self, ctx):
            raise RuntimeError("simulated failure")

    try:
        code, text = run_cli([*base, "--methods", "always_fails_test", "--out", tmp_path / "all"], capsys)
        assert code == 1 and "every record failed (2 of 2)" in text and "simulated failure" in text
        code, text = run_cli([*base, "--methods", "ar,always_fails_test", "--out", tmp_path / "some"], capsys)
        assert code == 3 and "2 of 4 records failed" in text
    finally:
        method_base._REGISTRY.pop("always_fails_test")


# ------------------------------------------------------------------ 8. custom model code never runs unasked

def test_model_with_custom_code_needs_trust_remote_code(base, tmp_path, capsys, model_dirs):
    import shutil

    folder = tmp_path / "custom"
    shutil.copytree(model_dirs[0], folder)
    marker = tmp_path / "custom-code-ran"
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "evil_llama"  # no class in transformers: only the folder's own code could load it
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (folder / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--target", str(folder), "--data",
                           base[6], "--methods", "ar", "--limit", "1", "--no-warmup", "--out",
                           str(tmp_path / "run")], cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=300, check=False, env={**os.environ, "DECODEBENCH_CACHE": str(tmp_path / "c")})
    assert proc.returncode == 2 and "--trust-remote-code" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert not marker.exists()


# ------------------------------------------------------------------ 9. Ctrl-C, and kill -9 at random points

def _start(argv, out, env=None):
    # SIGINT back to its default in the child: a test run started in the background (`pytest &`, CI scripts)
    # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler
    return subprocess.Popen([sys.executable, "-m", "harness.cli", *argv, "--out", str(out)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "200", **(env or {})},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_records(out: Path, n: int, proc, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (out / "results.jsonl").is_file() and len((out / "results.jsonl").read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {n} records in time: {proc.poll()}")


def test_ctrl_c_says_how_to_resume_and_loses_nothing(base, tmp_path):
    out = tmp_path / "run"
    # 30 records of 96 tokens: seconds of work left after the second, so the signal cannot come after the end
    argv = [*base, "--methods", "ar,pld", "--limit", "5", "--max-new-tokens", "96", "--repeats", "3"]
    proc = _start(argv, out)
    _wait_for_records(out, 2, proc)
    proc.send_signal(signal.SIGINT)
    text = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, text
    assert "Traceback" not in text and "run the same command to resume" in text
    done = keys(out)
    assert f"interrupted after {len(done)} records" in text
    resumed = _start(argv, out)
    assert resumed.wait(timeout=300) == 0
    after = keys(out)
    assert len(after) == len(set(after)) == 2 * 5 * 3 and set(done) <= set(after)


def _orphans(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith((".tmp", ".partial")) or ".tmp." in p.name]


def test_kill_9_at_random_points_then_resume(base, tmp_path):
    out = tmp_path / "run"
    argv = [*base, "--methods", "ar,sps,pld", "--limit", "5", "--max-new-tokens", "16", "--repeats", "2"]
    rng = random.Random(12)
    expected = 3 * 5 * 2
    for _ in range(4):
        proc = _start(argv, out)
        time.sleep(rng.uniform(1.0, 8.0))  # sometimes during start-up and loading, sometimes mid-run
        proc.kill()
        proc.wait()
        found = keys(out)
        assert len(found) == len(set(found)) <= expected
    final = _start(argv, out)
    text = final.communicate(timeout=600)[0]
    assert final.returncode == 0, text
    found = keys(out)
    assert len(found) == len(set(found)) == expected
    assert not _orphans(out), _orphans(out)


def test_an_interrupt_during_a_record_write_waits_for_the_write_and_its_count():
    import os
    import signal

    from harness.runner import interrupts_deferred

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    done = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with interrupts_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                done.append("written")  # still runs: the interrupt waits for the block's end
                done.append("counted")
        assert done == ["written", "counted"]
    finally:
        signal.signal(signal.SIGINT, previous)
