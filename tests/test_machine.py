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


def test_two_timing_stages_take_turns_instead_of_waiting_for_each_other(tmp_path, monkeypatch):
    """Parallel experiments (dvc queue start -j 2): two evaluates used to wait for each other until
    their timeout; now the second waits for the first one's turn only, then times alone."""
    import threading

    monkeypatch.setattr(machine, "_turn_dir", lambda: tmp_path)
    monkeypatch.setattr(machine, "other_stage_processes", lambda: [])
    spans = {}

    def stage(name, hold_s):
        with machine.timing_conditions(30.0, 1):
            start = time.monotonic()
            time.sleep(hold_s)
            spans[name] = (start, time.monotonic())

    first = threading.Thread(target=stage, args=("first", 0.5))
    first.start()
    while not (tmp_path / "turn.lock").exists():
        time.sleep(0.01)
    time.sleep(0.1)
    began = time.monotonic()
    stage("second", 0.0)
    first.join()
    assert spans["second"][0] >= spans["first"][1]  # one after the other
    assert spans["second"][0] - began < 5.0  # not the 30 s timeout
    assert machine.waiting_for_turn() == set()


def test_a_stage_waiting_for_the_turn_is_not_waited_for(tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "_turn_dir", lambda: tmp_path)
    monkeypatch.setattr(machine, "other_stage_processes", lambda: [101, 102])
    (tmp_path / "waiting").mkdir()
    (tmp_path / "waiting" / "102").touch()
    assert machine._others_not_waiting() == [101]
    with machine.timing_turn(1.0) as taken:  # held here: another caller gives up after its timeout
        assert taken
        with machine.timing_turn(0.2, poll_s=0.05) as second:
            assert not second
    assert machine.waiting_for_turn() == {102}
