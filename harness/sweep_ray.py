"""The `ray` executor: each job is one task on an actor that keeps one model pair loaded, so a model loads
once per worker, not once per job.

Actors are grouped by model pair (target, draft, device, dtype); each holds the job's resource request
(num_cpus, num_gpus) and runs its pair's jobs one after another; there are as many as the cluster has room
for, and an actor whose pair has no job left is ended to make room for another pair's. A job runs `run`'s own
Runner into the sweep folder, which must therefore be a path every node sees (one machine, or a shared
file system). An actor that dies (a crash, a lost node) fails its job's attempt; a new one takes its place.
"""
from __future__ import annotations

import math
import os
import time
from collections import deque
from pathlib import Path

from harness.sweep import Job, run_parser

REPO = Path(__file__).resolve().parent.parent


class ModelWorker:
    """One model pair, loaded on first use and kept; `run_job` runs one job with it."""

    def __init__(self, device: str, dtype: str, trust_remote_code: bool) -> None:
        import logging

        from transformers.utils import logging as hf_logging

        for noisy in ("torchao", "torch.utils._pytree"):  # as the CLI does
            logging.getLogger(noisy).setLevel(logging.ERROR)
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.device, self.dtype, self.trust_remote_code = device, dtype, trust_remote_code
        self.loaded: dict[str, object] = {}

    def _model(self, spec: str, device: str):
        from harness import models

        if spec not in self.loaded:
            self.log.write(f"ray worker {os.getpid()}: loading {spec} (once for this worker)\n")
            self.loaded[spec] = models.load(spec, device, self.dtype, trust_remote_code=self.trust_remote_code)
        return self.loaded[spec]

    def run_job(self, argv: list[str], log_path: str) -> str | None:
        """None when every record succeeded; else what failed (said as `run` says it)."""
        from harness.cli import input_errors, run_config
        from harness.console import make_console
        from harness.runner import Runner

        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} ray worker {os.getpid()}: run {' '.join(argv)}\n")
            console, self.log = make_console(file=log, width=160, soft_wrap=True), log
            try:
                runner = Runner(run_config(run_parser().parse_args(argv)), console)
                if any(m.needs.draft for m in runner.methods.values()) and runner.cfg.draft:
                    runner.given["draft"] = self._model(runner.cfg.draft, runner.device)
                runner.given["target"] = self._model(runner.cfg.target, runner.device)
                try:
                    runner.run()
                finally:
                    if hasattr(runner, "target_counter"):  # the hooks come off: the models serve the next job
                        runner.detach()
            except SystemExit as usage:
                return f"error: {usage.code}"
            except input_errors() as err:
                console.print(f"error: {err}", markup=False)
                return f"error: {err}"
            _job_report(runner.out, console)
            failed = len(runner.failures)
            if not failed:
                return None
            return f"{failed} of {runner.written} records failed; the first: {runner.failures[0]}"


def _job_report(run_dir: Path, console) -> None:
    """The job's own report, as `run` writes one (a report that cannot be built does not fail the job)."""
    from harness.report import build_report

    try:
        report = build_report(run_dir)
        console.print(f"report: {report / 'report.md'}  {report / 'report.html'}")
    except Exception as err:  # noqa: BLE001 - the records are what the job is for
        console.print(f"report not built: {type(err).__name__}: {err}", markup=False)


def _pair(job: Job) -> tuple:
    s = job.settings
    return (s.get("target"), s.get("draft"), s.get("device", "auto"), s.get("dtype", "auto"),
            bool(s.get("trust_remote_code")))


def _room(resources: dict, num_cpus: float, num_gpus: float) -> int:
    """How many actors of this request the cluster holds at once (at least one)."""
    fits = [resources.get("CPU", 0) / num_cpus if num_cpus else math.inf,
            resources.get("GPU", 0) / num_gpus if num_gpus else math.inf]
    return max(1, int(min(fits))) if min(fits) != math.inf else 1


def run_ray(sweep, todo: list[Job], address: str | None = None, num_cpus: float = 1, num_gpus: float | None = None,
            ray_cpus: int | None = None) -> None:
    """Run `todo` on the cluster at `address`, or on a Ray started here with `ray_cpus` CPUs (and this machine's
    GPUs), shut down afterwards. Each job asks for `num_cpus` and `num_gpus` (default: one GPU on a cluster
    that has GPUs, else none: a worker without one sees no CUDA device)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    started = not ray.is_initialized()
    if started:
        # workers import harness from this checkout (on a cluster: from where decodebench is installed)
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               "RAY_USAGE_STATS_ENABLED": "0"}
        if address:
            ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
        else:
            ray.init(num_cpus=ray_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": env})
    try:
        if num_gpus is None:
            num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        _schedule(sweep, todo, ray, num_cpus, num_gpus)
    finally:
        if started:
            ray.shutdown()


def _schedule(sweep, todo: list[Job], ray, num_cpus: float, num_gpus: float) -> None:
    worker = ray.remote(ModelWorker)
    room = _room(ray.cluster_resources(), num_cpus, num_gpus)
    pending = deque(sorted(todo, key=lambda j: [str(p) for p in _pair(j)]))  # a pair's jobs together
    idle: list[tuple[object, tuple]] = []
    running: dict[object, tuple[Job, object, tuple, float]] = {}  # result ref -> job, actor, pair, start

    def submit(job: Job, actor, pair) -> None:
        sweep.started(job)
        ref = actor.run_job.remote(job.run_argv(sweep.job_dir(job)), str(sweep.log(job)))
        running[ref] = (job, actor, pair, time.monotonic())

    while pending or running:
        for actor, pair in list(idle):  # an idle actor takes its pair's next job, or makes room
            idle.remove((actor, pair))
            job = next((j for j in pending if _pair(j) == pair), None)
            if job is None:
                ray.kill(actor)
                continue
            pending.remove(job)
            submit(job, actor, pair)
        while pending and len(running) + len(idle) < room:
            job = pending.popleft()
            s = job.settings
            actor = worker.options(num_cpus=num_cpus, num_gpus=num_gpus).remote(
                s.get("device", "auto"), s.get("dtype", "auto"), bool(s.get("trust_remote_code")))
            submit(job, actor, _pair(job))
        if not running:
            continue
        [ref], _ = ray.wait(list(running), num_returns=1)
        job, actor, pair, start = running.pop(ref)
        try:
            error = ray.get(ref)
            idle.append((actor, pair))
        except ray.exceptions.RayActorError as err:  # the worker died: a new one takes the next job
            error = f"the Ray worker died: {str(err).splitlines()[0]}"
        except ray.exceptions.RayTaskError as err:
            error = f"{type(err.cause).__name__}: {err.cause}" if err.cause else str(err).splitlines()[0]
            idle.append((actor, pair))
        if sweep.ended(job, error, time.monotonic() - start):
            pending.appendleft(job)
