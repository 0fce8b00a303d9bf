"""File helpers (kdpipe.io): streamed file hashing, atomic writes and their permissions."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from kdpipe.io import file_digest
from tests.data_fixtures import md5


def test_file_digest_streams_md5_and_sha256(tmp_path):
    path = tmp_path / "f.bin"
    data = bytes(range(256)) * 9000  # > 2 MiB: several 1 MiB chunks
    path.write_bytes(data)
    assert file_digest(path, "md5") == hashlib.md5(data).hexdigest() == md5(path)
    assert file_digest(path) == hashlib.sha256(data).hexdigest()


def test_save_torch_writes_the_same_bytes_for_the_same_object(tmp_path):
    """DVC hashes outputs: re-saving an unchanged model or split must not change its bytes
    (torch names a zip archive's root folder after the file it is given: the temporary name)."""
    import time

    import torch

    from kdpipe.io import load_torch, save_torch

    obj = {"weights": torch.arange(12.0).reshape(3, 4), "names": ["a", "b"]}
    save_torch(tmp_path / "one.pt", obj)
    time.sleep(1.1)  # zip entries carry no time that could differ
    save_torch(tmp_path / "two.pt", obj)
    assert (tmp_path / "one.pt").read_bytes() == (tmp_path / "two.pt").read_bytes()
    loaded = load_torch(tmp_path / "two.pt")
    assert torch.equal(loaded["weights"], obj["weights"]) and loaded["names"] == ["a", "b"]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_outputs_get_the_usual_permissions_not_owner_only(tmp_path, umask):
    """Atomic writes used tempfile.mkstemp, whose files are 0600 whatever the umask."""
    from kdpipe.data.fetch import download_file
    from kdpipe.io import atomic_dir, save_torch, write_csv, write_json

    write_json(tmp_path / "metrics/m.json", {"a": 1})
    write_csv(tmp_path / "plots/p.csv", [{"a": 1}])
    save_torch(tmp_path / "models/m.pt", {"w": 1})
    with atomic_dir(tmp_path / "cache") as tmp:
        (tmp / "meta.json").write_text("{}")
    source = tmp_path / "source.bin"
    source.write_bytes(b"data")
    download_file(str(source), tmp_path / "raw/source.bin", hashlib.md5(b"data").hexdigest(), "data.x")
    for name in ("metrics/m.json", "plots/p.csv", "models/m.pt", "cache/meta.json", "raw/source.bin"):
        assert _mode(tmp_path / name) == 0o666 & ~umask, name  # 0644 under umask 022, 0600 under 077
    assert _mode(tmp_path / "cache") == 0o777 & ~umask
    assert sorted(p.name for p in tmp_path.rglob(".*")) == []  # no temporary file or folder left


def test_atomic_writes_leave_the_old_output_when_they_fail(tmp_path):
    from kdpipe.io import atomic_dir, atomic_path

    (tmp_path / "out.txt").write_text("old")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir/f").write_text("old")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "out.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "dir") as tmp:
        (tmp / "g").write_text("half")
        raise RuntimeError
    assert (tmp_path / "out.txt").read_text() == "old" and [p.name for p in (tmp_path / "dir").iterdir()] == ["f"]
    with atomic_dir(tmp_path / "dir") as tmp:
        (tmp / "g").write_text("new")
    assert [p.name for p in (tmp_path / "dir").iterdir()] == ["g"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "out.txt"]


@pytest.mark.e2e
def test_the_restore_hint_of_a_damaged_output_restores_it_with_real_dvc(tmp_path):
    """The sentence a truncated model or split ends with must work as written: plain
    ``dvc checkout <path>`` refuses to overwrite a changed file, so the hint carries ``--force``
    (and quotes a path with a space)."""
    import re
    import shlex
    import subprocess
    import sys

    from kdpipe.errors import KdpipeError
    from kdpipe.io import load_torch

    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "DVC_NO_ANALYTICS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("DVC_ROOT", None)

    def run(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)  # plain checkout would otherwise ask on a terminal

    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  save:\n    cmd: python -c \"import torch; from kdpipe.io import save_torch; "
        "save_torch('my model.pt', dict(w=torch.arange(6.0)))\"\n    outs:\n      - my model.pt\n")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "repro", "-q"]):
        assert run(*cmd).returncode == 0, cmd
    model = tmp_path / "my model.pt"
    good = model.read_bytes()
    model.write_bytes(good[: len(good) // 2])
    with pytest.raises(KdpipeError) as refused:
        load_torch(model)
    hint = re.search(r"restore it with `([^`]+)`", str(refused.value)).group(1)
    assert shlex.split(hint) == ["dvc", "checkout", "--force", str(model)]
    assert run("dvc", "checkout", str(model)).returncode != 0  # without --force DVC asks, and refuses here
    assert run(*shlex.split(hint)).returncode == 0
    assert model.read_bytes() == good
