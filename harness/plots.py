"""The report's PNG plots (matplotlib, headless), drawn from the tables of harness.tables."""

from __future__ import annotations

import base64
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # reports are built headless, often on a GPU box without a display
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from harness.tables import (
    CI_HIGH,
    CI_LOW,
    MAT,
    MEAN_TASK_SCORE,
    OUTPUT_PPL,
    OVERALL,
    TOKENS_PER_S,
    ordered_categories,
    pooled_mat,
)

PLOT_DPI = 120


def _grouped_bars(ax, groups: list[str], series: dict[str, list[float]]) -> None:
    positions = np.arange(len(groups))
    width = 0.8 / len(series)
    for index, (name, values) in enumerate(series.items()):
        offset = (index - (len(series) - 1) / 2) * width
        ax.bar(positions + offset, values, width, label=name)
    ax.set_xticks(positions, groups, rotation=20 if len(groups) > 4 else 0)
    ax.legend(fontsize="small")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return path


def _figure(groups: int):
    return plt.subplots(figsize=(max(6.0, 1.3 * groups + 2), 4.2))


def _plot_speedup(table: pd.DataFrame, baseline: str, path: Path) -> Path | None:
    if OVERALL not in table:
        return None
    compared = table.drop(index=baseline)
    compared = compared[compared[OVERALL].notna()]
    if compared.empty:
        return None
    groups = [column for column in table.columns if column not in (MAT, OVERALL, TOKENS_PER_S, CI_LOW, CI_HIGH)]
    groups.append(OVERALL)
    fig, ax = _figure(len(groups))
    _grouped_bars(ax, [*groups[:-1], "overall"], {m: compared.loc[m, groups].tolist() for m in compared.index})
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_ylabel(f"Speed-up over {baseline}")
    ax.set_title("Speed-up by category")
    return _save(fig, path)


def _plot_mat(ok: pd.DataFrame, methods: list[str], path: Path) -> Path | None:
    mat = ok.groupby(["category", "method"]).apply(pooled_mat, include_groups=False).unstack("method")
    mat = mat.reindex(index=ordered_categories(ok["category"]), columns=methods).dropna(axis=1, how="all")
    if mat.empty:
        return None
    fig, ax = _figure(len(mat.index))
    _grouped_bars(ax, list(mat.index), {method: mat[method].tolist() for method in mat.columns})
    ax.set_ylabel("Mean accepted tokens per target pass")
    ax.set_title("#MAT by category")
    return _save(fig, path)


def _plot_tokens_per_s(ok: pd.DataFrame, methods: list[str], path: Path) -> Path | None:
    per_method = {method: ok.loc[ok["method"] == method, "tokens_per_s"].dropna().to_numpy() for method in methods}
    per_method = {method: values for method, values in per_method.items() if len(values)}
    if not per_method:
        return None
    fig, ax = _figure(len(per_method))
    positions = np.arange(len(per_method))
    ax.bar(positions, [values.mean() for values in per_method.values()], 0.6, color="tab:blue", alpha=0.6)
    jitter = np.random.default_rng(0)  # fixed so re-rendering a report gives the same picture
    for position, values in zip(positions, per_method.values()):
        ax.scatter(position + jitter.uniform(-0.2, 0.2, len(values)), values, s=10, color="black", alpha=0.6)
    ax.set_xticks(positions, list(per_method), rotation=20 if len(per_method) > 4 else 0)
    ax.set_ylabel("Tokens/s (bar: mean, dots: records)")
    ax.set_title("Decoding throughput per method")
    return _save(fig, path)


def _plot_memory_energy(ok: pd.DataFrame, methods: list[str], path: Path) -> Path | None:
    """Peak memory and energy per token side by side; energy only where the device exposed it."""
    shown = ok[ok["method"].isin(methods)]
    memory = shown.groupby("method")["peak_mem_bytes"].max().reindex(methods).dropna() / 2**20
    with_energy = shown[shown["energy_j"].notna()].groupby("method")[["energy_j", "new_tokens"]].sum()
    energy = (with_energy["energy_j"] / with_energy["new_tokens"]).reindex(methods).dropna()
    panels = [(values, label) for values, label in ((memory, "Peak memory (MiB)"), (energy, "Energy (J/token)"))
              if len(values)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.0, 1.1 * len(methods) * len(panels) + 2), 4.2),
                             squeeze=False)
    for ax, (values, label) in zip(axes[0], panels):
        ax.bar(np.arange(len(values)), values.to_numpy(), 0.6, color="tab:green" if "Energy" in label else "tab:purple")
        ax.set_xticks(np.arange(len(values)), list(values.index), rotation=20 if len(values) > 4 else 0)
        ax.set_ylabel(label)
    fig.suptitle("Memory and energy per method")
    return _save(fig, path)


def _plot_budget_sweep(sweep: pd.DataFrame, path: Path) -> Path | None:
    if sweep.empty:
        return None
    panels = [("new tokens", "new tokens per record")] + [
        (column, label) for column, label in (("output perplexity", "output perplexity (target)"),
                                              ("task score", "task score (0-1)")) if sweep[column].notna().any()]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 4.2), squeeze=False)
    for ax, (column, label) in zip(axes[0], panels):
        for method, rows in sweep.groupby("method", sort=False):
            ax.plot(rows["budget"], rows[column], marker="o", label=method)
        ax.set_xlabel(f"budget ({sweep['kind'].iloc[0]} per record)")
        ax.set_ylabel(label)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("What a fixed compute budget buys: tokens and quality")
    return _save(fig, path)


def plot_entry(path: Path, title: str) -> dict:
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return {"file": path.name, "title": title, "data_uri": f"data:image/png;base64,{encoded}"}


def draw_plots(
    table: pd.DataFrame, ok: pd.DataFrame, methods: list[str], baseline: str, folder: Path,
    sweep: pd.DataFrame | None = None,
) -> list[dict]:
    plots = [
        ("budget_sweep.png", "Fixed-budget sweep", lambda path: _plot_budget_sweep(sweep, path)),
        ("speedup_by_category.png", "Speed-up by category", lambda path: _plot_speedup(table, baseline, path)),
        ("mat_by_category.png", "#MAT by category", lambda path: _plot_mat(ok, methods, path)),
        ("tokens_per_s.png", "Tokens/s per method", lambda path: _plot_tokens_per_s(ok, methods, path)),
        ("memory_energy.png", "Memory and energy", lambda path: _plot_memory_energy(ok, methods, path)),
    ]
    drawn = []
    for name, title, draw in plots:
        path = folder / name
        path.unlink(missing_ok=True)  # a plot skipped now must not leave a stale one from an earlier build
        if draw(path):
            drawn.append(plot_entry(path, title))
    return drawn


def plot_quality_vs_speed(quality: pd.DataFrame, speed: pd.DataFrame, path: Path) -> Path | None:
    """One point per method: speed (speed-up, or tokens/s without a baseline) against each quality figure."""
    x_column = OVERALL if OVERALL in speed and speed[OVERALL].notna().any() else TOKENS_PER_S
    panels = [(c, label) for c, label in ((OUTPUT_PPL, "output perplexity (lower is better)"),
                                          (MEAN_TASK_SCORE, "mean task score (higher is better)")) if c in quality]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (column, label) in zip(axes[0], panels):
        joined = pd.concat([speed[x_column], quality[column]], axis=1).dropna()
        ax.scatter(joined[x_column], joined[column], color="tab:blue")
        for method, (x, y) in joined.iterrows():
            ax.annotate(str(method), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.margins(x=0.15)  # room for the label of the rightmost point (it was cut at the frame)
        ax.set_xlabel("overall speed-up" if x_column == OVERALL else "tokens/s")
        ax.set_ylabel(label)
    fig.suptitle("Quality against speed (one point per method)")
    return _save(fig, path)


def plot_needle_heatmaps(grids: dict[str, pd.DataFrame], path: Path) -> Path | None:
    """One panel per method: mean needle-task score by context length (rows) and needle depth (columns),
    on one colour scale (0 to 1), each cell's value written in it."""
    if not grids:
        return None
    columns = min(len(grids), 3)
    rows = -(-len(grids) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.0 * columns + 1.2, 3.2 * rows + 0.6), squeeze=False,
                             layout="constrained")  # fits the colorbar shared by the panels, as tight_layout cannot
    image = None
    for ax, (method, grid) in zip(axes.flat, grids.items()):
        image = ax.imshow(grid.to_numpy(float), cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", origin="lower")
        ax.set_xticks(range(len(grid.columns)), [f"{d:g}" for d in grid.columns])
        ax.set_yticks(range(len(grid.index)), [str(n) for n in grid.index])
        for (row, column), value in np.ndenumerate(grid.to_numpy(float)):
            if not np.isnan(value):
                ax.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if value < 0.2 or value > 0.85 else "black")  # readable on dark ends
        ax.set_title(method, fontsize=10)
        ax.set_xlabel("needle depth (% of context)")
    for ax in axes[:, 0]:
        ax.set_ylabel("context length (tokens)")
    for ax in list(axes.flat)[len(grids):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, shrink=0.8, label="mean score")
    fig.suptitle("Needle retrieval: mean score by length and depth")
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return path


def plot_latency_by_length(latency: pd.DataFrame, path: Path) -> Path | None:
    """Prefill seconds and milliseconds per decode step against prompt tokens, one line per method."""
    if latency.empty:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.2))
    for method, rows in latency.groupby("method", sort=False):
        axes[0].plot(rows["prompt tokens"], rows["prefill s"], marker="o", label=method)
        axes[1].plot(rows["prompt tokens"], 1000 * rows["decode step s"], marker="o", label=method)
    axes[0].set_ylabel("prefill (s, to the first token)")
    axes[1].set_ylabel("decode (ms per token after the first)")
    for ax in axes:
        ax.set_xlabel("prompt tokens")
        ax.set_ylim(bottom=0)
    axes[1].legend(fontsize=8)
    fig.suptitle("Latency against context length")
    return _save(fig, path)


def plot_perplexity_by_position(curves: dict[str, tuple[np.ndarray, np.ndarray]], window: int | None,
                                smoothing: int, path: Path) -> Path | None:
    """Running perplexity (trailing window of `smoothing` tokens) against position, one line per method,
    log scale; the model's trained window marked where known."""
    curves = {method: curve for method, curve in curves.items() if len(curve[0])}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(9.0, 4.6))
    for method, (positions, ppl) in curves.items():
        ax.plot(positions, ppl, label=method, linewidth=1.2)
    last = max(positions[-1] for positions, _ in curves.values())
    if window and window <= last:
        ax.axvline(window, color="gray", linestyle="--", linewidth=1)
        ax.annotate(f"model window ({window})", (window, 1), xycoords=("data", "axes fraction"),
                    xytext=(4, -12), textcoords="offset points", fontsize=8, color="gray")
    elif window:  # a line far right of the data would squash the curves
        ax.annotate(f"model window ({window}) lies past the document", (1, 1), xycoords="axes fraction",
                    xytext=(-4, -12), textcoords="offset points", ha="right", fontsize=8, color="gray")
    ax.set_yscale("log")
    ax.set_xlabel("token position in the document")
    ax.set_ylabel(f"perplexity (last {smoothing} tokens)")
    ax.legend(fontsize=8)
    ax.set_title("Perplexity against position")
    return _save(fig, path)


def plot_perturbation_sweep(sweep: pd.DataFrame, levels: dict[str, float], path: Path) -> Path | None:
    """Word perplexity against the perturbation's relative strength ||D|| / ||W||, one line per kind (and per
    model when there are several), log-log; dashed lines at the baseline's and each quantizer's perplexity."""
    if sweep.empty:
        return None
    fig, ax = plt.subplots(figsize=(8.0, 4.8))
    groups = ["model", "on", "kind"] if "model" in sweep else ["on", "kind"]
    for key, own in sweep.groupby(groups, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        label = " ".join(str(part) for part in key if part != "weights")
        own = own.sort_values("strength")
        ax.plot(own["strength"], own["word ppl"], marker="o", markersize=3, linewidth=1.2, label=label)
    for index, (method, level) in enumerate(levels.items()):
        if np.isfinite(level):
            ax.axhline(level, color=f"C{(index + 7) % 10}", linestyle="--", linewidth=0.9)
            ax.annotate(method, (0, level), xycoords=("axes fraction", "data"), xytext=(4, 2),
                        textcoords="offset points", fontsize=7, color="dimgray")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("relative perturbation strength ||D|| / ||W||")
    ax.set_ylabel("word perplexity")
    ax.legend(fontsize=7)
    ax.set_title("Perturbation sweep (Gong et al.)")
    return _save(fig, path)


def draw_run_plots(tables: dict[str, pd.DataFrame], baseline: str, folder: Path) -> list[dict]:
    """Several runs side by side (harness/runsreport.py): each method's overall speed-up over its own run's
    baseline, and its tokens/s; one bar per run in each method's group."""
    plots = [("runs_speedup.png", "Speed-up over each run's own baseline by run",
              lambda path: _plot_by_run(tables, OVERALL, f"Speed-up over {baseline} (of the same run)",
                                        path, drop=baseline)),
             ("runs_tokens_per_s.png", "Tokens/s by run", lambda path: _plot_by_run(tables, TOKENS_PER_S,
                                                                                       "Tokens/s", path))]
    drawn = []
    for name, title, draw in plots:
        path = folder / name
        path.unlink(missing_ok=True)
        if draw(path):
            drawn.append(plot_entry(path, title))
    return drawn


def _plot_by_run(tables: dict[str, pd.DataFrame], column: str, label: str, path: Path,
                 drop: str | None = None) -> Path | None:
    methods = list(dict.fromkeys(m for table in tables.values() if column in table for m in table.index if m != drop))
    series = {run: [table.loc[m, column] if column in table and m in table.index else np.nan for m in methods]
              for run, table in tables.items()}
    series = {run: values for run, values in series.items() if not np.all(np.isnan(values))}
    if not methods or not series:
        return None
    fig, ax = _figure(len(methods))
    _grouped_bars(ax, methods, series)
    if column == OVERALL:
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_ylabel(label)
    ax.set_title(label.split(" (")[0] + " by run")
    return _save(fig, path)
