import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mmehr.config import ConfigError, apply_overrides, from_dict, load_config, save_config
from mmehr.io import OutputLock, atomic_path, check_output, is_complete, read_json, read_manifest, write_json


@dataclasses.dataclass
class Inner:
    k: int = 8
    method: str = "latent"


@dataclasses.dataclass
class Outer:
    name: str = "x"
    lr: float = 1e-3
    layers: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    inner: Inner = dataclasses.field(default_factory=Inner)
    flag: bool = False


def test_atomic_path_leaves_nothing_when_the_block_fails(tmp_path: Path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "half.npy").write_bytes(b"123")
        raise RuntimeError("interrupted")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_removes_what_a_killed_writer_left_and_nothing_else(tmp_path: Path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process that is gone, as after SIGKILL
    host = socket.gethostname()
    stale = tmp_path / f".out.tmp-{host}-{dead.pid}"
    (stale / "part").mkdir(parents=True)
    old = tmp_path / f".out.old-{host}-{dead.pid}"
    old.mkdir()
    live = tmp_path / f".out.tmp-{host}-{os.getppid()}"  # a live process: maybe writing right now
    live.mkdir()
    other = tmp_path / f".out.tmp-elsewhere-{dead.pid}"  # another host's, on a shared filesystem
    other.mkdir()
    sibling = tmp_path / f".other.tmp-{host}-{dead.pid}"
    sibling.mkdir()
    with atomic_path(tmp_path / "out") as tmp:
        tmp.mkdir()
        (tmp / "x").write_text("done")
    assert (tmp_path / "out" / "x").read_text() == "done"
    assert not stale.exists() and not old.exists()
    assert live.is_dir() and other.is_dir() and sibling.is_dir()


def test_atomic_path_replaces_a_directory_only_on_success(tmp_path: Path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("old")
    write_json(target / "manifest.json", {"stage": "tokenize"})  # a complete output of the same stage
    with atomic_path(target, stage="tokenize") as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new"]


def test_atomic_path_never_replaces_a_directory_it_does_not_own(tmp_path: Path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("precious")
    with (
        pytest.raises(ValueError, match=r"already holds 1 entry that mmehr did not write \(thesis.tex\)"),
        atomic_path(user, stage="tokenize") as tmp,
    ):
        tmp.mkdir()
    with pytest.raises(ValueError, match="refusing to replace it"), atomic_path(user) as tmp:
        tmp.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    write_json(other / "manifest.json", {"stage": "index"})
    with (
        pytest.raises(ValueError, match="already holds a complete `mmehr index` output"),
        atomic_path(other, stage="tokenize") as tmp,
    ):
        tmp.mkdir()
    assert (user / "thesis.tex").read_text() == "precious" and (other / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "user"]  # no temporaries left


@pytest.mark.parametrize(("out", "where"), [("data", "is"), ("data/sub", "lies inside"), (".", "contains")])
def test_an_output_that_is_inside_or_contains_an_input_is_refused(tmp_path: Path, out: str, where: str):
    (tmp_path / "data").mkdir()
    with pytest.raises(ValueError, match=f"{where} the input"):
        check_output(tmp_path / out, "tokenize", inputs=[tmp_path / "data"])


def test_output_lock_names_its_holder_and_is_released(tmp_path: Path):
    with (
        OutputLock(tmp_path, "encode"),
        pytest.raises(RuntimeError, match=rf"is being written by `mmehr encode` \(pid {os.getpid()} "),
    ):
        OutputLock(tmp_path, "encode")
    with OutputLock(tmp_path, "encode"):  # released on leaving the block
        pass


def test_read_json_names_a_file_that_is_not_json(tmp_path: Path):
    (tmp_path / "a.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=r"a.json: not a JSON text file \(byte 0 is not UTF-8\)"):
        read_json(tmp_path / "a.json")
    (tmp_path / "b.json").write_text('{"a": 1,')
    with pytest.raises(ValueError, match=r"b.json: not valid JSON \(line 1"):
        read_json(tmp_path / "b.json")


def test_manifest_marks_completion(tmp_path: Path):
    assert not is_complete(tmp_path)
    with pytest.raises(FileNotFoundError, match="did not finish"):
        read_manifest(tmp_path)
    write_json(tmp_path / "manifest.json", {"a": 1})
    assert read_manifest(tmp_path) == {"a": 1}
    assert read_json(tmp_path / "manifest.json")["a"] == 1


def test_config_from_yaml_with_overrides(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("name: run\nlr: 3e-4\ninner:\n  k: 16\n")
    cfg = load_config(Outer, f, ["inner.method=mean", "layers=[4, 5]", "flag=true"])
    assert cfg == Outer(name="run", lr=3e-4, layers=[4, 5], inner=Inner(k=16, method="mean"), flag=True)
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(Outer, tmp_path / "saved.yaml") == cfg


def test_config_rejects_unknown_keys_and_bad_types():
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(Outer, {"nme": "typo"})
    with pytest.raises(ConfigError, match="expected an integer"):
        from_dict(Outer, {"inner": {"k": 2.5}})
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["novalue"])
