"""A sweep file: a grid of `run`s (jobs) with stable ids, checked whole before anything runs.

A sweep file is YAML whose keys are `decodebench run`'s options (`max_new_tokens` or `max-new-tokens`); a
list is an axis of the grid and the jobs are the product of the axes. Two keys read a list otherwise:
`methods: [ar, pld]` is the methods of every job (each job's report compares them with `ar`), and a list of
lists is an axis of method sets; `set:` and `option:` may be mappings (`set: {sps.gamma: [2, 4]}`), each
list in them an axis. A job's id is a hash of its own settings as `run` parses them, so it does not change
when the file is reordered or an axis grows. Executors and the sweep folder: harness/sweeprun.py.
"""
from __future__ import annotations

import argparse
import difflib
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

# run's options a sweep does not set: it decides where each job writes, and never moves a job aside
NOT_SWEEPABLE = ("out", "force_new")
MAPPING_KEYS = ("set", "option")  # METHOD.KNOB=VALUE, NAME=VALUE: also written as mappings


class SweepError(ValueError):
    """A sweep file that cannot run: said before any job starts or any model loads."""


class _RunParser(argparse.ArgumentParser):
    """`run`'s parser, raising instead of printing usage and exiting."""

    def error(self, message: str):
        raise SweepError(message)


def run_parser() -> argparse.ArgumentParser:
    from harness.cli import add_run_arguments

    parser = _RunParser(prog="decodebench run", add_help=False)
    add_run_arguments(parser)
    return parser


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in NOT_SWEEPABLE}


def _flag(action: argparse.Action) -> str:
    return max(action.option_strings, key=len)


@dataclass(frozen=True)
class Job:
    id: str
    settings: dict  # the file's settings for this job, as `run` parses them (typed)
    argv: tuple[str, ...]  # `run`'s arguments, --out left for the executor

    def run_argv(self, out: Path) -> list[str]:
        """`decodebench run`'s arguments (after `run`) writing into `out`."""
        return [*self.argv, "--out", str(out)]


def load(path: str | Path) -> dict:
    """The sweep file's mapping, or SweepError saying why it is not one."""
    import yaml

    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise SweepError(f"cannot read sweep file {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise SweepError(f"{path} is not valid YAML: {err}") from None
    if spec is None:
        raise SweepError(f"{path} is empty: write run settings, e.g. `methods: [ar, pld]` and `temperature: [0, 1]`")
    if not isinstance(spec, dict):
        raise SweepError(f"{path}: expected a mapping of run settings (suite: ..., methods: ...), "
                         f"got a {type(spec).__name__}")
    return spec


def _scalar(key: str, value, flag: bool = False):
    """A value `run` can take for `key` (a flag takes true/false), or SweepError."""
    if flag:
        if not isinstance(value, bool):
            raise SweepError(f"{key}: expected true or false, got {value!r}")
        return value
    if value is None:
        raise SweepError(f"{key}: no value")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise SweepError(f"{key}: expected a value for --{key.replace('_', '-')}, got {value!r}")
    return value


def _axis(key: str, values: list) -> list:
    if not values:
        raise SweepError(f"{key}: an empty list leaves the grid empty")
    return values


def _parts(key: str, value, action: argparse.Action) -> tuple[list[tuple[str, object]], list[tuple[str, list]]]:
    """One key's fixed settings [(key, value)] and its axes [(name, [value per grid point])]; a repeatable
    option's value is a list of its occurrences."""
    repeatable = isinstance(action, argparse._AppendAction)
    flag = isinstance(action, argparse._StoreTrueAction)
    if key == "methods":
        if isinstance(value, list) and any(isinstance(v, list) for v in _axis(key, value)):
            return [], [(key, [",".join(map(str, _methods(key, v))) for v in value])]
        return [(key, ",".join(map(str, _methods(key, value))))], []
    if key in MAPPING_KEYS and isinstance(value, dict):
        fixed, axes = [], []
        for name, v in value.items():
            if isinstance(v, list):
                axes.append((f"{key}.{name}", [[f"{name}={_scalar(f'{key}.{name}', x)}"] for x in _axis(f"{key}.{name}", v)]))
            else:
                fixed.append((key, [f"{name}={_scalar(f'{key}.{name}', v)}"]))
        return fixed, axes
    if isinstance(value, list):
        if repeatable:  # each grid point: one occurrence, or a list of them
            return [], [(key, [[_scalar(key, x) for x in v] if isinstance(v, list) else [_scalar(key, v)]
                               for v in _axis(key, value)])]
        return [], [(key, [_scalar(key, v, flag) for v in _axis(key, value)])]
    return [(key, [_scalar(key, value)] if repeatable else _scalar(key, value, flag))], []


def _methods(key: str, value) -> list:
    names = value if isinstance(value, list) else [value]
    if not names:
        raise SweepError(f"{key}: no method")
    return [_scalar(key, n) for n in names]


def _argv(settings: dict, options: dict[str, argparse.Action]) -> list[str]:
    argv = []
    for key, value in settings.items():
        flag = _flag(options[key])
        if isinstance(options[key], argparse._StoreTrueAction):
            argv += [flag] if value else []
        elif isinstance(value, list):
            argv += [arg for v in value for arg in (flag, str(v))]
        else:
            argv += [flag, str(value)]
    return argv


def job_id(settings: dict) -> str:
    """A hash of the typed settings, repeatable options in any order: the same job has the same id."""
    canonical = {k: sorted(map(str, v)) if isinstance(v, list) else v for k, v in settings.items()}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, default=str).encode()).hexdigest()[:12]


def expand(spec: dict, source: str = "sweep file") -> list[Job]:
    """The grid's jobs in the file's order (the last axis varying fastest), each parsed by `run`'s parser."""
    parser = run_parser()
    options = _options(parser)
    fixed: dict[str, object] = {}
    axes: list[tuple[str, list]] = []
    order = [str(raw).replace("-", "_") for raw in spec]
    for raw, value in spec.items():
        key = str(raw).replace("-", "_")
        if key not in options:
            hint = difflib.get_close_matches(key, list(options), 1)
            raise SweepError(f"{source}: unknown key {raw!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                             + f"; a key is one of run's options: {', '.join(sorted(options))}"
                             + (" (the sweep sets it for each job)" if key in NOT_SWEEPABLE else ""))
        try:
            key_fixed, key_axes = _parts(key, value, options[key])
        except SweepError as err:
            raise SweepError(f"{source}: {err}") from None
        for k, v in key_fixed:
            fixed[k] = fixed.get(k, []) + v if isinstance(v, list) else v
        axes += [(name, values) for name, values in key_axes]
    jobs, seen = [], {}
    for point in itertools.product(*(values for _, values in axes)):
        settings = {k: list(v) if isinstance(v, list) else v for k, v in fixed.items()}
        for (name, _), value in zip(axes, point):
            key = name.split(".")[0]
            settings[key] = settings.get(key, []) + value if isinstance(value, list) else value
        settings = {k: settings[k] for k in order if k in settings}  # the file's order
        _absolute(settings)
        argv = _argv(settings, options)
        try:
            args = parser.parse_args(argv)
        except SweepError as err:
            raise SweepError(f"{source}: {err}") from None
        typed = {key: getattr(args, key) for key in settings}
        job = Job(job_id(typed), typed, tuple(argv))
        if job.id in seen:
            raise SweepError(f"{source}: the grid holds one job twice ({describe(job.settings)}): "
                             "an axis repeats a value")
        seen[job.id] = job
        jobs.append(job)
    return jobs


def _absolute(settings: dict) -> None:
    """Paths as absolute paths: a job may run in another working directory (a Ray worker's). `data` always
    (as `run` stores it), a model when it names a local file or folder."""
    if isinstance(settings.get("data"), str):
        settings["data"] = str(Path(settings["data"]).expanduser().resolve())
    for key in ("target", "draft"):
        if isinstance(settings.get(key), str) and Path(settings[key]).expanduser().exists():
            settings[key] = str(Path(settings[key]).expanduser().resolve())


def varying(jobs: list[Job] | list[dict]) -> list[str]:
    """The settings that differ between jobs (the report's columns), in the file's order."""
    settings = [j.settings if isinstance(j, Job) else j for j in jobs]
    keys = list(dict.fromkeys(k for s in settings for k in s))
    return [k for k in keys if len({json.dumps(s.get(k), sort_keys=True, default=str) for s in settings}) > 1]


def describe(settings: dict, keys: list[str] | None = None) -> str:
    keys = list(settings) if keys is None else keys
    return " ".join(f"{k}={_text(settings.get(k))}" for k in keys) or "(the only job)"


def _text(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def check(jobs: list[Job], out: Path) -> None:
    """Every job as `run` checks its settings (methods, knobs, suite, budgets, ranges), its folder's identity
    if it has one, and its model paths: SweepError naming each problem and the jobs it hits, before any model
    loads."""
    from harness.cli import input_errors, run_config
    from harness.runfolder import RunFolder
    from harness.runner import Runner

    parser, problems = run_parser(), {}
    keys = varying(jobs)
    for job in jobs:
        try:
            runner = Runner(run_config(parser.parse_args(job.run_argv(out / "jobs" / job.id))), _quiet())
            RunFolder(runner.out).check(runner.identity)
            _check_models(runner)
        except SystemExit as usage:
            problems.setdefault(str(usage.code), []).append(job)
        except input_errors() as err:
            text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            problems.setdefault(str(text), []).append(job)
    if problems:
        lines = [f"{text} ({'every job' if len(hit) == len(jobs) else '; '.join(describe(j.settings, keys) for j in hit)})"
                 for text, hit in problems.items()]
        raise SweepError("; ".join(lines))


def _check_models(runner) -> None:
    """A model given as a path must be there, as a model folder or .gguf file (what `run` finds only when it
    loads, a job later): ModelError. Embedded names and hub ids are left to the job."""
    from harness import models

    needs_draft = any(m.needs.draft for m in runner.methods.values())
    for spec in [runner.cfg.target] + ([runner.cfg.draft] if needs_draft and runner.cfg.draft else []):
        if spec not in models.EMBEDDED:
            models.resolve(spec)


def _quiet():
    from harness.console import make_console

    return make_console(quiet=True)
