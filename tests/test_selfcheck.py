"""decodebench selfcheck on the CPU: the quick variant passes or skips every check with a reason and writes a
profile that `report --profile` reads; the checks' verdicts on hand-made records; and the command where only
torch, transformers and numpy can be imported (import blockers in a subprocess, as on the GPU machines)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import archs, costmodel
from harness.selfcheck import check_lossless, check_timing, plan, selfcheck
from methods.base import registry

ROOT = Path(__file__).resolve().parent.parent
CHECKS = ["timing", "nvml", "lossless", "peers", "host_overhead", "profile", "report"]
# pyproject's dependencies and extras beyond torch, transformers (with what it needs itself) and numpy
BLOCKED = ["rich", "jinja2", "pandas", "matplotlib", "psutil", "platformdirs", "pynvml", "accelerate", "gguf",
           "sentencepiece", "rouge_score", "sacrebleu", "bayes_opt", "scipy", "lm_eval", "pyarrow", "ray", "torchao"]
# a meta-path wrapper: a blocked top-level module is not found, by `import` nor by importlib.util.find_spec
BLOCKER = '''
import os, sys
_BLOCKED = set(os.environ["DECODEBENCH_BLOCKED"].split(","))
class _Hide:
    def __init__(self, finder): self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _BLOCKED:
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None
    def __getattr__(self, name): return getattr(self.finder, name)
sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
'''


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("selfcheck")
    result = selfcheck(device="cpu", out=out, quick=True)
    return out, result, {c["name"]: c for c in result["checks"]}


def test_quick_selfcheck_passes_or_skips_every_check_with_a_reason(quick):
    out, result, by_name = quick
    assert list(by_name) == CHECKS
    for check in result["checks"]:
        assert check["status"] in ("pass", "skip"), (check["name"], check["reason"])
        assert check["reason"]
    assert by_name["nvml"]["status"] == "skip" and by_name["nvml"]["reason"].startswith("no CUDA device")
    assert result["summary"] == {"pass": 6, "fail": 0, "skip": 1}
    assert json.loads((out / "selfcheck.json").read_text())["summary"] == result["summary"]
    summary = (out / "selfcheck.md").read_text()
    assert all(f"| {name} | {by_name[name]['status']} |" in summary for name in CHECKS)


def test_every_lossless_method_is_run_and_equals_ar(quick):
    _, _, by_name = quick
    compared = by_name["lossless"]["figures"]["methods"]
    assert set(compared) == {n for n, c in registry().items() if c.lossless and not c.needs.trained} - {"ar"}
    for name, row in compared.items():
        assert (row["equal"], row["mismatches"], row["errors"]) == (1, [], []), name
    # the shaped pair: the draft agrees often, not always (sps proposes 5 tokens a step, so 6 is every one taken)
    assert 1.5 < compared["sps"]["mean_accepted"] < 6
    assert by_name["lossless"]["figures"]["tie_epsilon"] == 1e-5  # fp32


def test_timing_and_host_overhead_figures(quick):
    out, _, by_name = quick
    timing = by_name["timing"]["figures"]
    assert timing["timer"] == "perf_counter"
    assert plan("cpu", True).min_ratio <= timing["passes_over_wall"] <= 1.02
    assert 0 < timing["prefill_s"] < timing["wall_s"]
    hosts = by_name["host_overhead"]["figures"]["methods"]
    assert set(hosts) == set(by_name["lossless"]["figures"]["methods"]) | {"ar"}
    assert all(h["host_ms_per_target_pass"] >= 0 and 0 < h["forward_share_of_wall"] <= 1.02 for h in hosts.values())
    records = [json.loads(line) for line in (out / "run" / "results.jsonl").read_text().splitlines()]
    assert {r["method"] for r in records} == set(hosts)  # one ordinary run holds every figure
    manifest = json.loads((out / "run" / "manifest.json").read_text())
    assert manifest["target"]["kind"] == "architecture" and manifest["target"]["dtype"] == "float32"


def test_profile_is_one_report_reads(quick, capsys):
    out, _, by_name = quick
    path = out / "profile-cpu.json"
    assert by_name["profile"]["figures"]["file"] == str(path)
    profile = costmodel.load_profile(path)
    quick_plan = plan("cpu", True)
    assert set(profile["tables"]) == {"target", "draft"}
    assert profile["tables"]["target"].widths == list(quick_plan.widths)
    assert profile["tables"]["target"].contexts == list(quick_plan.contexts)
    assert "Predicted on" in (out / "run" / "report" / "report.md").read_text()
    # --compare's table: against a copy with every cell twice as slow, each ratio is 0.5
    slower = json.loads(path.read_text())
    for table in slower["tables"].values():
        table["seconds"] = [[2 * s for s in row] for row in table["seconds"]]
    (out / "slower.json").write_text(json.dumps(slower))
    from harness.cli import _print_comparison

    _print_comparison(profile, str(out / "slower.json"))
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines() if line.startswith(("target", "draft"))]
    assert len(rows) == 2 * len(quick_plan.widths) * len(quick_plan.contexts)
    assert {row[-1] for row in rows} == {"0.50"}


def test_profile_compare_of_an_unreadable_file_is_refused_before_measuring(tmp_path):
    from harness.cli import main

    assert main(["profile", "--arch", "smollm2-135m", "--compare", str(tmp_path / "none.json"),
                 "--out", str(tmp_path / "p.json")]) == 2
    assert not (tmp_path / "p.json").exists()


def test_compare_divides_cell_by_cell_where_both_measured():
    a = {"tables": {"target": costmodel.LatencyTable([1, 4], [128], [[0.02, 0.03]])}}
    b = {"tables": {"target": costmodel.LatencyTable([1, 2, 4], [128, 512], [[0.01, 0.02, 0.06], [1, 1, 1]]),
                    "draft": costmodel.LatencyTable([1], [128], [[0.5]])}}
    rows = costmodel.compare(a, b)
    assert [(r["role"], r["context"], r["width"], r["ratio"]) for r in rows] == [
        ("target", 128, 1, pytest.approx(2.0)), ("target", 128, 4, pytest.approx(0.5))]


def _record(method: str, **fields) -> dict:
    base = {"method": method, "item_id": "q", "error": None, "lossless_check": None, "mean_accepted": 1.0,
            "wall_s": 1.0, "target_pass_s": [0.3, 0.3, 0.35], "prefill_s": 0.31, "decode_s": 0.69, "new_tokens": 3}
    return {**base, **fields}


def test_lossless_check_fails_a_mismatch_and_passes_a_numerical_tie():
    equal = {"reference": "ar", "equal": True}
    tie = {"reference": "ar", "equal": False, "position": 7, "margin": 1e-6, "relative_margin": 1e-7,
           "numerical_tie": True}
    mismatch = {**tie, "margin": 2.0, "relative_margin": 0.2, "numerical_tie": False}
    methods = ["ar", "sps", "pld"]
    ok = check_lossless([_record("ar"), _record("sps", lossless_check=tie), _record("pld", lossless_check=equal)],
                        methods, 0.0, 1e-5)
    assert ok.status == "pass" and "numerical ties in sps" in ok.reason
    bad = check_lossless([_record("ar"), _record("sps", lossless_check=equal), _record("pld", lossless_check=mismatch)],
                         methods, 0.0, 1e-5)
    assert bad.status == "fail" and bad.reason == "pld: mismatch at 7 (margin 0.2)"
    missing = check_lossless([_record("ar"), _record("sps", error="ModuleNotFoundError: No module named 'x'"),
                              _record("pld", lossless_check=equal)], methods, None, 1e-5)
    assert missing.status == "pass" and "missing package" in missing.reason
    broken = check_lossless([_record("ar"), _record("sps", error="RuntimeError: shapes"),
                             _record("pld", lossless_check=equal)], methods, None, 1e-5)
    assert broken.status == "fail" and broken.reason == "sps: RuntimeError: shapes"


def test_timing_check_fails_passes_longer_than_wall():
    assert check_timing([_record("ar")], "cpu").status == "pass"  # 0.95 of wall
    longer = check_timing([_record("ar", target_pass_s=[0.4, 0.4, 0.3])], "cpu")  # 1.1 of wall
    assert longer.status == "fail" and "1.100 of its wall time" in longer.reason
    slow_host = check_timing([_record("ar", target_pass_s=[0.3, 0.2, 0.2])], "cpu")  # 0.7 of wall
    assert slow_host.status == "fail"
    assert check_timing([_record("ar", target_pass_s=[0.3, 0.2, 0.2])], "cpu", min_ratio=0.6).status == "pass"


def test_byte_tokenizer_round_trips_text_and_names_other_ids():
    tok = archs.ByteTokenizer()
    ids = tok("héllo")["input_ids"]
    assert ids == list("héllo".encode()) and max(ids) < 256
    assert tok.decode(ids) == "héllo"
    assert tok.decode([104, 105, 300, 33]) == "hi<300>!"


def test_arch_overrides_cut_the_per_layer_types():
    config = archs.config("qwen2.5-coder-1.5b", num_hidden_layers=3, vocab_size=1000)
    assert (config.num_hidden_layers, len(config.layer_types), config.vocab_size) == (3, 3, 1000)


def test_plain_console_drops_style_tags_only(capsys):
    from harness.console import PlainConsole, PlainProgress

    PlainConsole().print("[red]error:[/] list [1, 2] at [x]")
    with PlainProgress() as bar:
        task = bar.add_task("run", total=2)
        bar.update(task, description="ar item 1")
        bar.advance(task)
        bar.update(task, description="sps item 1")
    assert capsys.readouterr().out.splitlines() == ["error: list [1, 2] at [x]", "run", "[1/2] ar item 1",
                                                    "[2/2] sps item 1"]


def test_cpu_peak_memory_is_unknown_without_psutil_or_a_peak_reset(monkeypatch):
    from harness import trackers

    monkeypatch.setattr(trackers, "_reset_peak_rss", lambda: False)
    monkeypatch.setattr(trackers, "_this_process", lambda: None)
    with trackers.PeakMemory("cpu") as memory:
        pass
    assert memory.peak_bytes is None  # never the process's lifetime peak, which was not reset


def test_selfcheck_runs_where_only_torch_transformers_and_numpy_import(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{ROOT}", "DECODEBENCH_BLOCKED": ",".join(BLOCKED),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    probe = subprocess.run([sys.executable, "-c", "import rich"], env=env, capture_output=True, text=True)
    assert "No module named 'rich'" in probe.stderr  # the blocker works
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "harness.cli", "selfcheck", "--device", "cpu", "--quick",
                           "--methods", "ar,sps,hf_generate,hf_assisted", "--out", str(out)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "selfcheck.json").read_text())
    by_name = {c["name"]: c for c in result["checks"]}
    assert [by_name[n]["status"] for n in CHECKS] == ["pass", "skip", "pass", "pass", "pass", "pass", "skip"]
    assert by_name["report"]["reason"].startswith("the report needs a package missing here")
    assert all(result["packages"][name] is None for name in ("rich", "pandas", "matplotlib", "psutil", "jinja2"))
    assert "[/]" not in done.stdout and "pass timing:" in done.stdout  # the plain console, no markup left
