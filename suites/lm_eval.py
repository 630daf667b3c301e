"""lm-evaluation-harness tasks as a decodebench suite: `decodebench run --suite lm-eval:TASK[,TASK...]`.

Each task is one item; for every method the runner hands it to harness/lm_eval_model.py (`run_task`), which
runs lm-eval's `simple_evaluate` through decodebench's lm-eval model: loglikelihood requests from the target
(through a composed cache policy), generations through the method, each generation a record of its own with
its cost and the document's score; the task's metrics (and lm-eval's standard errors) go in the task's
record (`metrics`), and the report tabulates task / metric / value / stderr per method.

Tasks shipped here (suites/lm_eval_tasks/, data written for the project, read offline):
- decodebench_prose_ppl: loglikelihood_rolling on the built-in prose (suites/data/prose.jsonl, the perplexity
  suite's text): word_perplexity, byte_perplexity, bits_per_byte as wikitext defines them;
- decodebench_mc: 32 everyday multiple-choice questions (acc, acc_norm);
- decodebench_gen: 30 short-answer questions, generate_until a newline, exact match.
A relative `data_files` path in a shipped task is relative to its YAML file (resolved here, so runs work from
any folder). `--data DIR` adds a folder of your own task YAMLs (lm-eval's include_path; their relative paths are
lm-eval's, relative to the working folder); any other name is one of lm-eval's own tasks, which usually needs
the network for its data. `--limit N` is lm-eval's limit (the first N documents of each task).
lm-eval is an optional extra (`pip install -e '.[eval]'`); without it this suite is a clear error.
"""
from __future__ import annotations

import hashlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from methods.base import Settings, setting
from suites.base import Item, Suite, SuiteDataError, register

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
SHIPPED = "decodebench_prose_ppl,decodebench_mc,decodebench_gen"


@dataclass
class LmEvalOptions(Settings):
    tasks: str = setting(SHIPPED, "comma-separated lm-eval task names (`--suite lm-eval:TASK,TASK` sets it)")
    num_fewshot: int = setting(-1, "few-shot examples per prompt (-1: each task's own setting)", low=-1, high=64)
    bootstrap_iters: int = setting(1000, "lm-eval's bootstrap resamples for standard errors (0: none)", low=0)


def task_files(folders: list[Path]) -> dict[str, Path]:
    """Task name -> YAML file, for the `task:` line of every YAML file in the folders (later folders win)."""
    found: dict[str, Path] = {}
    for folder in folders:
        for path in sorted(folder.glob("*.yaml")):
            match = re.search(r"^task:\s*['\"]?([^\s'\"#]+)", path.read_text(encoding="utf-8"), re.MULTILINE)
            if match:
                found[match.group(1)] = path
    return found


def _fingerprint(yaml_path: Path) -> str:
    """The YAML's bytes and those of every file it names next to it (its data): the task's identity."""
    digest = hashlib.sha256(yaml_path.read_bytes())
    text = yaml_path.read_text(encoding="utf-8")
    for name in sorted(set(re.findall(r"[\w./-]+\.(?:jsonl|json|csv|txt)", text))):
        data = (yaml_path.parent / name).resolve()
        if data.is_file():
            digest.update(name.encode() + data.read_bytes())
    return digest.hexdigest()


@register("lm-eval")
class LmEvalSuite(Suite):
    needs = "lm-eval"
    argument = "tasks"
    description = "lm-evaluation-harness tasks through decodebench's lm-eval model (lm-eval:TASK,TASK; shipped tasks offline)"
    Options = LmEvalOptions

    def __init__(self, data: str | None = None, tokenizer: Any = None, **options: Any) -> None:
        super().__init__(data, tokenizer, **options)
        if importlib.util.find_spec("lm_eval") is None:
            raise SuiteDataError("suite lm-eval needs lm-evaluation-harness: pip install -e '.[eval]' (or lm-eval)")
        if data is not None and not Path(data).is_dir():
            raise SuiteDataError(f"{data}: --data for suite lm-eval is a folder of task YAML files")
        self.folders = [TASKS_DIR] + ([Path(data)] if data else [])
        self.files = task_files(self.folders)
        self.names = list(dict.fromkeys(t.strip() for t in self.options.tasks.split(",") if t.strip()))
        if not self.names:
            raise SuiteDataError("suite lm-eval: no task named (e.g. lm-eval:decodebench_mc)")
        others = [name for name in self.names if name not in self.files]
        if others:  # lm-eval's own tasks: indexing them all takes seconds, so only when asked for
            from lm_eval.tasks import TaskManager

            unknown = [name for name in others if name not in TaskManager().all_tasks]
            if unknown:
                raise SuiteDataError(f"unknown lm-eval task(s) {', '.join(unknown)}; shipped here: "
                                     f"{', '.join(sorted(self.files))} (or any task lm-eval lists)")

    def items(self, limit: int | None = None) -> list[Item]:
        """One item per task (`limit` is lm-eval's, per task: the runner passes it on)."""
        items = []
        for name in self.names:
            path = self.files.get(name)
            meta = {"task": name, "source": str(path) if path else "lm-eval",
                    "sha256": _fingerprint(path) if path else None}
            items.append(Item(name, "lm-eval", (name,), None, meta=meta))
        return items

    def task_spec(self, name: str) -> str | dict:
        """What simple_evaluate gets for a task: a shipped task's config with its data paths made absolute
        (relative to its YAML file), else the name (found through the TaskManager's include path)."""
        path = self.files.get(name)
        if path is None or path.parent != TASKS_DIR:
            return name
        import yaml  # lm-eval's dependency

        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        files = (config.get("dataset_kwargs") or {}).get("data_files")
        if isinstance(files, dict):
            config["dataset_kwargs"]["data_files"] = {split: str((path.parent / f).resolve())
                                                      for split, f in files.items()}
        return config

    def task_manager(self) -> Any:
        from lm_eval.tasks import TaskManager

        ours = all(name in self.files for name in self.names)
        return TaskManager(include_path=[str(f) for f in self.folders], include_defaults=not ours)
