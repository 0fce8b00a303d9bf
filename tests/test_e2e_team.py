"""Scaling out, end to end with real dvc and a real ``mlflow server`` (README "Scaling out"):

* ``dvc push`` to a local-folder remote, then a fresh ``git clone`` + ``dvc pull`` is up to date:
  ``dvc status`` clean, ``dvc repro`` runs nothing, ``dvc metrics diff`` empty;
* ``kdpipe sweep`` queues three tiny experiments and runs them with ``dvc queue start -j 2``;
  every one logs to a tracking server on 127.0.0.1 (SQLite backend, proxied artifacts) that the
  workers reach through ``MLFLOW_TRACKING_URI``: one parent run per experiment with its stage
  run nested, none lost, none duplicated, nothing in the project's own store.

Both reuse the reproduced project of test_e2e_kd_methods.py (conftest.kd_methods_project): no
pipeline run of their own besides the three experiments.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

# Grid points no other test runs (a point run before would come from DVC's run cache, logging nothing).
TEMPERATURES, ALPHA = (2, 3, 6), 0.7
NAMES = [f"sweep-T{t}-a{ALPHA}" for t in TEMPERATURES]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """An ``mlflow server`` process starting up; :meth:`ready` waits for its /health."""

    def __init__(self, proc: subprocess.Popen, uri: str, log: Path) -> None:
        self.proc, self.uri, self.log = proc, uri, log

    def ready(self, timeout_s: float = 300) -> str:  # ~10 s on an idle box; minutes on a loaded 2-core one
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=5).close()
                return self.uri
            except OSError:
                assert self.proc.poll() is None, self.log.read_text()[-3000:]
                assert time.monotonic() < deadline, f"mlflow server did not answer /health within {timeout_s:g} s"
                time.sleep(0.5)


@pytest.fixture(scope="module", autouse=True)
def mlflow_server(tmp_path_factory) -> Server:
    """``mlflow server`` on 127.0.0.1 with a SQLite backend and proxied artifacts (as ``make server``),
    started when this module starts, so that it boots while the remote test runs; stopped (its
    whole process group) at teardown."""
    folder = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    with open(folder / "server.log", "w") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
             f"sqlite:///{folder}/mlflow.db", "--artifacts-destination", str(folder / "artifacts"),
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield Server(proc, f"http://127.0.0.1:{port}", folder / "server.log")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=3)  # its data is thrown away: no need for a clean shutdown
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_push_to_a_local_remote_and_pull_in_a_fresh_clone_leaves_nothing_to_run(kd_methods_project, tmp_path):
    root, env = kd_methods_project
    remote = tmp_path / "dvc-remote"
    _run(["dvc", "remote", "add", "-d", "shared", str(remote)], root, env)
    _run(["git", "commit", "-qm", "DVC remote", ".dvc/config"], root, env)
    _run(["dvc", "push"], root, env)
    assert any(remote.rglob("*")), "dvc push wrote nothing"

    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(root), str(clone)], tmp_path, env)
    assert not (clone / "models" / "teacher.pt").exists()  # the models are DVC's, not git's
    _run(["dvc", "pull"], clone, env)
    for model in ("teacher", "baseline", "distilled_logit"):
        assert (clone / "models" / f"{model}.pt").read_bytes() == (root / "models" / f"{model}.pt").read_bytes()
    status = _run(["dvc", "status"], clone, env).stdout
    assert "Data and pipelines are up to date." in status, status
    repro = _run(["dvc", "repro"], clone, env).stdout
    assert "Running stage" not in repro, repro
    assert _run(["dvc", "metrics", "diff"], clone, env).stdout.strip() == ""
    assert _run(["git", "status", "--porcelain"], clone, env).stdout == ""


def test_three_queued_experiments_on_two_workers_all_log_to_the_server(kd_methods_project, mlflow_server):
    """Each experiment runs check_params, kd_settings and distill@logit (the target: the least that
    trains under MLflow) in its own temporary copy, two at a time."""
    from mlflow.tracking import MlflowClient

    root, env = kd_methods_project
    uri = mlflow_server.ready()
    env = {**env, "MLFLOW_TRACKING_URI": uri}
    began = time.monotonic()
    try:
        out = _run([sys.executable, "-m", "kdpipe.cli", "sweep", "--temperatures", ",".join(map(str, TEMPERATURES)),
                    "--alphas", str(ALPHA), "--jobs", "2", "--target", "distill@logit", "--timeout", "1200",
                    "--repo", str(root)], root, env, timeout=1300)
        print(f"3 experiments, dvc queue start -j 2: {time.monotonic() - began:.0f} s")
        assert f"MLflow: the experiments log to {uri}" in out.stdout and "3 sweep experiments finished" in out.stdout

        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("kdpipe")
        assert experiment.artifact_location.startswith("mlflow-artifacts:")  # artifacts proxied by the server
        runs = client.search_runs([experiment.experiment_id], max_results=1000)
        assert sorted(r.data.tags.get("dvc_exp_name") for r in runs) == sorted(NAMES * 2), \
            [(r.info.run_name, r.data.tags.get("dvc_exp_name")) for r in runs]  # a parent and a stage run each
        for name in NAMES:
            mine = [r for r in runs if r.data.tags["dvc_exp_name"] == name]
            (parent,) = [r for r in mine if r.data.tags.get("kdpipe.run_kind") == "pipeline"]
            (stage,) = [r for r in mine if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
            assert (parent.info.run_name, stage.info.run_name) == (name, "distill@logit")
            assert {r.info.status for r in mine} == {"FINISHED"}
            assert name == f"sweep-T{float(stage.data.params['kd.temperature']):g}-a{ALPHA}"
            assert parent.data.params["kd.temperature"] == stage.data.params["kd.temperature"]
            history = client.get_metric_history(stage.info.run_id, "val_acc")
            assert [m.step for m in history] == [1]  # its one epoch, logged once
        with sqlite3.connect(root / "mlflow.db") as db:  # the project's own store got none of them
            assert db.execute("SELECT count(*) FROM tags WHERE key = 'dvc_exp_name' AND value LIKE 'sweep-T%'"
                              ).fetchone() == (0,)
    finally:
        subprocess.run(["dvc", "exp", "remove", *NAMES], cwd=root, env=env, capture_output=True, timeout=300)
