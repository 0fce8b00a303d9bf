"""One stage at a time per workspace, stale locks taken over, leftovers of a kill removed, and
a clean end on SIGTERM: real processes running a stage-like script."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdpipe.errors import KdpipeError
from kdpipe.workspace import LOCK_FILE, exclusive, leftovers

SRC = Path(__file__).resolve().parents[1] / "src"
# a stage script: takes the lock through kdpipe.stage.main, writes a temp file, then sleeps
STAGE = """
import sys, time
from pathlib import Path
from kdpipe.io import atomic_path
from kdpipe.stage import main

def body():
    with atomic_path(Path("metrics/out.json")) as tmp:
        tmp.write_text("{}")
        print("started", flush=True)
        time.sleep(float(sys.argv[1]))

main(body)
"""


def _start(tmp_path: Path, seconds: float) -> subprocess.Popen:
    script = tmp_path / "stages" / "train_teacher.py"
    script.parent.mkdir(exist_ok=True)
    script.write_text(STAGE)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen([sys.executable, "stages/train_teacher.py", str(seconds)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"
    return proc


def test_a_second_stage_in_the_same_workspace_is_refused(tmp_path, monkeypatch):
    proc = _start(tmp_path, 30)
    try:
        monkeypatch.chdir(tmp_path)
        with pytest.raises(KdpipeError, match=r"another kdpipe stage \(stages/train_teacher.py, PID \d+\) is running "
                                              r"in this workspace.*dvc exp run --queue"):
            with exclusive("stages/evaluate.py"):
                pass
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_stage_leaves_a_stale_lock_that_the_next_one_takes_over_and_cleans(tmp_path, monkeypatch, capsys):
    proc = _start(tmp_path, 30)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    monkeypatch.chdir(tmp_path)
    assert LOCK_FILE.exists() and leftovers()  # the temp file of the half-written output
    with exclusive("stages/evaluate.py"):
        assert json.loads(LOCK_FILE.read_text())["pid"] == os.getpid()
        assert leftovers() == []
    assert "removed 1 temporary file(s) left by an interrupted stage" in capsys.readouterr().err
    assert not LOCK_FILE.exists()


def test_sigterm_ends_the_stage_cleanly(tmp_path):
    proc = _start(tmp_path, 30)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and "terminated; a re-run resumes" in err
    assert not (tmp_path / LOCK_FILE).exists()
    assert list((tmp_path / "metrics").iterdir()) == []  # the temp file was removed, nothing half-written
