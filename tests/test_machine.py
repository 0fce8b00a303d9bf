"""The machine description and the wait for other kdpipe stages before timing."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from kdpipe import machine


def test_describe_names_the_cpu_flags_and_threads():
    info = machine.describe(threads=3)
    assert info["threads"] == 3 and info["cpu"] and info["cores"] >= 1
    assert set(info["flags"]) <= set(machine.KEY_FLAGS)
    flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
    assert info["flags"] == [f for f in machine.KEY_FLAGS if f in flags]


def test_other_stage_processes_sees_a_running_stage_script_but_not_itself():
    # a process whose command line is a kdpipe stage's (as dvc runs them)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "stages/train_teacher.py"])
    try:
        deadline = time.monotonic() + 10
        while proc.pid not in machine.other_stage_processes() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.pid in machine.other_stage_processes()
    finally:
        proc.kill()
        proc.wait()
    assert proc.pid not in machine.other_stage_processes()


def test_wait_until_alone_returns_once_the_others_finish():
    answers = iter([[11, 12], [12], []])
    assert machine.wait_until_alone(5.0, poll_s=0.01, others=lambda: next(answers)) == []


def test_wait_until_alone_gives_up_after_the_timeout_and_says_who_still_runs(capsys):
    start = time.monotonic()
    assert machine.wait_until_alone(0.2, poll_s=0.05, others=lambda: [99]) == [99]
    assert time.monotonic() - start < 2
    assert "PIDs 99" in capsys.readouterr().err
