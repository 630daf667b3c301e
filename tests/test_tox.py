"""tox: the env per registered method and per preset that toxfile.py generates (nothing hand-kept in tox.ini)."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.presets import PRESETS
from methods.base import registry

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def toxfile():
    pytest.importorskip("tox", reason="tox is not installed (pip install -e '.[dev]')")
    spec = importlib.util.spec_from_file_location("toxfile", REPO / "toxfile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_toxfile_reads_the_registry(toxfile):
    """toxfile.py reads `@register` decorators without importing torch; this is where a mismatch would show."""
    assert toxfile.method_names() == list(registry()), (
        "toxfile.method_names() (the @register(\"NAME\") decorators in methods/*.py) disagrees with "
        "methods.base.registry(): register the method with a literal name, or teach toxfile.py the new form")
    assert list(toxfile.presets()) == list(PRESETS)


def test_tox_lists_one_env_per_method_and_preset(toxfile):
    if shutil.which("tox") is None:
        pytest.skip("no tox command on PATH")
    listed = subprocess.run(["tox", "-l"], cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    envs = listed.stdout.split()
    assert envs[0] == "tests" and sorted(envs[1:]) == sorted([*registry(), *PRESETS])
    shown = subprocess.run(["tox", "config", "-e", "sps,ar,rdsca", "-k", "commands", "--", "--repeats", "2"], cwd=REPO,
                           capture_output=True, text=True, timeout=120, check=True).stdout
    assert "decodebench run --methods ar,sps --limit 1 --max-new-tokens 32 --out runs/tox-sps --repeats 2" in shown
    assert "decodebench run --methods ar --limit 1" in shown  # the baseline alone, not ar,ar
    assert "--methods ar,rdsca --suite icl" in shown  # a prompt restructurer runs on its suite
