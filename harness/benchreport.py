"""`decodebench report --pytest-benchmark FILE.json`: the JSON pytest-benchmark saves, as a decodebench table.

Reads the decode-loop benchmarks (tests/benchmarks/test_decode_loop.py: `extra_info["decodebench"] ==
"decode_loop"`), one table per benchmark group (one model or pair each). Times are pytest-benchmark's own
statistics per round (a round generates the same prompts every time); tokens/s, #MAT and target calls are
the harness's counts it put in extra_info. Other benchmarks in the file are named, not tabled.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from scipy import stats

from harness.report import _table, load_templates

KIND = "decode_loop"
BASELINE = "ar"
NOTE = (
    "Median and mean are pytest-benchmark's statistics of one round's time (every prompt generated once, "
    "greedy; the ± is the standard deviation over rounds). Tokens/s, #MAT (new tokens per decoding step, "
    "the bonus token counted and the prefill pass included, pooled over the timed rounds) and target calls "
    "per round come from the harness's own pass counters. Speed-up over {baseline} is the ratio of mean time "
    "per generated token, {baseline}'s over the method's; the bracket is a 95% interval of that ratio from "
    "both benchmarks' means, standard deviations and rounds (delta method on the log ratio, Welch's t): "
    "with few rounds it is wide, as it should be."
)


class BenchmarkFileError(ValueError):
    """The file is not pytest-benchmark's JSON, or holds no decode-loop benchmark."""


def load(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BenchmarkFileError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BenchmarkFileError(f"{path} is not JSON ({err}); pass the file pytest-benchmark writes with "
                                 f"--benchmark-json or --benchmark-autosave") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise BenchmarkFileError(f"{path} is not a pytest-benchmark file: it has no 'benchmarks' list")
    return data


def decode_loops(data: dict, path: str | Path = "the file") -> tuple[dict[str, list[dict]], list[str]]:
    """The decode-loop benchmarks by group, in the file's order, and the names of the others."""
    groups: dict[str, list[dict]] = {}
    others = []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info") or {}
        if info.get("decodebench") == KIND and isinstance(bench.get("stats"), dict):
            groups.setdefault(bench.get("group") or "(no group)", []).append(bench)
        else:
            others.append(bench.get("fullname") or bench.get("name", "?"))
    if not groups:
        raise BenchmarkFileError(f"{path} holds no decode-loop benchmark (tests/benchmarks/test_decode_loop.py): "
                                 f"run `pytest --benchmark-only tests/benchmarks/test_decode_loop.py "
                                 f"--benchmark-json FILE`")
    return groups, others


def speedup(base: dict, other: dict, level: float = 0.95) -> tuple[float, float, float]:
    """`base`'s mean time per token over `other`'s, with its interval (nan when either has one round)."""
    def per_token(bench):
        s, tokens = bench["stats"], bench["extra_info"]["new_tokens_per_round"]
        return s["mean"] / tokens, s["stddev"], s["mean"], s["rounds"]

    (base_t, base_sd, base_mean, base_n), (t, sd, mean, n) = per_token(base), per_token(other)
    ratio = base_t / t
    if base_n < 2 or n < 2:
        return ratio, math.nan, math.nan
    # variance of each log mean time (delta method), then Welch-Satterthwaite degrees of freedom
    v_base, v = (base_sd / base_mean) ** 2 / base_n, (sd / mean) ** 2 / n
    if v_base + v == 0:
        return ratio, ratio, ratio
    dof = (v_base + v) ** 2 / (v_base ** 2 / (base_n - 1) + v ** 2 / (n - 1))
    half = stats.t.ppf(0.5 + level / 2, dof) * math.sqrt(v_base + v)
    return ratio, ratio * math.exp(-half), ratio * math.exp(half)


COLUMNS = ["Method", "Rounds", "Median (ms)", "Mean ± sd (ms)", "Tokens/round", "Tokens/s", "#MAT",
           "Target calls/round", "Speed-up over {baseline} (95% CI)"]


def group_table(benches: list[dict], baseline: str = BASELINE) -> dict:
    base = next((b for b in benches if b["extra_info"]["method"] == baseline), None)
    ordered = sorted(benches, key=lambda b: (b["extra_info"]["method"] != baseline, b["extra_info"]["method"]))
    rows = []
    for bench in ordered:
        s, info = bench["stats"], bench["extra_info"]
        if base is None:
            shown = f"— (no {baseline})"
        elif bench is base:
            shown = "1.00x (baseline)"
        else:
            ratio, low, high = speedup(base, bench)
            shown = f"{ratio:.2f}x" + ("" if math.isnan(low) else f" [{low:.2f}, {high:.2f}]")
        rows.append([info["method"], s["rounds"], f"{1000 * s['median']:.1f}",
                     f"{1000 * s['mean']:.1f} ± {1000 * s['stddev']:.1f}", f"{info['new_tokens_per_round']:g}",
                     f"{info['tokens_per_s']:.1f}", f"{info['mean_accepted']:.2f}",
                     f"{info['target_calls_per_round']:g}", shown])
    return _table([c.format(baseline=baseline) for c in COLUMNS], rows)


def _machine(data: dict) -> list[tuple[str, str]]:
    machine, commit = data.get("machine_info") or {}, data.get("commit_info") or {}
    cpu = (machine.get("cpu") or {}).get("brand_raw") or machine.get("processor") or "?"
    items = [("Saved", str(data.get("datetime", "?"))),
             ("pytest-benchmark", str(data.get("version", "?"))),
             ("Machine", f"{machine.get('node', '?')} ({machine.get('system', '?')} {machine.get('release', '')}, "
                         f"{cpu}, Python {machine.get('python_version', '?')})")]
    if commit.get("id"):
        items.append(("Commit", f"{commit['id'][:12]} on {commit.get('branch', '?')}"
                                + (" (uncommitted changes)" if commit.get("dirty") else "")))
    return items


def build(path: str | Path, out: str | Path | None = None, baseline: str = BASELINE) -> tuple[Path, list[dict]]:
    """Write OUT/report.md and OUT/report.html (OUT: FILE's folder/FILE-stem-report); return OUT and the
    tables (title, markdown ...) in order."""
    path = Path(path)
    markdown_template, html_template = load_templates("benchmark")
    data = load(path)
    groups, others = decode_loops(data, path)
    tables = [{"title": group, **group_table(benches, baseline)} for group, benches in groups.items()]
    folder = Path(out) if out else path.with_name(f"{path.stem}-report")
    folder.mkdir(parents=True, exist_ok=True)
    context = {"title": f"decodebench: pytest-benchmark decode loops ({path.name})", "source": str(path),
               "run_items": _machine(data), "tables": tables, "note": NOTE.format(baseline=baseline),
               "others": others}
    (folder / "report.md").write_text(markdown_template.render(context), encoding="utf-8")
    (folder / "report.html").write_text(html_template.render(context), encoding="utf-8")
    return folder, tables
