"""Atomic outputs: every file or directory is written under a temporary name and renamed when complete.

A later stage trusts a directory only if its manifest exists; the manifest is the last file written.

Outputs never destroy what they do not own. Each stage's manifest names the stage (`"stage": "tokenize"`);
a stage that builds its output in place (encode, train, evaluate, ablate, demo) marks the directory as
its own when it starts (`.mmehr-stage.json`) and holds a lock on it while it writes (`.mmehr-lock`).
`check_output` lets a stage write only an absent or empty directory or its own earlier output, and
never one that is, lies inside or contains one of its inputs.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import glob
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
STAGE_MARK = ".mmehr-stage.json"  # an in-place output's owner, written when the stage starts it
LOCK = ".mmehr-lock"


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, *, stage: str | None = None, inputs: Iterable[str | os.PathLike | None] = ()
) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    Works for files and directories. An existing file is replaced only after success. An existing
    directory is replaced only when it is a complete output of `stage` (`check_output`, which also
    refuses a `path` that is, lies inside or contains one of `inputs`); anything else is refused
    before the block runs. What an earlier writer killed mid-way (SIGKILL, out of memory) left beside
    `path` is removed first.
    """
    path = Path(path)
    if stage is not None:
        check_output(path, stage, inputs=inputs)
    elif path.is_dir() and any(path.iterdir()):
        raise ValueError(f"{path} is a directory holding {describe(path)}; refusing to replace it")
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
    """Parsed JSON of `path`; a file that is not UTF-8 JSON fails with an error naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a JSON text file (byte {e.start} is not UTF-8)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


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


# ----------------------------------------------------------------------------------------------------
# Which stage owns a directory, and which outputs a stage may write


def stage_of(directory: str | os.PathLike) -> str | None:
    """The mmehr stage that wrote `directory`: its manifest's `stage` when complete, else the stage that
    marked it while building it in place; None for anything else (a user's folder, an unreadable manifest).

    Outputs written before manifests named their stage are recognised by their layout."""
    d = Path(directory)
    for name in (MANIFEST, STAGE_MARK):
        if (d / name).is_file():
            try:
                record = read_json(d / name)
            except (OSError, ValueError):
                return None
            if isinstance(record, dict) and isinstance(record.get("stage"), str):
                return record["stage"]
            if name == MANIFEST and isinstance(record, dict):
                if {"encoder", "d_enc"} <= set(record):
                    return "encode"
                if "grid" in record:
                    return "ablate"
                if "final_checkpoint" in record:
                    return "train"
    if (d / "settings.json").is_file() and (d / "parts").is_dir():
        return "encode"  # a store being encoded
    checkpoints = d / "checkpoints"
    if (
        (d / "config.yaml").is_file()
        and checkpoints.is_dir()
        and any(stage_of(c) == "checkpoint" for c in checkpoints.iterdir() if c.is_dir())
    ):
        return "train"  # a run being trained
    demo = {"synth", "timelines", "events", "stores", "grid.yaml", "experiments", "demo.json", LOCK}
    if (d / "synth").is_dir() and {p.name for p in d.iterdir()} <= demo and stage_of(d / "synth") == "synth":
        return "demo"  # `mmehr demo`'s layout, from before it marked its output
    return None


def describe(directory: str | os.PathLike) -> str:
    """What a directory holds, in words, for an error message."""
    d = Path(directory)
    stage = stage_of(d)
    if stage == "checkpoint":
        return "a training checkpoint"
    if stage is not None:
        return f"{'a complete' if is_complete(d) else 'an unfinished'} `mmehr {stage}` output"
    names = sorted(p.name for p in d.iterdir())
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"{len(names)} entr{'y' if len(names) == 1 else 'ies'} that mmehr did not write ({shown})"


def check_output(
    out: str | os.PathLike, stage: str, *, inputs: Iterable[str | os.PathLike | None] = ()
) -> Path:
    """Refuse an output directory that `stage` must not write; returns it.

    Refused: an `out` that is, lies inside or contains one of `inputs` (writing it would destroy or
    mix with an input), a file, and a non-empty directory that `stage` did not write (a user's folder,
    another stage's output). Accepted: an absent or empty directory, and `stage`'s own output (complete,
    to be replaced, or unfinished, to be resumed)."""
    out = Path(out)
    real = out.resolve()
    for given in inputs:
        if given is None or str(given) == "":
            continue
        source = Path(given).resolve()
        if real == source:
            where = "is"
        elif source in real.parents:
            where = "lies inside"
        elif real in source.parents:
            where = "contains"
        else:
            continue
        raise ValueError(
            f"--out {out} {where} the input {given}: `mmehr {stage}` would overwrite or mix with its own "
            "input. Nothing was written; choose an --out outside it."
        )
    if real.exists() and not real.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory; nothing was written")
    if real.is_dir() and any(p.name != LOCK for p in real.iterdir()) and stage_of(real) != stage:
        raise ValueError(
            f"--out {out} already holds {describe(real)}; `mmehr {stage}` replaces only its own output. "
            f"Nothing was written: choose another --out, or empty {out} yourself."
        )
    return out


def mark_output(out: str | os.PathLike, stage: str) -> Path:
    """Create `out` if needed and mark it as `stage`'s output in progress (see `check_output`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mark = out / STAGE_MARK
    if not mark.is_file() or stage_of(out) != stage:
        write_json(mark, {"stage": stage, "started_at": _now()})
    return out


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


class OutputLock:
    """An exclusive lock on an output directory (flock on `DIR/.mmehr-lock`), released by `release()`,
    on leaving a `with` block, or when the process ends (however it ends: a kill leaves no stale lock)."""

    def __init__(self, directory: str | os.PathLike, stage: str):
        self.path = Path(directory) / LOCK
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")  # noqa: SIM115 (held until release: the lock is the open file)
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise RuntimeError(
                f"{directory} is being written by {holder}; wait for it to finish, or choose another --out"
            ) from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"`mmehr {stage}` (pid {os.getpid()} on {socket.gethostname()}, since {_now()})")
        self.file.flush()

    def release(self) -> None:
        if not self.file.closed:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
