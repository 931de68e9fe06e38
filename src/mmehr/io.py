"""Atomic outputs: every file or directory is written under a temporary name and renamed when complete.

A later stage trusts a directory only if its manifest exists; the manifest is the last file written.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    Works for files and directories. An existing `path` is replaced only after success. What an earlier
    writer killed mid-way (SIGKILL, out of memory) left beside `path` is removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tag = f"{socket.gethostname()}-{os.getpid()}"
    tmp = path.with_name(f".{path.name}.tmp-{tag}")
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            old = path.with_name(f".{path.name}.old-{tag}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete what killed writers of `path` left beside it: `.NAME.tmp-HOST-PID` / `.NAME.old-HOST-PID`
    of this host whose process is gone. Another host's (a shared filesystem) and live ones are kept.
    Returns what was removed."""
    path, host, removed = Path(path), socket.gethostname(), []
    for kind in ("tmp", "old"):
        for p in path.parent.glob(f".{glob.escape(path.name)}.{kind}-{glob.escape(host)}-*"):
            pid = p.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented JSON atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def is_complete(directory: str | os.PathLike) -> bool:
    """A stage output directory is complete when its manifest exists."""
    return (Path(directory) / MANIFEST).is_file()


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Read a stage directory's manifest, failing clearly if the stage never finished."""
    directory = Path(directory)
    if not is_complete(directory):
        raise FileNotFoundError(
            f"{directory} has no {MANIFEST}: the stage that writes it did not finish (or this is the wrong "
            "directory). Rerun that stage."
        )
    return read_json(directory / MANIFEST)
