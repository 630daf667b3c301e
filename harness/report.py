"""Turn a finished (or killed) run folder into a Markdown + HTML report with plots.

Reads run_dir/results.jsonl and run_dir/manifest.json; writes run_dir/report/. The numbers come from
harness.tables, the pictures from harness.plots; this module formats them and fills the templates.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import jinja2
import pandas as pd

from harness import longtables, transformtables
from harness.plots import (
    draw_plots,
    plot_entry,
    plot_latency_by_length,
    plot_needle_heatmaps,
    plot_perplexity_by_position,
    plot_perturbation_sweep,
    plot_quality_vs_speed,
)
from harness.record import check_manifest
from harness.results import read_records, record_key
from harness.tables import (
    BOOTSTRAP_RESAMPLES,
    CI_HIGH,
    CI_LOW,
    HOST_MS,
    HOST_SHARE,
    MAT,
    OUTPUT_PPL,
    OVERALL,
    TOKENS_PER_S,
    budget_sweep,
    evaluation_table,
    host_overhead,
    main_budget,
    main_records,
    method_order,
    normalized,
    peer_table,
    quality_table,
    repeat_spread,
    speed_table,
    successful,
)

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "reports" / "templates"
KEY_PACKAGES = ["python", "torch", "transformers", "accelerate", "cuda", "numpy"]
MISSING_IN_SPEED_TABLE = "—"
MISSING_IN_COST_TABLE = "n/a"
DEFINITIONS = (
    "Speed-up is Spec-Bench's: a question's speed is its new tokens summed over its turns divided by its wall "
    "time summed over them; the method's mean speed over questions is divided by the baseline's ({baseline}) "
    "over the questions both completed (a category column: that category's questions). Tokens/s is the "
    "method's mean question speed. #MAT is the mean number of tokens accepted per target forward pass, pooled "
    "over every step of every record, the bonus token counted (as Spec-Bench counts it), the prefill pass "
    "included. With repeats, each repeat is one of Spec-Bench's repeated runs: the speed-up is the mean of the "
    "repeats' speed-ups, tokens/s the mean of theirs, #MAT pooled over all. Rows marked reference are "
    "transformers' own implementations, shown as peers. The bracket after the overall speed-up is a 95% "
    "bootstrap confidence interval over questions ({resamples} resamples)."
)
SPEC_BENCH_RELATION = (
    "These are the figures Spec-Bench's evaluation/speed.py prints, computed the same way: MT-bench's eight "
    "categories are grouped as mt_bench, turns are summed per question, speeds averaged over questions, #MAT "
    "pooled, and repeated runs averaged as its mean report does. Three details differ. Tokens are the token "
    "ids the method generated (EOS included when emitted), for the baseline too, where speed.py re-tokenises "
    "the baseline's answer text. Only questions with every turn completed by both the method and the baseline "
    "count, where speed.py averages whatever each answer file holds. Wall time is the method's generate call "
    "(synchronised on a GPU, tokenisation outside), as in Spec-Bench's inference scripts, but with the "
    "harness's hooks and memory/energy samplers running (their entry and exit are outside it)."
)
HOST_NOTE = (
    "Host time is a record's wall time minus the time of its timed forward passes (target, draft and "
    "self-draft), pooled over records per target pass: the Python, sampling, tree building and copies a "
    "method does between passes (model work no pass counted lands here too), which decide its speed-up on a "
    "GPU where a pass takes milliseconds."
)
LOSSLESS_DEFINITION = (
    "A lossless method must, under greedy decoding (temperature 0), emit exactly the tokens the reference "
    "method emits for the same item and turn. Position is the index of the first differing new token; "
    "margin is the target model's gap between its two best candidates there. A divergence the harness "
    "judged to sit on a near-exact tie is a numerical tie (floating-point noise can flip it); any other "
    "divergence is a MISMATCH."
)


def _load_manifest(manifest_path: Path) -> dict:
    if not manifest_path.exists():
        warnings.warn(f"{manifest_path} not found; the report will lack run details", stacklevel=3)
        return {}
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    check_manifest(manifest, str(manifest_path))
    return manifest


def load_templates(name: str = "report") -> tuple[jinja2.Template, jinja2.Template]:
    """NAME.md.j2 and NAME.html.j2 (report: one run's; runs: several runs side by side; benchmark: a
    pytest-benchmark file's table)."""
    if not TEMPLATE_DIR.is_dir():
        raise FileNotFoundError(
            f"report templates folder {TEMPLATE_DIR} is missing; it ships with the repository "
            "(reports/templates/), so run from a full checkout"
        )
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",)),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    try:
        return environment.get_template(f"{name}.md.j2"), environment.get_template(f"{name}.html.j2")
    except jinja2.TemplateNotFound as missing:
        raise FileNotFoundError(f"report template {missing.name} not found in {TEMPLATE_DIR}") from missing


def _peer_display(peers: pd.DataFrame) -> dict | None:
    if peers.empty:
        return None
    rows = [[r["ours"], r["transformers"], r["questions"], f"{r['ours tokens/s']:.2f}", f"{r['transformers tokens/s']:.2f}",
             _formatted(r["ratio"], "{:.2f}", MISSING_IN_SPEED_TABLE)
             + ("" if math.isnan(r["CI low"]) else f" [{r['CI low']:.2f}, {r['CI high']:.2f}]")]
            for _, r in peers.iterrows()]
    return _table(["Ours", "transformers", "Questions", "Ours tokens/s", "transformers tokens/s", "Ratio (95% CI)"], rows)


def _spread_display(spread: pd.DataFrame) -> dict | None:
    if spread.empty:
        return None
    rows = [[method, int(r["repeats"]), f"{100 * r['mean CV']:.1f}%", f"{100 * r['max CV']:.1f}%"]
            for method, r in spread.iterrows()]
    return _table(["Method", "Repeats", "Mean CV of tokens/s", "Worst CV"], rows)


def _formatted(value, pattern: str, missing: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return pattern.format(value)


def _speed_display(table: pd.DataFrame) -> pd.DataFrame:
    """speed_table's numbers as the strings the report shows (1.42x [1.21, 1.60])."""
    shown = pd.DataFrame(index=table.index)
    for column in table.columns:
        if column in (CI_LOW, CI_HIGH):
            continue
        pattern = {MAT: "{:.2f}", TOKENS_PER_S: "{:.1f}"}.get(column, "{:.2f}x")
        shown[column] = [_formatted(value, pattern, MISSING_IN_SPEED_TABLE) for value in table[column]]
    if CI_LOW in table:
        for method, low, high in zip(table.index, table[CI_LOW], table[CI_HIGH]):
            if not (math.isnan(low) or math.isnan(high)):
                shown.loc[method, OVERALL] += f" [{low:.2f}, {high:.2f}]"
    return shown


def _cost_table(ok: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """Hardware-independent cost per method, as display strings ("n/a" where nothing was measured)."""
    rows = {}
    for method in methods:
        records = ok[ok["method"] == method]
        with_energy = records[records["energy_j"].notna()]
        peak_bytes = records["peak_mem_bytes"].max()
        rows[method] = {
            "Target calls/record": records["target_calls"].mean(),
            "Target tokens/record": records["target_tokens"].mean(),
            "Draft calls/record": records["draft_calls"].mean(),
            "Tokens/target call": _ratio(records["new_tokens"].sum(), records["target_calls"].sum()),
            "Mean new tokens": records["new_tokens"].mean(),
            "Peak memory (MiB)": peak_bytes / 2**20,
            "Energy (J/token)": _ratio(with_energy["energy_j"].sum(), with_energy["new_tokens"].sum()),
            "Method state (MiB)": records["method_state_bytes"].max() / 2**20,  # measured by the harness
            "Output perplexity": records["output_perplexity"].mean(),  # lossy methods and the baseline
        }
    patterns = {"Tokens/target call": "{:.2f}", "Peak memory (MiB)": "{:.0f}", "Energy (J/token)": "{:.3g}",
                "Method state (MiB)": "{:.2f}", "Output perplexity": "{:.2f}"}
    table = pd.DataFrame.from_dict(rows, orient="index", dtype=float)
    table.index.name = "method"
    for column in table.columns:
        pattern = patterns.get(column, "{:.1f}")
        table[column] = [_formatted(value, pattern, MISSING_IN_COST_TABLE) for value in table[column]]
    return table


def _host_display(records: pd.DataFrame, methods: list[str]) -> dict | None:
    table = host_overhead(records, methods)
    if table.empty:
        return None
    rows = [[method, f"{r[HOST_MS]:.2f}", f"{100 * r[HOST_SHARE]:.1f}%"] for method, r in table.iterrows()]
    return {"note": HOST_NOTE, **_table(["Method", HOST_MS, HOST_SHARE], rows)}


ALTERNATIVES_SHOWN = 160  # characters of each output shown


def alternatives_table(ok: pd.DataFrame, methods: list[str]) -> dict | None:
    """The k outputs of multi-draft methods (e.g. Superposed Decoding) for each method's first record."""
    rows = []
    for method in methods:
        records = ok[(ok["method"] == method) & ok["alternatives_text"].map(lambda a: bool(a) if isinstance(a, list) else False)]
        if records.empty:
            continue
        first = records.iloc[0]
        for rank, text in enumerate(first["alternatives_text"], start=1):
            shown = text if len(text) <= ALTERNATIVES_SHOWN else text[:ALTERNATIVES_SHOWN] + "..."
            rows.append([method, f"{first['item_id']} turn {first['turn']}", rank, shown])
    return _table(["Method", "Item", "Draft", "Text (rank 1 is the output)"], rows) if rows else None


DRAFTING_NOTE = (
    "Draft tokens verified per target call is the number of drafted tokens (chain or tree nodes) fed "
    "to each target pass beside the pending token: the tree size, i.e. the verification width a tree "
    "method pays for. Accepted drafts per call excludes the bonus/correction token. Draft calls per "
    "token is all draft forward passes divided by all new tokens."
)


def drafting_table(ok: pd.DataFrame, methods: list[str]) -> dict | None:
    """Per method that drafts: tokens verified per target call (mean tree width), accepted drafts per
    call, the fraction of verified drafts accepted and draft calls per token; None if none drafts."""
    rows = []
    for method in methods:
        records = ok[ok["method"] == method]
        proposed = [n for lengths in records.get("proposed_lengths", pd.Series(dtype=object)).dropna() for n in lengths]
        accepted = [n for lengths in records.get("accept_lengths", pd.Series(dtype=object)).dropna() for n in lengths]
        if not proposed or not sum(proposed):
            continue
        drafts_kept = sum(accepted) - len(accepted)  # one bonus/correction token per target call
        rows.append([method, f"{sum(proposed) / len(proposed):.2f}", f"{drafts_kept / len(accepted):.2f}",
                     f"{drafts_kept / sum(proposed):.1%}",
                     f"{_ratio(records['draft_calls'].sum(), records['new_tokens'].sum()):.2f}"])
    if not rows:
        return None
    columns = ["Method", "Draft tokens verified/target call", "Accepted drafts/target call",
               "Verified drafts accepted", "Draft calls/token"]
    sampled = bool((ok["temperature"].fillna(0) > 0).any())
    return {**_table(columns, rows), "note": DRAFTING_NOTE, "sampled": sampled}


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def _method_label(method: str, methods_manifest: dict | None) -> str:
    if (methods_manifest or {}).get(method, {}).get("reference"):
        return f"{method} (reference: transformers)"
    return str(method)


def _markdown_cell(text) -> str:
    return str(text).replace("\n", " ").replace("|", "\\|")


def _table(columns: list[str], rows: list[list]) -> dict:
    """A table as both templates need it: cells for HTML, ready-made Markdown for the .md report."""
    rows = [[str(cell) for cell in row] for row in rows]
    lines = [
        "| " + " | ".join(map(_markdown_cell, columns)) + " |",
        "|" + " --- |" * len(columns),
        *("| " + " | ".join(map(_markdown_cell, row)) + " |" for row in rows),
    ]
    return {"columns": list(columns), "rows": rows, "markdown": "\n".join(lines)}


def _frame_table(shown: pd.DataFrame, methods_manifest: dict | None) -> dict:
    rows = [
        [_method_label(method, methods_manifest), *values]
        for method, values in zip(shown.index, shown.itertuples(index=False))
    ]
    return _table(["Method", *map(str, shown.columns)], rows)


def format_table_markdown(table: pd.DataFrame, methods: dict | None = None) -> str:
    """Markdown for a table indexed by method; speed_table's output gets its numbers formatted.

    methods: the manifest's "methods" dict, to label transformers' reference implementations.
    """
    if TOKENS_PER_S in table.columns and table.empty:
        return "(no generated text in this run, so no Spec-Bench table: see the report's own sections)"
    shown = _speed_display(table) if TOKENS_PER_S in table.columns else table
    return _frame_table(shown, methods)["markdown"]


def _lossless_section(ok: pd.DataFrame, manifest: dict, baseline: str) -> dict:
    methods_manifest = manifest.get("methods", {})
    default_temperature = manifest.get("sampling", {}).get("temperature")
    temperature = ok["temperature"].fillna(default_temperature if default_temperature is not None else math.nan)
    greedy = ok[temperature == 0]
    checks = []
    for method in method_order(greedy, baseline):
        if method == baseline or not methods_manifest.get(method, {}).get("lossless"):
            continue
        own = greedy[greedy["method"] == method]
        checked = own["lossless_check"].map(lambda check: isinstance(check, dict))
        results = list(own.loc[checked, "lossless_check"])
        divergent = own[own["lossless_check"].map(lambda check: isinstance(check, dict) and not check.get("equal"))]
        reference = next((check.get("reference") for check in results if check.get("reference")), baseline)
        identical = sum(bool(check.get("equal")) for check in results)
        if not results:
            summary = "no lossless checks recorded"
        elif identical == len(results):
            summary = f"all {len(results)} outputs identical to {reference}"
        else:
            ties = sum(bool(check.get("numerical_tie")) for check in divergent["lossless_check"])
            summary = (
                f"{identical}/{len(results)} outputs identical to {reference}; "
                f"{ties} numerical tie(s), {len(divergent) - ties} MISMATCH(es)"
            )
        rows = [
            [
                record.item_id,
                record.turn,
                _formatted(record.lossless_check.get("position"), "{}", MISSING_IN_COST_TABLE),
                _formatted(record.lossless_check.get("margin"), "{:.3g}", MISSING_IN_COST_TABLE),
                "numerical tie" if record.lossless_check.get("numerical_tie") else "MISMATCH",
            ]
            for record in divergent.itertuples()
        ]
        checks.append({
            "label": _method_label(method, methods_manifest),
            "summary": summary,
            "divergences": _table(["Item", "Turn", "Position", "Margin", "Verdict"], rows) if rows else None,
        })
    return {"definition": LOSSLESS_DEFINITION, "methods": checks}


def _errors_table(records: pd.DataFrame) -> dict | None:
    failed = records[records["error"].notna()]
    if failed.empty:
        return None
    rows = [[r.method, r.item_id, r.turn, str(r.error).strip()] for r in failed.itertuples()]
    return _table(["Method", "Item", "Turn", "Error"], rows)


def _warnings_table(records: pd.DataFrame) -> dict | None:
    """Records whose figures the harness could not fully vouch for: model work outside a counted pass,
    passes marked as self-drafting that skipped nothing, or a method state that is not what a straight
    run would have had (a resume that could not restore it)."""
    rows = []
    for r in records.itertuples():
        notes = []
        if (getattr(r, "uncounted_calls", 0) or 0) > 0:
            notes.append(f"uncounted model work: {r.uncounted_note}")
        if (getattr(r, "self_draft_unskipped", 0) or 0) > 0:
            notes.append(f"{int(r.self_draft_unskipped)} self-draft passes skipped no sublayer (priced as full)")
        if isinstance(getattr(r, "state_note", None), str):
            notes.append(f"method state: {r.state_note}")
        if notes:
            rows.append([r.method, r.item_id, r.turn, r.repeat, r.budget or "—", "; ".join(notes)])
    return _table(["Method", "Item", "Turn", "Repeat", "Budget", "Warning"], rows) if rows else None


def _methods_table(manifest: dict, records: pd.DataFrame) -> dict:
    methods_manifest = manifest.get("methods", {})
    names = list(dict.fromkeys([*methods_manifest, *records["method"].dropna()]))
    rows = []
    for name in names:
        info = methods_manifest.get(name, {})
        lossless = info.get("lossless")
        paper, arxiv, config = info.get("paper"), info.get("arxiv"), info.get("config")
        modifiers = [(kind, info.get(kind)) for kind in ("policy", "transform", "scorer")]
        shown = [(kind, part) for kind, part in modifiers if isinstance(part, dict)]
        if isinstance(info.get("scorer"), dict):
            lossless = None  # a scorer reads documents: nothing generated to be lossless about
        if shown:  # DECODER+MODIFIERS: theirs, under the decoder
            paper = "; ".join(f"{part.get('paper') or part.get('name')} ({kind}"
                              + (", simulated" if part.get("simulated") else "") + ")" for kind, part in shown)
            paper += f", under {info.get('decoder', '?')}"
            arxiv = next((part.get("arxiv") for _, part in shown if part.get("arxiv")), arxiv)
            config = {key: value for key, value in (("decoder", config), *((kind, part.get("config"))
                                                                           for kind, part in shown)) if value}
        rows.append([
            _method_label(name, methods_manifest),
            paper or "—",
            arxiv or "—",
            "—" if lossless is None else ("yes" if lossless else "no"),
            json.dumps(config, sort_keys=True) if config else "—",
        ])
    return _table(["Method", "Paper", "arXiv", "Lossless", "Config"], rows)


def _model_text(model) -> str:
    if not model:
        return "none"
    if isinstance(model, dict):
        sha = model.get("sha256")
        return f"{model.get('spec', '?')}" + (f" (sha256 {sha[:12]})" if sha else "")
    return str(model)


def _run_items(manifest: dict, generates: bool = True) -> list[tuple[str, str]]:
    """The run's facts; sampling and max new tokens only where text was generated (not a document read)."""
    sampling = manifest.get("sampling") or {}
    versions = manifest.get("versions") or {}
    shown_versions = {name: versions[name] for name in KEY_PACKAGES if name in versions} or versions
    options = ((manifest.get("settings") or {}).get("suite_options")) or {}
    items = [
        ("Suite", str(manifest.get("suite", "?"))),
        ("Suite options", ", ".join(f"{key}={value}" for key, value in options.items())),
        ("Target", _model_text(manifest.get("target"))),
        ("Draft", _model_text(manifest.get("draft"))),
        ("Device", str(manifest.get("device", "?"))),
        ("Sampling", ", ".join(f"{key}={value}" for key, value in sampling.items()) or "?"),
        ("Max new tokens", str(manifest.get("max_new_tokens", "?"))),
        ("Created", str(manifest.get("created", "?"))),
        ("Versions", ", ".join(f"{name} {version}" for name, version in shown_versions.items()) or "?"),
    ]
    return [(label, value) for label, value in items
            if (generates or label not in ("Draft", "Sampling", "Max new tokens"))
            and (value or label != "Suite options")]


def _sweep_display(sweep: pd.DataFrame) -> dict | None:
    if sweep.empty:
        return None
    rows = [[r["method"], f"{r['budget']:g} {r['kind']}", f"{r['new tokens']:.1f}", f"{r['target calls']:.1f}",
             f"{r['tokens per target call']:.2f}", f"{100 * r['stopped by budget']:.0f}%",
             _formatted(r["output perplexity"], "{:.2f}", MISSING_IN_COST_TABLE),
             _formatted(r["task score"], "{:.3f}", MISSING_IN_COST_TABLE)] for _, r in sweep.iterrows()]
    return _table(["Method", "Budget", "New tokens/record", "Target calls/record", "Tokens/target call",
                   "Records stopped by the budget", "Output perplexity", "Task score"], rows)


QUALITY_DEFINITION = (
    "Output perplexity is exp of the mean negative log-likelihood of a record's new tokens under the target "
    "model's raw distribution (temperature 1), given the prompt: computed by the harness after generation, "
    "outside the timing and the pass counts; lower is better; the mean over records is shown. Task scores are "
    "0..1, per category where the item has a reference: exact match of the final number (math_reasoning), "
    "ROUGE-L F (summarization), chrF (translation), SQuAD token F1 (qa, rag); higher is better. Mean task score "
    "is the mean of the category columns. Further columns are figures a method reports itself (ctx.extras), "
    "averaged over records."
)


def _quality_section(records: pd.DataFrame, speed: pd.DataFrame, baseline: str, folder: Path,
                     methods_manifest: dict) -> dict | None:
    table = quality_table(records, baseline)
    path = folder / "quality_vs_speed.png"
    path.unlink(missing_ok=True)
    if table.empty:
        return None
    shown = pd.DataFrame(index=table.index)
    for column in table.columns:
        pattern = "{:.2f}" if column == OUTPUT_PPL else "{:.3f}"
        shown[column] = [_formatted(value, pattern, MISSING_IN_SPEED_TABLE) for value in table[column]]
    drawn = plot_quality_vs_speed(table, speed, path)
    return {"definition": QUALITY_DEFINITION, "table": _frame_table(shown, methods_manifest),
            "plot": plot_entry(drawn, "Quality against speed") if drawn else None}


def _prediction_display(run_dir: Path, raw: list[dict], table: pd.DataFrame, baseline: str,
                        profiles: list[str | Path] | None) -> dict | None:
    """The measured speed-up beside the one the cost model predicts from the same records' trace, one column per
    profile (named by its device): a CPU run's acceptance and widths priced with a GPU's measured pass times."""
    from harness.costmodel import load_profile, predicted_speedups

    paths = [Path(p) for p in profiles] if profiles else [run_dir / "profile.json"]
    missing = [str(p) for p in paths if not p.is_file()]
    if profiles and missing:
        raise FileNotFoundError(f"profile {missing[0]} not found")
    paths = [p for p in paths if p.is_file()]
    if not paths:
        return None
    loaded = [load_profile(p) for p in paths]
    predicted = [predicted_speedups(raw, profile["tables"], baseline) for profile in loaded]
    devices = [profile.get("device", "?") for profile in loaded]
    rows = []
    for method in dict.fromkeys(m for column in predicted for m in column):
        measured = table.loc[method, OVERALL] if method in table.index and OVERALL in table else math.nan
        rows.append([method, _formatted(measured, "{:.2f}x", MISSING_IN_SPEED_TABLE),
                     *[f"{column[method]:.2f}x" if method in column else MISSING_IN_SPEED_TABLE for column in predicted]])
    columns = ["Method", "Measured here", *[f"Predicted on {device}" for device in devices]]
    return {"device": "; ".join(devices), "file": ", ".join(str(p) for p in paths), **_table(columns, rows)}


def _roofline_display(manifest: dict, ok: pd.DataFrame, baseline: str) -> dict | None:
    """Where the baseline's decode speed sits under the device's memory-bound limit."""
    from harness import roofline

    roof = manifest.get("roofline") or {}
    if "device" not in roof or "target" not in roof:
        return None  # a run from before the roofline was measured
    from methods.common.cache_policy import Spec

    decoder = (_spec(baseline) or Spec(baseline)).decoder  # `ar` of `ar+int8` (run --transform): each limit gets its own models' rows
    specs = ok["method"].map(_spec)  # from the name, so records from before the decoder/transform fields count

    def plain_under(transform: str | None) -> pd.DataFrame:
        return ok[specs.map(lambda s: s == Spec(decoder, None, transform)).astype(bool)]

    plain = plain_under(None)
    reached = roofline.efficiency(roof["device"], roof["target"], roofline.decode_tokens_per_s(plain.to_dict("records")))
    device = roof["device"]
    rows = [
        ["Read bandwidth", f"{device['read_bandwidth_bytes_s'] / 1e9:.1f} GB/s"],
        [f"Matmul throughput ({device['dtype']})", f"{device['matmul_flops_s'] / 1e9:.0f} GFLOP/s"],
        ["Target weight bytes read per token", f"{roof['target']['weight_bytes_per_token'] / 1e9:.2f} GB"],
        ["Memory-bound limit", f"{reached['memory_bound_tokens_per_s']:.1f} tokens/s"],
        [f"{decoder} decode speed (prefill excluded)",
         _formatted(reached["measured_tokens_per_s"], "{:.2f} tokens/s", MISSING_IN_COST_TABLE)],
        ["Fraction of the limit", _formatted(100 * reached["fraction"], "{:.0f}%", MISSING_IN_COST_TABLE)],
        ["Ridge width (tokens per pass where compute catches up)", f"{reached['ridge_width']:.1f}"],
    ]
    for name, model in (roof.get("transforms") or {}).items():  # int8 weights: fewer bytes, a higher limit
        runs = plain_under(name)
        under = roofline.efficiency(device, model, roofline.decode_tokens_per_s(runs.to_dict("records")))
        rows += [
            [f"Target weight bytes read per token under {name}", f"{model['weight_bytes_per_token'] / 1e9:.3f} GB"],
            [f"Memory-bound limit under {name}", f"{under['memory_bound_tokens_per_s']:.1f} tokens/s"],
            [f"{decoder}+{name} decode speed (prefill excluded)",
             _formatted(under["measured_tokens_per_s"], "{:.2f} tokens/s", MISSING_IN_COST_TABLE)],
            [f"Fraction of the limit under {name}", _formatted(100 * under["fraction"], "{:.0f}%",
                                                                MISSING_IN_COST_TABLE)],
        ]
    return {"how": device.get("method", ""), **_table(["Figure", "Value"], rows)}


ACCURACY_NOTE = (
    "Scores are RULER's: a record scores the fraction of its reference answers found in the output "
    "(case-insensitive substring match; {metrics}). The heatmap pools the needle tasks (every record with a "
    "needle depth) per method; each cell is the mean score of the records of that length and depth. Each task's "
    "table gives the mean score and, in brackets, the number of records, per target context length."
)


def _plot_into(folder: Path, name: str, title: str, draw) -> dict | None:
    """Draw one plot into folder/name (an earlier build's copy removed first) and return its entry."""
    path = folder / name
    path.unlink(missing_ok=True)
    return plot_entry(path, title) if draw(path) else None


def _accuracy_section(ok: pd.DataFrame, methods: list[str], folder: Path) -> dict | None:
    tables = longtables.accuracy_by_task(ok, methods)
    heatmap = _plot_into(folder, "needle_heatmap.png", "Needle retrieval by length and depth",
                         lambda path: plot_needle_heatmaps(longtables.needle_grid(ok, methods), path))
    if not tables:
        return None
    shown = []
    for task, table in tables.items():
        rows = [[method, *(_formatted(mean, "{:.2f}", MISSING_IN_SPEED_TABLE) + f" ({n})" for mean, n in cells)]
                for method, cells in zip(table.index, table.itertuples(index=False))]
        shown.append({"task": task, **_table(["Method", *(f"{c} tokens" if c != "all" else "all lengths"
                                                          for c in table.columns)], rows)})
    metrics = ", ".join(sorted(set(ok.loc[ok["item_meta"].map(lambda m: isinstance(m, dict)), "task_metric"]
                                   .dropna())))
    return {"note": ACCURACY_NOTE.format(metrics=metrics or "no metric recorded"), "tasks": shown,
            "heatmap": heatmap}


KV_NOTE = (
    "The bytes of keys and values the target's cache holds, measured by the harness after every target pass "
    "(draft caches not counted): the peak over the record's passes (a policy's peak comes before it evicts) "
    "and at its end; mean and max over the records that kept a cache. Policy state: what a cache policy held "
    "beside the cache (its selections and representative keys, the 16-bit originals of moved keys), the peak, "
    "max over records. Process peak is the peak memory of the "
    "cost table (CUDA allocator peak on a GPU, process resident set on a CPU), max over records."
)


def _mib(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING_IN_COST_TABLE
    mib = value / 2**20
    return f"{mib:.3f}" if mib < 1 else f"{mib:.2f}" if mib < 100 else f"{mib:.0f}"


def _kv_display(ok: pd.DataFrame, methods: list[str]) -> dict | None:
    table = longtables.kv_cache_table(ok, methods)
    if table.empty:
        return None
    rows = [[method, f"{int(r['measured'])}/{int(r['records'])}", _mib(r["peak mean"]), _mib(r["peak max"]),
             _mib(r["final mean"]), _mib(r["final max"]), _mib(r["policy state max"]), _mib(r["process peak"])]
            for method, r in table.iterrows()]
    columns = ["Method", "Records with a cache", "KV peak mean (MiB)", "KV peak max (MiB)", "KV final mean (MiB)",
               "KV final max (MiB)", "Policy state max (MiB)", "Process peak (MiB)"]
    return {"note": KV_NOTE, **_table(columns, rows)}


LATENCY_NOTE = (
    "Per method and target context length (longctx lengths), means over records: prompt tokens; prefill, the "
    "time to the first token (to the end of the target passes that read the prompt, several where a policy "
    "reads it in chunks); and the decode time per token after the first: the rest of the generate call over "
    "new tokens - 1, so every pass, draft and host step of the decoding loop counts, and a speculative "
    "decoder's tokens per pass. Records that generated fewer than two tokens are left out of the decode column. "
    "CPU timings are noisy when the machine is shared."
)


def _latency_section(ok: pd.DataFrame, methods: list[str], folder: Path) -> dict | None:
    latency = longtables.latency_by_length(ok, methods)
    plot = _plot_into(folder, "latency_by_length.png", "Latency against context length",
                      lambda path: plot_latency_by_length(latency, path))
    if latency.empty:
        return None
    rows = [[r["method"], int(r["length"]), int(r["records"]), f"{r['prompt tokens']:.0f}",
             _formatted(r["prefill s"], "{:.3f}", MISSING_IN_COST_TABLE),
             _formatted(1000 * r["decode step s"], "{:.2f}", MISSING_IN_COST_TABLE)] for _, r in latency.iterrows()]
    columns = ["Method", "Length", "Records", "Prompt tokens", "Prefill (s)", "Decode (ms/token)"]
    return {"note": LATENCY_NOTE, "plot": plot, **_table(columns, rows)}


PERPLEXITY_NOTE = (
    "Each document is scored by the target under each method (a cache policy attached, or the model alone); "
    "`read as` says how (harness/likelihood.py: on the cache in chunks, or in strided sliding windows). "
    "Figures are pooled over a method's documents as lm-evaluation-harness pools a corpus: token perplexity "
    "exp(sum NLL / scored tokens), word perplexity exp(sum NLL / words), byte perplexity exp(sum NLL / bytes), "
    "bits per byte sum NLL / (bytes ln 2). Inside and past the window: token perplexity of the positions before "
    "the model's trained window ({window}) and from it on. Reading time is the method's wall time over the "
    "document's tokens; Spec-Bench's speed-up and #MAT do not apply to a document that is read, not generated. "
    "The plot shows exp of the mean NLL over the last {smoothing} tokens at each position (NLLs averaged over "
    "documents first); a dashed line marks the model's window where the document reaches it. The window was "
    "found from {window_source}."
)


def _perplexity_section(reading: pd.DataFrame, methods: list[str], manifest: dict, folder: Path,
                        baseline: str = "ar") -> dict | None:
    window, source = longtables.model_window(manifest, reading)
    curves, smoothing = {}, longtables.PPL_WINDOW
    if not reading.empty:
        smoothing = longtables.running_window(int(reading["token_nll"].map(len).max()))
        for method in methods:
            nlls = [nll for nll in reading.loc[reading["method"] == method, "token_nll"] if nll]  # scorers: none
            if nlls:
                curves[method] = longtables.running_perplexity(longtables.mean_nll_by_position(nlls), smoothing)
    plot = _plot_into(folder, "perplexity_by_position.png", "Perplexity against position",
                      lambda path: plot_perplexity_by_position(curves, window, smoothing, path))
    table = longtables.perplexity_table(reading, methods, window)
    if table.empty:
        return None

    def ppl(value) -> str:
        return _formatted(value, "{:.2f}", MISSING_IN_COST_TABLE)

    model = _model_text(manifest.get("target")).split(" (sha256")[0]
    reference = table["word ppl"].get(baseline) if baseline in table.index else None

    def change(value) -> str:
        return "—" if reference is None or not reference > 0 or pd.isna(value) else f"{100 * (value / reference - 1):+.2f}%"

    rows = [[method, model, int(r["documents"]), int(r["scored tokens"]), int(r["words"]), int(r["bytes"]),
             ppl(r["token ppl"]), ppl(r["word ppl"]), change(r["word ppl"]),
             _formatted(r["byte ppl"], "{:.4f}", MISSING_IN_COST_TABLE),
             _formatted(r["bits per byte"], "{:.4f}", MISSING_IN_COST_TABLE), ppl(r["ppl inside window"]),
             ppl(r["ppl past window"]), r["read as"], _formatted(r["ms per token"], "{:.3f}", MISSING_IN_COST_TABLE)]
            for method, r in table.iterrows()]
    columns = ["Method", "Model", "Documents", "Scored tokens", "Words", "Bytes", "Token PPL", "Word PPL",
               f"Word PPL vs {baseline}", "Byte PPL",
               "Bits/byte",
               "Token PPL inside window", "Token PPL past window", "Read as", "Reading ms/token"]
    note = PERPLEXITY_NOTE.format(window=window or "unknown", smoothing=smoothing, window_source=source)
    return {"note": note, "plot": plot, "perturbation": _perturbation_section(reading, baseline, folder),
            **_table(columns, rows)}


PERTURBATION_NOTE = (
    "The perturbations of Gong et al. (arXiv 2403.06408) added to every weight matrix at a relative L2 strength "
    "||D|| / ||W||, each kind at the same norm, read as the table above reads; word perplexity pooled over the "
    "documents. Dashed lines: the unperturbed model and the run's quantizers (simulated). The paper's finding to "
    "compare with: at equal norm, perturbations that grow with |w| hurt least and clipping (the outliers) most."
)


def _perturbation_section(reading: pd.DataFrame, baseline: str, folder: Path) -> dict | None:
    sweep = transformtables.perturbation_sweep(reading)
    levels = transformtables.baseline_levels(reading, baseline)
    plot = _plot_into(folder, "perturbation_sweep.png", "Perturbation sweep",
                      lambda path: plot_perturbation_sweep(sweep, levels, path))
    if sweep.empty:
        return None
    models = ["model"] if "model" in sweep else []
    rows = [[*(str(r[key]) for key in models), r["on"], r["kind"], f"{r['strength']:g}", int(r["documents"]),
             f"{r['word ppl']:.2f}", f"{r['bits per byte']:.4f}"] for _, r in sweep.iterrows()]
    columns = [*(k.title() for k in models), "On", "Kind", "Strength", "Documents", "Word PPL", "Bits/byte"]
    return {"note": PERTURBATION_NOTE, "plot": plot, **_table(columns, rows)}


LM_EVAL_NOTE = (
    "lm-evaluation-harness's own figures for each task, run through decodebench's lm-eval model "
    "(harness/lm_eval_model.py): loglikelihood requests read by the target (through a method's cache policy), "
    "generations by the method itself, each generation also a record above (its cost, and its document's score "
    "as task score). Stderr is lm-eval's (bootstrap or closed form; n/a where lm-eval gives none, as for "
    "perplexities); a metric's filter follows its name after a comma. Word and byte perplexity and bits per "
    "byte are lm-eval's wikitext definitions, as in the perplexity suite."
)


def lm_eval_section(records: pd.DataFrame, methods: list[str], manifest: dict) -> dict | None:
    table = evaluation_table(successful(records), methods)
    if table.empty:
        return None
    model = _model_text(manifest.get("target")).split(" (sha256")[0]

    def number(value) -> str:
        return _formatted(value, "{:.4g}", MISSING_IN_COST_TABLE)

    rows = [[r["task"], r["metric"] + {True: " ↑", False: " ↓"}.get(r["higher is better"], ""), model, r["method"],
             number(r["value"]), number(r["stderr"]), _formatted(r["documents"], "{:.0f}", MISSING_IN_COST_TABLE)]
            for _, r in table.iterrows()]
    return {"note": LM_EVAL_NOTE, **_table(["Task", "Metric", "Model", "Method", "Value", "Stderr", "Documents"], rows)}


def _without_duplicates(records: list[dict]) -> tuple[list[dict], str | None]:
    """The first record of every key. Two records with one key (two writers on one folder, before the
    folder lock) are not repeats: the report keeps one and says so instead of inventing a spread."""
    kept: dict[tuple, dict] = {}
    for record in records:
        kept.setdefault(record_key(record), record)
    extra = len(records) - len(kept)
    if not extra:
        return records, None
    note = (f"{extra} duplicate record(s) (the same method, item, turn, repeat and budget written more than "
            f"once) were left out; only the first of each counts")
    warnings.warn(note, stacklevel=2)
    return list(kept.values()), note


def _spec(method: str):
    """A method name taken apart (methods.common.cache_policy.parse); None for one this checkout cannot parse."""
    from methods.common.cache_policy import parse  # here, not at import: it loads transformers' attention code

    try:
        return parse(method)
    except (KeyError, ValueError):
        return None


def run_baseline(records: pd.DataFrame, baseline: str) -> str:
    """`baseline`, or where the run has no such method and asked for `ar`, its one `ar` under a transform
    (`run --transform int8`: ar+int8), so every figure is against the same models."""
    present = set(records["method"]) if "method" in records else set()
    if baseline in present or baseline != "ar":
        return baseline
    from methods.common.cache_policy import Spec

    specs = {name: _spec(name) for name in present}
    plain = [name for name, spec in specs.items() if spec is not None and spec == Spec("ar", None, spec.transform)]
    return plain[0] if len(plain) == 1 else baseline


def build_report(run_dir: str | Path, baseline: str = "ar", profile: str | Path | list | None = None) -> Path:
    """Read run_dir/results.jsonl and run_dir/manifest.json, write run_dir/report/report.md,
    run_dir/report/report.html (self-contained: PNG plots embedded as base64 data URIs),
    and PNG plots in run_dir/report/. Returns the report folder."""
    run_dir = Path(run_dir)
    markdown_template, html_template = load_templates()  # fail before any work if they are missing
    raw, duplicates = _without_duplicates(read_records(run_dir / "results.jsonl"))
    records = normalized(pd.DataFrame(raw))
    manifest = _load_manifest(run_dir / "manifest.json")
    methods_manifest = manifest.get("methods", {})
    folder = run_dir / "report"
    folder.mkdir(parents=True, exist_ok=True)

    baseline = run_baseline(records, baseline)
    sweep = budget_sweep(records)
    label = main_budget(records)
    records = main_records(records)
    raw = [r for r in raw if r.get("budget", "") == label]
    every_method = method_order(successful(records), baseline)
    reading = longtables.likelihood_records(successful(records))
    evaluated = records[longtables.is_evaluation(records)]
    # Spec-Bench's figures are of generated text: a likelihood suite's records (a document read) stay out
    generated = longtables.generation_records(records)
    likelihood_suites = longtables.likelihood_suites()
    raw = [r for r in raw if not isinstance(r.get("token_nll"), list) and r.get("suite") not in likelihood_suites]
    ok = successful(generated)
    methods = method_order(ok, baseline)
    table = speed_table(generated, baseline)
    context = {
        "title": f"decodebench report: {manifest.get('name', run_dir.name)}",
        "run_items": _run_items(manifest, generates=not generated.empty or (reading.empty and evaluated.empty)),
        "baseline": baseline,
        "baseline_present": baseline in methods,
        "record_count": len(records),
        # a likelihood run, or lm-eval tasks that generated nothing: their own sections instead
        "spec_bench": not generated.empty or (reading.empty and evaluated.empty),
        "lm_eval": lm_eval_section(records, every_method, manifest),
        "accuracy": _accuracy_section(ok, methods, folder),
        "kv": _kv_display(successful(records), every_method),
        "latency": _latency_section(ok, methods, folder),
        "perplexity": _perplexity_section(reading, every_method, manifest, folder, baseline),
        "speed": _frame_table(_speed_display(table), methods_manifest),
        "definitions": DEFINITIONS.format(baseline=baseline, resamples=BOOTSTRAP_RESAMPLES),
        "spec_bench_relation": SPEC_BENCH_RELATION,
        "cost": _frame_table(_cost_table(ok, methods), methods_manifest),
        "host": _host_display(ok, methods),
        "drafting": drafting_table(ok, methods),
        "alternatives": alternatives_table(ok, methods),
        "peers": _peer_display(peer_table(generated, methods_manifest)),
        "spread": _spread_display(repeat_spread(generated)),
        "lossless": _lossless_section(ok, manifest, baseline),
        "plots": draw_plots(table, ok, methods, baseline, folder, sweep),
        "sweep": _sweep_display(sweep),
        "prediction": _prediction_display(run_dir, raw, table, baseline,
                                          [profile] if isinstance(profile, (str, Path)) else profile),
        "roofline": _roofline_display(manifest, ok, baseline),
        "main_budget": label,
        "errors": _errors_table(records),
        "warnings": _warnings_table(records),
        "duplicates": duplicates,
        "methods": _methods_table(manifest, records),
        "quality": _quality_section(generated, table, baseline, folder, methods_manifest),
    }
    (folder / "report.md").write_text(markdown_template.render(context), encoding="utf-8")
    (folder / "report.html").write_text(html_template.render(context), encoding="utf-8")
    return folder
