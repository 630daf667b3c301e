"""A run folder's identity and its one writer.

Identity: the settings in manifest.json. Every command that writes into a folder compares them with its
own before any model loads, whether records are pending or not, and names each changed setting.
One writer: an exclusive OS lock (flock) on `.lock`, which dies with its process, so kill -9 never
leaves a stale lock behind; the holder's PID is written beside it for the refusal message.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

# settings a resumed run may change: no figure of a finished record depends on them
FREE_ON_RESUME = ("strict_counting", "trust_remote_code")


class RunFolderError(RuntimeError):
    """The folder cannot take this run: another writer holds it, or it holds a run with other settings."""


class RunFolder:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    # ---------------------------------------------------------------- one writer

    def lock(self) -> None:
        """Take the folder for this process, or raise RunFolderError naming the process that holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            os.close(fd)
            holder = self._holder()
            raise RunFolderError(f"{self.path} is being written by process {holder.get('pid', '?')} on "
                                 f"{holder.get('host', '?')} since {holder.get('since', '?')} "
                                 f"({holder.get('command', '?')}); wait for it, or use another --out") from None
        self._fd = fd
        (self.path / ".writer").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                       "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                       "command": " ".join(sys.argv)}))

    def _holder(self) -> dict:
        try:
            return json.loads((self.path / ".writer").read_text())
        except (OSError, ValueError):
            return {}

    def unlock(self) -> None:
        if self._fd is not None:
            (self.path / ".writer").unlink(missing_ok=True)
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None

    def __enter__(self):
        self.lock()
        return self

    def __exit__(self, *exc) -> None:
        self.unlock()

    # ---------------------------------------------------------------- identity

    def manifest(self) -> dict | None:
        path = self.path / "manifest.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError as err:
            raise RunFolderError(f"{path} is not valid JSON ({err}); move the folder aside or use another --out") from None

    def check(self, identity: dict) -> None:
        """Raise RunFolderError naming every setting in which this run differs from the folder's."""
        manifest = self.manifest()
        if manifest is None:
            return
        then = manifest.get("identity")
        if then is None:  # written before identities were kept: compare what the old manifest has
            then = {k: v for k, v in manifest.get("settings", {}).items() if k in identity}
        changed = [f"{key}: {_text(then[key])} -> {_text(identity[key])}"
                   for key in sorted(identity.keys() & then.keys()) if then[key] != identity[key]]
        if changed:
            raise RunFolderError(f"{self.path} holds a run with other settings: " + "; ".join(changed)
                                 + ". Use another --out, or --force-new to move that run aside and start again")

    def move_aside(self) -> Path | None:
        """--force-new: the old run goes to PATH.replaced-<time> (nothing is deleted)."""
        if not self.path.exists() or not any(self.path.iterdir()):
            return None
        (self.path / ".writer").unlink(missing_ok=True)  # it names this process, which stays with the new run
        aside = self.path.with_name(f"{self.path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while aside.exists():
            aside = aside.with_name(f"{aside.name.split('~')[0]}~{n}")
            n += 1
        self.path.rename(aside)
        return aside


def _text(value) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def identity(cfg, methods: dict, data_sha256: str | None) -> dict:
    """The flat settings that make a folder's records comparable: run settings by name (sampling's under
    their flag names), every knob of every method as METHOD.KNOB, and the suite data's hash."""
    from dataclasses import asdict

    flat = {}
    for key, value in asdict(cfg).items():
        if key in ("methods", "out", "settings", *FREE_ON_RESUME):
            continue
        if key == "sampling":
            flat.update(value)
        else:
            flat[key] = value
    from methods.common.cache_policy import method_parts

    for method in methods.values():
        for part in method_parts(method):  # a composition's decoder, policy and transform knobs, each by its name
            for knob, value in asdict(part.config).items():
                flat[f"{part.name}.{knob}"] = value
    flat["data_sha256"] = data_sha256
    return json.loads(json.dumps(flat, default=str))  # as the manifest stores it (tuples as lists)
