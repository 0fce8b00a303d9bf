"""MLflow tracking: one run per stage, tags, flattened params, stepped metrics, a usable logged model."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch

from kdpipe import models
from kdpipe.config import parse_params
from kdpipe.tracking import default_tracking_uri, git_revision, stage_run


@pytest.fixture
def tmp_repo(tmp_path, monkeypatch):
    """An empty git repository with one commit, as the working directory, with its own MLflow store."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    git("-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "init")
    monkeypatch.chdir(tmp_path)
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


def test_stage_run_logs_tags_params_stepped_metrics_and_a_batchable_model(tmp_repo):
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

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("unit")
    (logged,) = client.search_runs([experiment.experiment_id])
    assert logged.info.run_name == "distill@logit"
    tags = logged.data.tags
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


def test_stage_run_disabled_is_a_no_op(tmp_repo):
    root, _ = tmp_repo
    params = parse_params({"mlflow": {"enabled": False}})
    with stage_run("evaluate", params) as run:
        assert not run.enabled
        run.log_metrics({"a": 1.0}, step=1)
        run.log_artifact(root / "nothing.txt")
        run.log_model(torch.nn.Linear(2, 2), input_example=np.zeros((1, 2), dtype=np.float32))
    assert not (root / "mlflow.db").exists()
