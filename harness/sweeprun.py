"""Running a sweep's jobs into one sweep folder, resumable:

    SWEEP/sweep.jsonl       one line per job: id, settings, status (pending/running/done/failed), attempts, error
    SWEEP/jobs/<id>/        the job's run folder (results.jsonl, manifest.json: `run`'s resume rule and lock)
    SWEEP/logs/<id>.log     what the job printed, every attempt appended

A re-run skips done jobs, and a job that runs again resumes its own records. A job that fails (it raised, its
process died, or some of its records failed) is tried again up to `retries` times, then recorded as failed with
its error. Executors: `local` (one subprocess per job, one after another; a job's process dies with the sweep's)
and `ray` (harness/sweep_ray.py). The sweep folder has one driver at a time (runfolder's lock).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from harness.console import escape, progress
from harness.runfolder import RunFolder
from harness.sweep import Job, describe, varying

REPO = Path(__file__).resolve().parent.parent
STATUSES = ("pending", "running", "done", "failed")


class SweepState:
    """sweep.jsonl: every job's status, rewritten whole (temporary file, fsync, rename) at each change, so a
    kill at any moment leaves the old state or the new one."""

    def __init__(self, folder: Path, jobs: list[Job]) -> None:
        self.path = Path(folder) / "sweep.jsonl"
        self.rows: dict[str, dict] = {row["job"]: row for row in read_state(self.path)}
        for job in jobs:
            row = self.rows.setdefault(job.id, {"job": job.id, "settings": job.settings, "status": "pending",
                                                "attempts": 0, "error": None})
            if row["status"] == "running":  # its driver was killed mid-job: the job resumes
                row["status"] = "pending"
        self._write()

    def set(self, job_id: str, **fields) -> None:
        self.rows[job_id].update(fields)
        self._write()

    def count(self, status: str, ids: set[str] | None = None) -> int:
        return sum(r["status"] == status for r in self.rows.values() if ids is None or r["job"] in ids)

    def _write(self) -> None:
        tmp = self.path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in self.rows.values())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def read_state(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class Sweep:
    """One invocation of a sweep over `jobs` into `folder`, with `retries` more tries for a failing job."""

    def __init__(self, jobs: list[Job], folder: Path, console, retries: int = 1) -> None:
        self.jobs, self.console, self.retries = jobs, console, retries
        self.folder = Path(folder).resolve()  # a Ray worker may run elsewhere
        self.keys = varying(jobs)
        self.tries: dict[str, int] = {}  # attempts in this invocation, by job

    def job_dir(self, job: Job) -> Path:
        return self.folder / "jobs" / job.id

    def log(self, job: Job) -> Path:
        return self.folder / "logs" / f"{job.id}.log"

    def run(self, executor: str = "local", **options) -> dict:
        """Run every job not yet done; the counts of jobs by status afterwards."""
        with RunFolder(self.folder):
            (self.folder / "logs").mkdir(parents=True, exist_ok=True)
            self.state = SweepState(self.folder, self.jobs)
            todo = [j for j in self.jobs if self.state.rows[j.id]["status"] != "done"]
            ids = {j.id for j in self.jobs}
            if len(todo) < len(self.jobs):
                self.console.print(f"resuming: {len(self.jobs) - len(todo)} of {len(self.jobs)} jobs already done")
            if todo:
                with progress(self.console) as bar:
                    self.bar, self.task = bar, bar.add_task(self._summary(ids), total=len(self.jobs))
                    bar.advance(self.task, len(self.jobs) - len(todo))
                    if executor == "ray":
                        from harness.sweep_ray import run_ray

                        run_ray(self, todo, **options)
                    else:
                        run_local(self, todo)
            return {status: self.state.count(status, ids) for status in STATUSES}

    # what an executor calls as jobs start and end

    def started(self, job: Job) -> None:
        self.state.set(job.id, status="running")
        self._show()

    def ended(self, job: Job, error: str | None, seconds: float) -> bool:
        """Record one attempt; True when the job should be tried again."""
        row = self.state.rows[job.id]
        attempts = row["attempts"] + 1
        self.tries[job.id] = self.tries.get(job.id, 0) + 1
        label = describe(job.settings, self.keys)
        if error is None:
            self.state.set(job.id, status="done", attempts=attempts, error=None, seconds=round(seconds, 1))
            self.console.print(f"[green]done[/] {job.id} {escape(label)} ({seconds:.0f} s)")
            self.bar.advance(self.task)
            self._show()
            return False
        again = self.tries[job.id] <= self.retries
        self.state.set(job.id, status="pending" if again else "failed", attempts=attempts, error=error,
                       seconds=round(seconds, 1))
        self.console.print(f"[{'yellow' if again else 'red'}]{'failed, trying again' if again else 'FAILED'}[/] "
                           f"{job.id} {escape(label)}: {escape(error)} (log: {self.log(job)})")
        if not again:
            self.bar.advance(self.task)
        self._show()
        return again

    def _summary(self, ids: set[str] | None = None) -> str:
        ids = ids or {j.id for j in self.jobs}
        counts = {s: self.state.count(s, ids) for s in STATUSES}
        return (f"sweep: {counts['done']} done, {counts['running']} running, {counts['failed']} failed, "
                f"{counts['pending']} pending")

    def _show(self) -> None:
        self.bar.update(self.task, description=self._summary())


# ------------------------------------------------------------------ local: one subprocess per job

def run_local(sweep: Sweep, todo: list[Job]) -> None:
    for job in todo:
        again = True
        while again:
            sweep.started(job)
            start = time.monotonic()
            error = _local_attempt(sweep, job)
            again = sweep.ended(job, error, time.monotonic() - start)


def _local_attempt(sweep: Sweep, job: Job) -> str | None:
    """`decodebench run` for the job in a child process; None when every record succeeded, else what failed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "harness.sweeprun", str(os.getpid()), "run", *job.run_argv(sweep.job_dir(job))]
    log_path = sweep.log(job)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
        log.flush()
        offset = log.tell()
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            code = child.wait()
        except BaseException:  # Ctrl-C (which the child also got) or SIGTERM: the child goes with the sweep
            child.terminate()
            child.wait()
            raise
    if code == 0:
        return None
    with open(log_path, encoding="utf-8", errors="replace") as log:
        log.seek(offset)
        return _failure(code, log.read())


def _failure(code: int, output: str) -> str:
    """The line of `run`'s output that says what failed, with the exit code (or the signal that killed it)."""
    said = [line.strip() for line in output.splitlines()
            if line.strip().startswith("error:") or "records failed" in line or "every record failed" in line]
    why = f"killed by signal {-code}" if code < 0 else f"exit {code}"
    lines = [line for line in output.splitlines() if line.strip()]
    return f"{why}: {said[-1] if said else (lines[-1].strip() if lines else 'no output')}"


def _die_with_parent(parent: int) -> None:
    """Ask the kernel to kill this process when the sweep's process dies, even by SIGKILL, so a re-run never
    meets a job still writing from the killed sweep (Linux; elsewhere such a job ends on its own)."""
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the sweep died before prctl took effect
        os._exit(EXIT_ORPHANED)


EXIT_ORPHANED = 137

if __name__ == "__main__":  # a local job: python -m harness.sweeprun SWEEP_PID run ARGS...
    _die_with_parent(int(sys.argv[1]))
    from harness.cli import main

    sys.exit(main(sys.argv[2:]))
