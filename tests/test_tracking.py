"""MLflow tracking: one run per stage nested under one parent run per pipeline execution, tags,
flattened params, stepped metrics, a usable logged model, each model's test accuracy on its own
training run, the "Machine learning" experiment kind and artifacts that stay inside the project."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kdpipe import models
from kdpipe.config import parse_params
from kdpipe import tracking
from kdpipe.tracking import default_tracking_uri, git_revision, log_model_results, stage_run


@pytest.fixture
def tmp_repo(tmp_path, monkeypatch):
    """An empty git repository with one commit, as the working directory, with its own MLflow store."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    git("-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "init")
    monkeypatch.chdir(tmp_path)
    for name in ("KDPIPE_ROOT", "DVC_ROOT", "DVC_STAGE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("DVC_EXP_NAME", "exp-test")
    return tmp_path, git("rev-parse", "HEAD").strip()


def test_default_tracking_uri(tmp_path, monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "KDPIPE_ROOT", "DVC_ROOT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert default_tracking_uri(tmp_path / "x") == f"sqlite:///{(tmp_path / 'x').resolve()}/mlflow.db"
    # `dvc exp run --temp/--queue` runs stages in a temporary copy but points DVC_ROOT at the
    # repository: the runs must land in the repository's store, not in the copy's
    repo = tmp_path / "repo"
    monkeypatch.setenv("DVC_ROOT", str(repo))
    executor = tmp_path / "executor"
    executor.mkdir()
    monkeypatch.chdir(executor)
    assert default_tracking_uri() == f"sqlite:///{repo.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert default_tracking_uri() == "http://127.0.0.1:5000"


def test_git_revision(tmp_repo, tmp_path_factory):
    root, head = tmp_repo
    assert git_revision(root) == head
    assert git_revision(tmp_path_factory.mktemp("not_a_repo")) == "unknown"


def test_stage_run_logs_tags_params_stepped_metrics_and_a_batchable_model(tmp_repo, capfd):
    from mlflow.tracking import MlflowClient

    root, head = tmp_repo
    params = parse_params({"kd": {"temperature": 3, "alpha": 0.5}, "mlflow": {"experiment": "unit"},
                           "data": {"cifar10": {"url": "https://alice:s3cret@mirror.example/c.tar.gz"}}})
    model = models.build("student_cnn", 1, 3, 8, widths=[4, 8], dropout=0.0).eval()
    with stage_run("distill", params, method="logit") as run:
        assert run.enabled
        for epoch in (1, 2, 3):
            run.log_metrics({"val_acc": 10.0 * epoch, "note": "not a number"}, step=epoch)
        run.log_metrics({"best_val_accuracy": 30.0})
        run.log_model(model, input_example=np.zeros((1, 1, 8, 8), dtype=np.float32))
    # pickle is kdpipe's documented choice: MLflow's paragraph about it is not repeated per stage
    assert "Saving pytorch model by Pickle" not in capfd.readouterr().err

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("unit")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`kdpipe.run_kind` = 'pipeline'")
    (logged,) = client.search_runs([experiment.experiment_id], "tags.`kdpipe.run_kind` = 'stage'")
    assert logged.info.run_name == "distill@logit"
    assert parent.info.run_name == "exp-test" and parent.info.status == "FINISHED"
    tags = logged.data.tags
    assert tags["mlflow.parentRunId"] == parent.info.run_id
    assert tags["stage"] == "distill" and tags["kd_method"] == "logit" and tags["dataset"] == "digits"
    assert tags["dvc_exp_name"] == "exp-test" and tags["git_revision"] == head
    assert logged.data.params["kd.temperature"] == "3.0"
    assert logged.data.params["kd.alpha"] == "0.5"
    assert logged.data.params["student.student_cnn.widths"] == "[32, 64, 128]"
    assert logged.data.params["kd.dkd.beta"] == "1.0" and logged.data.params["kd.attention.beta"] == "1000.0"
    assert "kd.logit.temperature" not in logged.data.params  # a method's shared values are logged once, under kd
    assert logged.data.params["data.cifar10.url"] == "https://***@mirror.example/c.tar.gz"
    assert "s3cret" not in str(logged.data.params) and "alice" not in str(logged.data.params)
    history = client.get_metric_history(logged.info.run_id, "val_acc")
    assert [(m.step, m.value) for m in history] == [(1, 10.0), (2, 20.0), (3, 30.0)]
    assert "note" not in logged.data.metrics
    assert logged.data.metrics["best_val_accuracy"] == 30.0

    import mlflow.pytorch

    loaded = mlflow.pytorch.load_model(f"runs:/{logged.info.run_id}/model")
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        # a one-image example must not freeze the logged model's batch size at 1
        assert torch.allclose(loaded(x), model(x), atol=1e-5)
        assert loaded(x[:1]).shape == (1, 3)
    # it loads where kdpipe is not installed: the logged model carries kdpipe's code
    check = ("import sys; sys.path = [p for p in sys.path if not p.rstrip('/').endswith('src')]\n"
             "import mlflow.pytorch, torch\n"
             f"m = mlflow.pytorch.load_model({f'runs:/{logged.info.run_id}/model'!r})\n"
             "print(sys.modules['kdpipe'].__file__, *m(torch.zeros(2, 1, 8, 8)).shape)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
    out = subprocess.run([sys.executable, "-c", check], cwd=root, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    kdpipe_file, *shape = out.stdout.split()
    assert "/code/kdpipe/" in kdpipe_file and Path(models.__file__).parent.parent.resolve() not in Path(kdpipe_file).parents
    assert shape == ["2", "3"]


@pytest.mark.parametrize("chosen", [None, "false", "DO_NOT_TRACK"])
def test_mlflow_telemetry_is_off_in_stages_unless_the_user_chose(tmp_repo, chosen):
    """A fresh process (MLflow reads the switch when it is first imported) opens a stage run;
    MLflow's CI detection is taken out of its environment so that only kdpipe decides."""
    root, _ = tmp_repo
    check = ("import os\n"
             "from kdpipe.config import parse_params\n"
             "from kdpipe.tracking import stage_run\n"
             "with stage_run('prepare', parse_params({})) as run:\n"
             "    assert run.enabled\n"
             "    run.log_metrics({'images': 1.0})\n"
             "from mlflow.telemetry import get_telemetry_client\n"
             "print(os.environ.get('MLFLOW_DISABLE_TELEMETRY'), os.environ.get('DO_NOT_TRACK'),"
             " get_telemetry_client() is None)\n")
    ci_markers = ("CI", "PYTEST_CURRENT_TEST", "GITHUB_ACTIONS", "CIRCLECI", "JENKINS_URL", "GITLAB_CI", "TRAVIS",
                  "TF_BUILD", "BITBUCKET_BUILD_NUMBER", "CODEBUILD_BUILD_ARN", "BUILDKITE", "TEAMCITY_VERSION",
                  "CLOUD_RUN_EXECUTION", "RUNBOT_HOST_URL", "RUNBOT_BUILD_NAME", "RUNBOT_WORKER_ID")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", *ci_markers)}
    if chosen == "false":
        env["MLFLOW_DISABLE_TELEMETRY"] = "false"
    elif chosen == "DO_NOT_TRACK":
        env["DO_NOT_TRACK"] = "true"
    out = subprocess.run([sys.executable, "-c", check], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    disable, do_not_track, no_client = out.stdout.split()
    if chosen is None:
        assert (disable, do_not_track, no_client) == ("true", "None", "True")
    elif chosen == "false":  # the user's own choice stands
        assert (disable, do_not_track) == ("false", "None")
    else:
        assert (disable, do_not_track, no_client) == ("None", "true", "True")


def test_stage_run_disabled_is_a_no_op(tmp_repo):
    root, _ = tmp_repo
    params = parse_params({"mlflow": {"enabled": False}})
    with stage_run("evaluate", params) as run:
        assert not run.enabled
        run.log_metrics({"a": 1.0}, step=1)
        run.log_artifact(root / "nothing.txt")
        run.log_model(torch.nn.Linear(2, 2), input_example=np.zeros((1, 2), dtype=np.float32))
        run.log_onnx_model(root / "nothing.onnx", np.zeros((1, 2), dtype=np.float32), name="x")
    assert not (root / "mlflow.db").exists()


# ------------------------------------------------------------------------ parent runs per execution


def client_for(root):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{root}/mlflow.db")


def runs_of(root, experiment="kdpipe"):
    """(parents, children by parent id) of the experiment, oldest first."""
    client = client_for(root)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000, order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.data.tags.get("kdpipe.run_kind") == "pipeline"]
    children = {p.info.run_id: [r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id]
                for p in parents}
    assert all(r.data.tags.get("mlflow.parentRunId") in children for r in runs if r not in parents)
    return parents, children


def in_dvc_process(monkeypatch, pid, exp_name=None):
    """Pretend the stages run under the DVC process ``pid`` (a dvc repro/exp run), in experiment ``exp_name``."""
    monkeypatch.setattr(tracking, "dvc_process", lambda: (pid, 1000.0 + pid))
    if exp_name:
        monkeypatch.setenv("DVC_EXP_NAME", exp_name)
    else:
        monkeypatch.delenv("DVC_EXP_NAME", raising=False)


def run_stage(stage, method=None, params=None, model_bytes=None, metrics=None):
    """One stage execution; a training stage writes its model file (``model_bytes``) like the real one."""
    params = params or parse_params({})
    with stage_run(stage, params, method) as run:
        run.log_metrics(metrics or {"best_val_accuracy": 50.0})
        model = tracking.model_of_stage(stage, method)
        if model and model_bytes is not None:
            path = Path("models") / f"{model}.pt"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(model_bytes)


def test_stages_of_one_dvc_execution_share_a_parent_and_each_execution_has_its_own(tmp_repo, monkeypatch):
    root, head = tmp_repo
    in_dvc_process(monkeypatch, 101)  # dvc repro
    for stage, method in (("train_teacher", None), ("train_student", None), ("distill", "logit"),
                          ("evaluate", None), ("report", None)):
        run_stage(stage, method)
    in_dvc_process(monkeypatch, 102)  # dvc repro -f, same params: another execution
    run_stage("train_teacher")
    in_dvc_process(monkeypatch, 103, "kd-t2")  # dvc exp run -S kd.temperature=2
    params = parse_params({"kd": {"temperature": 2}})
    for stage, method in (("distill", "logit"), ("evaluate", None)):
        run_stage(stage, method, params)

    parents, children = runs_of(root)
    assert [p.info.run_name for p in parents] == [f"workspace @ {head[:7]}"] * 2 + ["kd-t2"]
    assert [children[p.info.run_id] for p in parents] == [
        ["train_teacher", "train_student", "distill@logit", "evaluate", "report"], ["train_teacher"],
        ["distill@logit", "evaluate"]]
    for parent in parents:  # never left RUNNING; it ends when its last stage ends
        assert parent.info.status == "FINISHED" and parent.info.end_time >= parent.info.start_time
        assert parent.data.tags["git_revision"] == head
    first, _, exp = parents
    assert first.data.params["kd.temperature"] == "4.0" and exp.data.params["kd.temperature"] == "2.0"
    assert exp.data.tags["dvc_exp_name"] == "kd-t2" and first.data.tags["dvc_exp_name"] == ""
    last_child = client_for(root).search_runs(
        [exp.info.experiment_id], f"tags.`mlflow.parentRunId` = '{exp.info.run_id}'",
        order_by=["attributes.end_time DESC"])[0]
    assert exp.info.end_time >= last_child.info.end_time


def test_parallel_queued_experiments_do_not_mix(tmp_repo, monkeypatch):
    """dvc queue start -j 2: two exec-run processes, two DVC_EXP_NAMEs, stages interleaved."""
    root, _ = tmp_repo
    for stage, method in (("train_student", None), ("distill", "logit"), ("evaluate", None)):
        for pid, name in ((201, "seed-1"), (202, "seed-2")):
            in_dvc_process(monkeypatch, pid, name)
            run_stage(stage, method)
    parents, children = runs_of(root)
    assert [p.info.run_name for p in parents] == ["seed-1", "seed-2"]
    assert all(names == ["train_student", "distill@logit", "evaluate"] for names in children.values())


def test_outside_dvc_a_repeated_stage_or_an_idle_parent_opens_a_new_parent(tmp_repo, monkeypatch):
    root, _ = tmp_repo
    monkeypatch.setattr(tracking, "dvc_process", lambda: None)  # python stages/<stage>.py by hand
    run_stage("evaluate")
    run_stage("report")  # the next stage of the same run by hand: same parent
    run_stage("evaluate")  # evaluate again: a new execution
    monkeypatch.setattr(tracking, "REUSE_MINUTES", 0)
    run_stage("report")  # the parent has been idle too long
    parents, children = runs_of(root)
    assert [children[p.info.run_id] for p in parents] == [["evaluate", "report"], ["evaluate"], ["report"]]


def test_a_failed_stage_fails_its_parent(tmp_repo, monkeypatch):
    root, _ = tmp_repo
    in_dvc_process(monkeypatch, 301)
    run_stage("train_teacher")
    with pytest.raises(RuntimeError):
        with stage_run("train_student", parse_params({})):
            raise RuntimeError("out of memory")
    parents, children = runs_of(root)
    (parent,) = parents
    assert children[parent.info.run_id] == ["train_teacher", "train_student"]
    assert parent.info.status == "FAILED"


def test_dvc_process_is_found_among_the_ancestors(monkeypatch):
    assert tracking._is_dvc_command(["/p/.venv/bin/python", "/p/.venv/bin/dvc", "repro"])
    assert tracking._is_dvc_command(["dvc", "exp", "exec-run", "--infofile", "x"])
    assert tracking._is_dvc_command(["python3", "-m", "dvc", "exp", "run"])
    assert not tracking._is_dvc_command(["/bin/bash", "-c", "python stages/evaluate.py"])
    assert not tracking._is_dvc_command(["python", "stages/dvc_helper.py"])
    monkeypatch.delenv("DVC_STAGE", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert tracking.dvc_process() is None  # not run by DVC: no process to look for
    monkeypatch.setenv("DVC_STAGE", "evaluate")
    assert tracking.dvc_process() is None  # pytest has no dvc ancestor


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="psutil adds the boot time to a start on Linux only")
def test_a_dvc_process_keeps_its_identity_when_the_clock_is_adjusted(monkeypatch):
    """The execution key holds the DVC process's start; NTP or a VM moving the wall clock (and
    with it the boot time psutil adds on Linux) must not move it, or one `dvc exp run` gets
    several parent runs."""
    import psutil
    import psutil._pslinux

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        stamps, created = [], []
        for boot in (1_000_000.0, 1_000_001.0):  # the boot time the kernel reports, before and after
            monkeypatch.setattr(psutil._pslinux, "boot_time", lambda b=boot: b)
            proc = psutil.Process(child.pid)  # a new handle: psutil caches create_time per handle
            stamps.append(tracking.start_stamp(proc))
            created.append(proc.create_time())
        assert created[1] - created[0] == 1.0  # psutil's wall-clock start moved with the clock
        assert stamps[0] == stamps[1]
        assert stamps[0] >= tracking.start_stamp(psutil.Process(os.getpid()))  # ticks after boot: later is larger
    finally:
        child.kill()
        child.wait()


# ------------------------------------------------------------------------------- experiment kind


def test_the_experiment_opens_as_machine_learning(tmp_repo):
    root, _ = tmp_repo
    run_stage("evaluate")
    client = client_for(root)
    experiment = client.get_experiment_by_name("kdpipe")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    base = "http://127.0.0.1:5077"
    assert tracking.experiment_url(parse_params({}), base) == (
        f"{base}/#/experiments/{experiment.experiment_id}?workflowType=machine_learning")
    assert tracking.experiment_url(parse_params({"mlflow": {"experiment": "none"}}), base) == (
        f"{base}/#/experiments?workflowType=machine_learning")
    # an experiment an older kdpipe (or anyone) created gets the tag at its next stage
    old = client.create_experiment("older")
    run_stage("evaluate", params=parse_params({"mlflow": {"experiment": "older"}}))
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"


# ------------------------------------------------------------------- test accuracy on model runs

RESULTS = {
    "teacher": {"test_accuracy": 98.0, "test_accuracy_ci95": [95.5, 99.1], "params": 1000},
    "baseline": {"test_accuracy": 96.0, "test_accuracy_ci95": [93.0, 97.7], "params": 100},
    "distilled_logit": {"test_accuracy": 97.0, "test_accuracy_ci95": [94.2, 98.4], "params": 100,
                        "accuracy_diff_vs_baseline": 1.0, "accuracy_diff_ci95": [-0.5, 2.5], "mcnemar_p": 0.2,
                        "gap_closed": None},
}


def metrics_by_run(root, parent):
    client = client_for(root)
    found = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return {r.info.run_name: r.data.metrics for r in found}


def test_log_model_results_puts_test_accuracy_on_each_training_run(tmp_repo, monkeypatch):
    root, _ = tmp_repo
    in_dvc_process(monkeypatch, 401)
    run_stage("train_teacher", model_bytes=b"teacher")
    run_stage("train_student", model_bytes=b"baseline")
    run_stage("distill", "logit", model_bytes=b"logit-t4")
    with stage_run("evaluate", parse_params({})) as run:
        logged = run.log_model_results(RESULTS)  # what evaluate_all calls

    (parent,), _ = runs_of(root)
    metrics = metrics_by_run(root, parent)
    assert set(logged) == {"teacher", "baseline", "distilled_logit"}
    assert metrics["train_teacher"]["test_accuracy"] == 98.0
    assert metrics["train_student"]["test_accuracy"] == 96.0
    assert metrics["train_student"]["test_accuracy_ci95_low"] == 93.0
    assert metrics["train_student"]["test_accuracy_ci95_high"] == 97.7
    assert "accuracy_diff_vs_baseline" not in metrics["train_student"]
    distilled = metrics["distill@logit"]
    assert distilled["test_accuracy"] == 97.0 and distilled["accuracy_diff_vs_baseline"] == 1.0
    assert distilled["accuracy_diff_ci95_low"] == -0.5 and distilled["mcnemar_p"] == 0.2
    assert "gap_closed" not in distilled  # undefined: left out
    assert distilled["best_val_accuracy"] == 50.0  # its training metrics are still there
    assert "test_accuracy" not in metrics["evaluate"]
    assert parent.data.metrics["distilled_logit.test_accuracy"] == 97.0  # executions compare at a glance
    assert parent.data.metrics["teacher.test_accuracy"] == 98.0


def test_a_model_from_an_earlier_execution_gets_its_accuracy_on_the_run_that_trained_it(tmp_repo, monkeypatch):
    """dvc exp run -S kd.temperature=2 re-trains only distill@logit; an earlier execution
    (here one that stopped before evaluate) trained the teacher and the baseline."""
    root, _ = tmp_repo
    in_dvc_process(monkeypatch, 501)
    run_stage("train_teacher", model_bytes=b"teacher")
    run_stage("train_student", model_bytes=b"baseline")
    run_stage("distill", "logit", model_bytes=b"logit-t4")
    in_dvc_process(monkeypatch, 502, "kd-t2")
    run_stage("distill", "logit", model_bytes=b"logit-t2")
    with stage_run("evaluate", parse_params({})):
        log_model_results(parse_params({}), RESULTS)

    first, exp = runs_of(root)[0]
    before, after = metrics_by_run(root, first), metrics_by_run(root, exp)
    assert before["train_teacher"]["test_accuracy"] == 98.0  # found by its model file's digest
    assert before["train_student"]["test_accuracy"] == 96.0
    assert "test_accuracy" not in before["distill@logit"]  # its file was replaced: not what was evaluated
    assert after["distill@logit"]["test_accuracy"] == 97.0
    assert set(after) == {"distill@logit", "evaluate"}


def test_log_model_results_disabled_is_a_no_op(tmp_repo):
    root, _ = tmp_repo
    assert log_model_results(parse_params({"mlflow": {"enabled": False}}), RESULTS) == {}
    assert not (root / "mlflow.db").exists()


# ---------------------------------------------------------------------------- artifact location


def project(tmp_path, name, monkeypatch):
    """A project root ``name`` with its own store (no MLFLOW_TRACKING_URI), stages run from a
    temporary copy as ``dvc exp run --temp`` does (DVC_ROOT names the project)."""
    root = (tmp_path / name).resolve()
    executor = tmp_path / f"{name}-executor"
    root.mkdir(exist_ok=True)
    executor.mkdir(exist_ok=True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.chdir(executor)
    return root


def log_file(text):
    params = parse_params({})
    with stage_run("report", params) as run:
        Path("note.txt").write_text(text)
        run.log_artifact("note.txt")
    return client_for(tracking.project_root()).search_runs(
        [client_for(tracking.project_root()).get_experiment_by_name("kdpipe").experiment_id],
        "attributes.run_name = 'report'", order_by=["attributes.start_time DESC"])[0]


def test_artifacts_go_to_the_project_root_not_the_working_directory(tmp_path, monkeypatch):
    root = project(tmp_path, "proj", monkeypatch)
    monkeypatch.setattr(tracking, "dvc_process", lambda: None)
    run = log_file("hello")
    experiment = client_for(root).get_experiment_by_name("kdpipe")
    assert experiment.artifact_location == str(root / "mlruns")
    assert experiment.tags["kdpipe.project_root"] == str(root)
    assert (root / "mlruns" / run.info.run_id / "artifacts" / "note.txt").read_text() == "hello"
    assert not (Path.cwd() / "mlruns").exists()


def test_artifact_location_param():
    assert tracking.artifact_location("mlruns", "/p", "sqlite:////p/mlflow.db") == "/p/mlruns"
    assert tracking.artifact_location("store/art", "/p", "sqlite:////elsewhere/x.db") == "/p/store/art"
    assert tracking.artifact_location("/data/art", "/p", "sqlite:////p/mlflow.db") == "/data/art"
    assert tracking.artifact_location("s3://bucket/kd", "/p", "http://mlflow:5000") == "s3://bucket/kd"
    # a folder of this machine means nothing to a tracking server: its own default applies
    assert tracking.artifact_location("mlruns", "/p", "http://mlflow:5000") is None
    assert parse_params({}).mlflow.artifact_location == "mlruns"
    with pytest.raises(Exception, match="mlflow.artifact_location"):
        parse_params({"mlflow": {"artifact_location": " "}})


def test_a_copied_project_keeps_its_artifacts_to_itself(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tracking, "dvc_process", lambda: None)
    old_root = project(tmp_path, "old", monkeypatch)
    old_run = log_file("first")
    with stage_run("train_student", parse_params({})) as run:
        run.log_model(torch.nn.Linear(2, 3), input_example=np.zeros((1, 2), dtype=np.float32))
    shutil.copytree(old_root, tmp_path / "new")  # the whole project, store and artifacts included
    new_root = project(tmp_path, "new", monkeypatch)
    new_run = log_file("second")

    assert "this project moved from" in capsys.readouterr().err
    client = client_for(new_root)
    experiment = client.get_experiment_by_name("kdpipe")
    assert experiment.artifact_location == str(new_root / "mlruns")
    assert experiment.tags["kdpipe.project_root"] == str(new_root)
    assert client.get_run(old_run.info.run_id).info.artifact_uri.startswith(str(new_root / "mlruns"))
    assert (new_root / "mlruns" / new_run.info.run_id / "artifacts" / "note.txt").read_text() == "second"
    assert not (old_root / "mlruns" / new_run.info.run_id).exists()
    # the old run's artifact is read from the copy
    local = client.download_artifacts(old_run.info.run_id, "note.txt", str(tmp_path / "dl"))
    assert Path(local).read_text() == "first"
    (model,) = client.search_logged_models([experiment.experiment_id])
    assert model.artifact_location.startswith(str(new_root / "mlruns"))
    import mlflow.pytorch

    assert mlflow.pytorch.load_model(f"models:/{model.model_id}")(torch.zeros(1, 2)).shape == (1, 3)
    # the original project's store is untouched
    assert client_for(old_root).get_experiment_by_name("kdpipe").artifact_location == str(old_root / "mlruns")


def test_a_changed_artifact_location_is_reported_in_one_sentence(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tracking, "dvc_process", lambda: None)
    root = project(tmp_path, "proj", monkeypatch)
    log_file("x")
    capsys.readouterr()
    with stage_run("report", parse_params({"mlflow": {"artifact_location": "elsewhere"}})):
        pass
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "set a new mlflow.experiment name" in err and str(root / "elsewhere") in err
    assert client_for(root).get_experiment_by_name("kdpipe").artifact_location == str(root / "mlruns")


# ------------------------------------------------------------------ tracking never costs a training


def test_an_unreachable_server_is_one_warning_within_seconds_or_one_sentence_when_required(tmp_repo, monkeypatch,
                                                                                              capsys):
    import time

    from kdpipe.errors import KdpipeError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on the discard port
    start = time.monotonic()
    with stage_run("evaluate", parse_params({})) as run:
        assert not run.enabled
        run.log_metrics({"a": 1.0})
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err
    assert "warning: the MLflow tracking store http://127.0.0.1:9 cannot be used (no answer within 5s" in err
    assert "this stage runs without tracking" in err and "Traceback" not in err
    with pytest.raises(KdpipeError, match=r"the MLflow tracking store http://127.0.0.1:9 cannot be used .*"
                                          r"mlflow.required: false"):
        with stage_run("evaluate", parse_params({"mlflow": {"required": True}})):
            pass


def test_a_read_only_or_missing_local_store_is_found_before_the_stage_starts(tmp_path, monkeypatch):
    db = tmp_path / "mlflow.db"
    assert tracking.unreachable(f"sqlite:///{db}") is None  # a new store in a writable folder
    assert tracking.unreachable(f"sqlite:///{tmp_path}/gone/mlflow.db") == f"{tmp_path}/gone is not a writable folder"
    db.write_bytes(b"")
    # permissions as an ordinary user sees them (root may write anything, so simulate the answer)
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != db)
    assert tracking.unreachable(f"sqlite:///{db}") == f"{db} is read-only"


def test_a_store_failing_mid_training_costs_one_warning_and_the_stage_goes_on(tmp_repo, monkeypatch, capsys):
    root, _ = tmp_repo
    in_dvc_process(monkeypatch, 401)
    epochs_logged = []
    with stage_run("train_student", parse_params({})) as run:
        run.log_metrics({"loss": 1.0}, step=1)
        epochs_logged.append(1)
        monkeypatch.setattr(run._mlflow, "log_metrics", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
        for epoch in (2, 3, 4):
            run.log_metrics({"loss": 1.0 / epoch}, step=epoch)  # the training goes on
            epochs_logged.append(epoch)
        assert not run.enabled
    assert epochs_logged == [1, 2, 3, 4]
    err = capsys.readouterr().err
    assert err.count("warning: MLflow failed while logging metrics (disk full)") == 1


def test_a_stage_killed_by_sigkill_leaves_a_running_run_that_the_next_stage_ends(tmp_repo, monkeypatch):
    root, _ = tmp_repo
    in_dvc_process(monkeypatch, 501)
    script = ("import os, signal; from kdpipe.config import parse_params; from kdpipe.tracking import stage_run\n"
              "with stage_run('train_teacher', parse_params({})):\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    subprocess.run([sys.executable, "-c", script], cwd=root, env=env, check=False, timeout=120)
    _, children = runs_of(root)
    client = client_for(root)
    (killed,) = [r for r in client.search_runs([client.get_experiment_by_name("kdpipe").experiment_id])
                 if r.info.run_name == "train_teacher"]
    assert killed.info.status == "RUNNING"
    run_stage("train_student")  # the next stage notices the dead process
    assert client.get_run(killed.info.run_id).info.status == "KILLED"


def test_only_this_machines_runs_are_ended_when_their_process_is_gone(tmp_repo, monkeypatch):
    """On a team server another machine's RUNNING stage run has a pid that means nothing here: it
    is left alone. A run without a host tag (older kdpipe) counts as local only in a local store."""
    from mlflow.tracking import MlflowClient

    root, _ = tmp_repo
    client = client_for(root)
    experiment_id = client.create_experiment("hosts")
    dead = 2 ** 22 + 17  # above the default pid_max: no such process
    here, elsewhere, untagged = (
        client.create_run(experiment_id, tags={tracking.PID_TAG: str(dead), **tags}).info.run_id
        for tags in ({tracking.HOST_TAG: tracking.socket.gethostname()}, {tracking.HOST_TAG: "colleague-laptop"}, {}))

    tracking._stale_runs_killed(client, experiment_id, "http://127.0.0.1:5000")  # a server: untagged is not ours
    assert [client.get_run(r).info.status for r in (here, elsewhere, untagged)] == ["KILLED", "RUNNING", "RUNNING"]
    tracking._stale_runs_killed(MlflowClient(f"sqlite:///{root}/mlflow.db"), experiment_id,
                                f"sqlite:///{root}/mlflow.db")
    assert [client.get_run(r).info.status for r in (elsewhere, untagged)] == ["RUNNING", "KILLED"]


def test_sigterm_and_ctrl_c_end_the_run_as_killed(tmp_repo, monkeypatch):
    from kdpipe.stage import Terminated

    root, _ = tmp_repo
    in_dvc_process(monkeypatch, 601)
    for stop in (Terminated, KeyboardInterrupt):
        with pytest.raises(stop):
            with stage_run("train_teacher", parse_params({})):
                raise stop
    client = client_for(root)
    runs = [r for r in client.search_runs([client.get_experiment_by_name("kdpipe").experiment_id])
            if r.info.run_name == "train_teacher"]
    assert [r.info.status for r in runs] == ["KILLED", "KILLED"]


def test_stage_run_logs_an_onnx_model_with_its_signature(tmp_repo):
    import mlflow
    import mlflow.pyfunc

    from kdpipe.onnx_export import export_onnx

    root, _ = tmp_repo
    params = parse_params({"mlflow": {"experiment": "unit"}})
    model = models.build("student_cnn", 1, 3, 8, widths=[4, 8], dropout=0.0).eval()
    export_onnx(model, torch.randn(2, 1, 8, 8), root / "m.onnx", {"model": "baseline"})
    with stage_run("export", params) as run:
        run.log_onnx_model(root / "m.onnx", np.zeros((2, 1, 8, 8), dtype=np.float32), name="baseline_fp32")
        run_id = mlflow.active_run().info.run_id

    logged = mlflow.pyfunc.load_model(f"runs:/{run_id}/baseline_fp32")
    (spec,) = logged.metadata.get_input_schema().inputs
    assert spec.shape == (-1, 1, 8, 8)  # the batch dimension stays free
    assert [o.name for o in logged.metadata.get_output_schema().inputs] == ["logits"]
    x = torch.randn(5, 1, 8, 8)
    out = logged.predict(x.numpy())
    with torch.no_grad():
        np.testing.assert_allclose(np.asarray(out["logits"]), model(x).numpy(), atol=1e-4)
