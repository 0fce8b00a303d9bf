"""runtime.nproc: sharded batches, the gradient of the global batch, and real torchrun runs (gloo, CPU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kdpipe import distributed
from kdpipe.config import parse_params
from kdpipe.data.loader import TrainingBatches
from kdpipe.data.prepare import write_prepared
from kdpipe.distributed import Distributed
from kdpipe.errors import KdpipeError
from kdpipe.runtime import setup_runtime
from kdpipe.train import check_batches_split
from tests import ddp_worker
from tests.conftest import PROJECT_ROOT, make_prepared

CPU = {"device": "cpu", "threads": 1, "bf16": "off", "channels_last": "off"}


def run_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID",
                                                            distributed.LAUNCHED_ENV)}
    return {**env, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT / "src"), str(PROJECT_ROOT)]), **extra}


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("mix", ["none", "cutmix"])
def test_the_shares_of_every_batch_make_up_the_one_process_batch(world, mix):
    data = make_prepared(n_train=53, flip=True)
    augment = parse_params({"data": {"augment": {"crop_padding": 2, "mix": mix}}}).data.augment
    runtime = setup_runtime(parse_params({"runtime": CPU}).runtime, 0)
    one = TrainingBatches.for_run(data, 16, augment, 5, runtime)
    ranks = [TrainingBatches.for_run(data, 16, augment, 5, runtime, group=Distributed(r, world)) for r in range(world)]
    assert all(r.steps == one.steps == 4 for r in ranks)
    for epoch in (0, 1):
        for whole, *shares in zip(one.epoch(epoch), *(r.epoch(epoch) for r in ranks)):
            assert [len(s.indices) for s in shares] == [len(p) for p in torch.arange(len(whole.indices)).tensor_split(world)]
            assert all(s.total == len(whole.indices) for s in shares)
            assert torch.equal(torch.cat([s.indices for s in shares]), whole.indices)
            assert torch.equal(torch.cat([s.images for s in shares]), whole.images)  # same crops, flips and mixes
            assert torch.equal(torch.cat([s.labels for s in shares]), whole.labels)


def test_loss_weights_make_ddps_average_the_global_batch_mean():
    per_image = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0])  # a last batch of 5 split 2 + 2 + 1
    shares = per_image.tensor_split(3)
    weighted = [Distributed(r, 3).loss_weight(len(s), 5) * s.mean() for r, s in enumerate(shares)]
    assert torch.isclose(sum(weighted) / 3, per_image.mean())  # DDP divides the summed gradients by the world
    assert Distributed().loss_weight(3, 5) == 1.0


def test_a_batch_that_leaves_a_process_without_images_is_refused():
    check_batches_split(Distributed(0, 2), 51, 16, "student.batch_size")  # last batch 3: 2 + 1
    with pytest.raises(KdpipeError, match=r"runtime.nproc=3 every process needs at least one image of each batch, "
                                          r"but student.batch_size=16 on 50 training images leaves a last batch of 2"):
        check_batches_split(Distributed(0, 3), 50, 16, "student.batch_size")
    with pytest.raises(KdpipeError, match="teacher.batch_size=2 on 50 training images leaves a batch to share"):
        check_batches_split(Distributed(1, 4), 50, 2, "teacher.batch_size")


def test_the_group_is_read_from_torchruns_environment():
    assert distributed.from_env({}) == distributed.SINGLE and not distributed.SINGLE.active
    group = distributed.from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert group == Distributed(3, 4, 1, 2) and group.active and not group.is_main


def test_two_processes_under_torchrun_train_what_one_process_trains(tmp_path):
    """Same global batch (51 images in batches of 16: the last one split 2 + 1), mixup, crops,
    cached teacher targets: the weights agree to float-summation noise, the history rows are
    equal, and the two ranks looked up exactly the (epoch, index) targets one process did."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(PROJECT_ROOT / "tests/ddp_worker.py"), str(tmp_path)],
        env=run_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    student, history, teacher = ddp_worker.train(distributed.SINGLE)
    assert json.loads((tmp_path / "world.json").read_text()) == 2
    two = torch.load(tmp_path / "student.pt")
    for name, value in student.state_dict().items():
        torch.testing.assert_close(two[name], value, rtol=1e-5, atol=1e-6)
    for a, b in zip(json.loads((tmp_path / "history.json").read_text()), history, strict=True):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=2e-6) for k in a)
    seen = [tuple(x[:2]) + (tuple(x[2]),) for r in (0, 1) for x in json.loads((tmp_path / f"seen-{r}.json").read_text())]
    one = [(e, i, tuple(row)) for e, i, row in teacher.seen]
    # one row per image and epoch (the cache holds the teacher's logits on the mixed view itself)
    assert sorted(seen) == sorted(one) and sorted((e, i) for e, i, _ in one) == [
        (e, i) for e in range(ddp_worker.EPOCHS) for i in range(ddp_worker.N_TRAIN)]
    assert all(len(json.loads((tmp_path / f"seen-{r}.json").read_text())) > 0 for r in (0, 1))


def test_a_stage_with_runtime_nproc_2_runs_under_torchrun_and_rank_0_alone_writes(tmp_path):
    """The real stage script relaunches itself under torchrun; one model, one metrics file and
    one MLflow stage run come out, and the workspace lock is released."""
    data = make_prepared(n_train=200, n_val=64, n_test=32, flip=False)
    write_prepared(tmp_path / "data/prepared", data)
    shutil.copytree(PROJECT_ROOT / "stages", tmp_path / "stages")
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["student"].update(epochs=3, batch_size=32)
    params["runtime"].update(CPU, threads=0, nproc=2)
    params["mlflow"].update(log_models=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    store = f"sqlite:///{tmp_path}/mlflow.db"
    result = subprocess.run([sys.executable, "stages/train_student.py"], cwd=tmp_path, capture_output=True, text=True,
                            env=run_env(MLFLOW_TRACKING_URI=store), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "runtime.nproc=2: -m torch.distributed.run --standalone --nproc-per-node=2 stages/train_student.py" \
        in result.stderr
    assert result.stderr.count("baseline epoch 3/3") == 1 and "[2 processes]" in result.stderr  # rank 0 reports
    timing = json.loads((tmp_path / "metrics/timing/baseline.json").read_text())
    assert timing["processes"] == 2 and timing["machine"]["threads"] == max(1, os.cpu_count() // 2)
    summary = json.loads((tmp_path / "metrics/baseline.json").read_text())
    assert summary["best_val_accuracy"] > 60  # four classes: it learned
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["baseline.pt"]
    assert not (tmp_path / ".kdpipe/lock").exists() and not list((tmp_path / ".kdpipe/checkpoints").glob("*"))
    import mlflow

    runs = mlflow.MlflowClient(store).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(store).search_experiments()], "tags.mlflow.runName = 'train_student'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["best_val_accuracy"] == summary["best_val_accuracy"]


def test_a_failing_rank_fails_the_stage_with_its_sentence(tmp_path):
    """A user error inside the group reaches the user as kdpipe's sentence and a non-zero exit."""
    data = make_prepared(n_train=50, n_val=16, n_test=16)
    write_prepared(tmp_path / "data/prepared", data)
    shutil.copytree(PROJECT_ROOT / "stages", tmp_path / "stages")
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["student"].update(epochs=1, batch_size=16)  # 50 = 3×16 + 2: a last batch of 2 for 3 processes
    params["runtime"].update(CPU, nproc=3)
    params["mlflow"].update(enabled=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run([sys.executable, "stages/train_student.py"], cwd=tmp_path, capture_output=True, text=True,
                            env=run_env(), timeout=300)
    assert result.returncode == 2
    assert "error: with runtime.nproc=3 every process needs at least one image of each batch" in result.stderr
    assert "error: the 3-process run of stages/train_student.py failed" in result.stderr
    assert not (tmp_path / "models").exists() and not (tmp_path / ".kdpipe/lock").exists()
