"""tox plugin (tox >= 4.29 loads a project's toxfile.py by itself): one env per registered method and one per
preset, generated, so that tox.ini keeps no list of them.

Method names are read from the `@register("NAME")` decorators in methods/*.py without importing them (tox's
own Python may lack torch); tests/test_tox.py checks they equal `methods.base.registry()`. Presets are
read from harness/presets.py (plain dataclasses, no torch). Each generated env inherits the `[method]`
section of tox.ini (deps, models to install) and gets its command here:

    tox -e NAME                 NAME against ar on the embedded Qwen pair (one item per category, 32 tokens)
    tox -e PRESET               decodebench run --preset PRESET on the same pair
    tox -e sps -- --limit 2     anything after -- is passed on to `decodebench run`
"""
from __future__ import annotations

import ast
import configparser
import importlib.util
import sys
from functools import cache
from pathlib import Path

from tox.config.loader.memory import MemoryLoader
from tox.config.types import Command, EnvList
from tox.plugin import impl

ROOT = Path(__file__).resolve().parent
SMALL = ["--limit", "1", "--max-new-tokens", "32"]
# methods whose items come from another suite than specbench: prompt restructurers read the suite's item meta
SUITE_ARGS = {
    "jrt_prompt": ["--suite", "longctx", "--tasks", "niah_single", "--lengths", "1k", "--max-new-tokens", "16"],
    "rdsca": ["--suite", "icl", "--limit", "1", "--max-new-tokens", "8"],
}
# presets that compare under sampling (see their descriptions in harness/presets.py)
PRESET_ARGS = {"beams": ["--temperature", "1", "--top-k", "10", "--top-p", "0.9"]}


def method_names(folder: Path = ROOT / "methods") -> list[str]:
    """Every NAME of a `@register("NAME")` decorator in the method files, sorted as the registry sorts."""
    names = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            for decorator in getattr(node, "decorator_list", []):
                if (isinstance(decorator, ast.Call) and getattr(decorator.func, "id", None) == "register"
                        and decorator.args and isinstance(decorator.args[0], ast.Constant)):
                    names.append(decorator.args[0].value)
    return sorted(names)


@cache
def presets() -> dict:
    spec = importlib.util.spec_from_file_location("decodebench_presets", ROOT / "harness" / "presets.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.PRESETS


def method_command(name: str) -> list[str]:
    methods = name if name == "ar" else f"ar,{name}"
    return ["decodebench", "run", "--methods", methods, *SUITE_ARGS.get(name, SMALL), "--out", f"runs/tox-{name}"]


def preset_command(name: str) -> list[str]:
    return ["decodebench", "run", "--preset", name, *SMALL, *PRESET_ARGS.get(name, []), "--out", f"runs/tox-{name}"]


@cache
def generated() -> dict[str, tuple[str, list[str]]]:
    """env name -> (description, command without posargs)."""
    envs = {name: (f"{name} against ar on the embedded Qwen pair (generated from the method registry)",
                   method_command(name)) for name in method_names()}
    for name, preset in presets().items():
        envs[name] = (f"preset {name}: {preset.description}", preset_command(name))
    return envs


@impl
def tox_extend_envs() -> list[str]:
    return list(generated())


@impl
def tox_add_core_config(core_conf, state) -> None:
    # the default list (`tox -l`, and what a bare `tox` runs): tox.ini's env_list, then every generated env
    listed = configparser.ConfigParser(interpolation=None)
    listed.read(ROOT / "tox.ini", encoding="utf-8")
    ini_list = [e.strip() for e in listed.get("tox", "env_list", fallback="").replace(",", "\n").split()]
    core_conf.loaders.insert(0, MemoryLoader(env_list=EnvList([*ini_list, *generated()])))
    posargs = list(state.conf.pos_args(None) or [])
    for name, (description, command) in generated().items():
        state.conf.memory_seed_loaders[name].append(
            MemoryLoader(base=["method", "testenv"], description=description, commands=[Command([*command, *posargs])],
                         labels=["presets" if name in presets() else "methods"]))
