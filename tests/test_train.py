"""The training engine: it learns, records its history, keeps the best weights, and is deterministic."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from kdpipe import models
from kdpipe.config import AugmentConfig, RuntimeConfig, TrainConfig
from kdpipe.data.loader import Normalizer
from kdpipe.distill import CrossEntropyObjective, OnlineTeacher
from kdpipe.distill.logit import LogitKD
from kdpipe.inference import loss_and_accuracy, predict_logits
from kdpipe.runtime import Runtime, setup_runtime
from kdpipe.train import fit, make_scheduler
from tests.conftest import make_prepared

RECIPE = TrainConfig(epochs=5, batch_size=16, optimizer="adam", lr=0.01, weight_decay=0.0, label_smoothing=0.0,
                     schedule="onecycle", warmup_fraction=0.2)
AUGMENT = AugmentConfig(crop_padding=1, flip=True)
HISTORY_COLUMNS = {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds"}


def run_fit(seed: int, runtime_cfg: RuntimeConfig = RuntimeConfig(device="cpu", threads=1), recipe=RECIPE,
            on_epoch=None, flip: bool = False):
    """What the workflow does: set up the runtime (which seeds every RNG), build, train.

    The toy classes are quadrants, so a mirror changes the label: the toy data says
    ``flip: False`` and the engine must then ignore ``augment.flip``."""
    data = make_prepared(flip=flip)
    runtime = setup_runtime(runtime_cfg, seed)
    model = models.build("student_cnn", 1, data.num_classes, 8, widths=[8, 16], dropout=0.1)
    result = fit(CrossEntropyObjective(model), data, recipe, AUGMENT, runtime, seed, desc="test", on_epoch=on_epoch)
    return model, result, data


def test_engine_learns_the_toy_data_and_writes_history_rows():
    rows = []
    model, result, data = run_fit(0, on_epoch=rows.append)
    assert len(result.history) == RECIPE.epochs and rows == result.history
    for i, row in enumerate(result.history):
        assert HISTORY_COLUMNS | {"train_ce"} == set(row)
        assert row["epoch"] == i + 1
        assert 0 <= row["train_acc"] <= 100 and 0 <= row["val_acc"] <= 100
        assert row["train_loss"] > 0 and row["val_loss"] > 0
        assert row["train_ce"] == row["train_loss"]  # the only term of the baseline
        assert row["lr"] > 0
    # onecycle: warm up to the peak, then anneal to lr / (10 · 100) on the last update
    lrs = [r["lr"] for r in result.history]
    assert max(lrs) <= RECIPE.lr + 1e-9
    assert lrs[-1] == pytest.approx(RECIPE.lr / 1000, rel=1e-3)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.best_val_accuracy >= 90.0
    # the returned model really has that accuracy on the validation split
    normalize = Normalizer.from_meta(data.meta["mean"], data.meta["std"])
    _, val_acc = loss_and_accuracy(predict_logits(model, data.val, normalize, 64), data.val.labels)
    assert val_acc == pytest.approx(result.best_val_accuracy, abs=1e-6)
    # and on the held-out test split, which it never saw
    _, test_acc = loss_and_accuracy(predict_logits(model, data.test, normalize, 64), data.test.labels)
    assert test_acc >= 90.0


def test_engine_keeps_the_best_on_validation_weights():
    """Wreck the weights after epoch 3: epoch 4 then trains from NaNs and validates badly, and
    fit must hand back epoch 3's (or an earlier best) weights, not the last ones."""
    recipe = TrainConfig(epochs=4, batch_size=16, optimizer="adam", lr=0.01, label_smoothing=0.0, schedule="constant")
    snapshots = {}
    holder = {}

    def on_epoch(row):
        model = holder["model"]
        snapshots[row["epoch"]] = copy.deepcopy(model.state_dict())
        if row["epoch"] == 3:
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan"))

    data = make_prepared()
    runtime = setup_runtime(RuntimeConfig(device="cpu", threads=1), 0)
    model = models.build("student_cnn", 1, data.num_classes, 8, widths=[8, 16], dropout=0.0)
    holder["model"] = model
    result = fit(CrossEntropyObjective(model), data, recipe, AugmentConfig(), runtime, 0, "best", on_epoch)

    accs = [r["val_acc"] for r in result.history]
    assert accs[3] < max(accs[:3])  # the wrecked epoch is worse
    best = accs.index(max(accs)) + 1
    assert result.best_epoch == best and result.best_val_accuracy == pytest.approx(max(accs), abs=1e-4)
    final = model.state_dict()
    for name, tensor in snapshots[best].items():
        assert torch.equal(final[name], tensor), name
    assert all(torch.isfinite(p).all() for p in model.parameters())


def history_without_timings(history):
    return [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in history]


@pytest.mark.parametrize("runtime_cfg", [RuntimeConfig(device="cpu", threads=1, bf16="off", channels_last="off"),
                                         RuntimeConfig(device="cpu", threads=1, bf16="on", channels_last="on")],
                         ids=["fp32", "bf16-channels_last"])
def test_fit_is_deterministic_for_a_seed(runtime_cfg):
    model_a, result_a, _ = run_fit(3, runtime_cfg, flip=True)
    model_b, result_b, _ = run_fit(3, runtime_cfg, flip=True)
    assert history_without_timings(result_a.history) == history_without_timings(result_b.history)
    assert result_a.best_epoch == result_b.best_epoch
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    # and the seed matters: another seed gives another run
    model_c, result_c, _ = run_fit(4, runtime_cfg, flip=True)
    assert history_without_timings(result_c.history) != history_without_timings(result_a.history)
    assert not torch.equal(model_c.state_dict()["head.3.weight"], state_a["head.3.weight"])


def test_distillation_trains_the_student_and_logs_each_term():
    data = make_prepared()
    runtime = setup_runtime(RuntimeConfig(device="cpu", threads=1), 0)
    teacher = models.build("student_cnn", 1, 4, 8, widths=[8, 16], dropout=0.0)
    fit(CrossEntropyObjective(teacher), data, RECIPE, AugmentConfig(), runtime, 0, "teacher")
    teacher_state = copy.deepcopy(teacher.state_dict())
    pupil = models.build("student_cnn", 1, 4, 8, widths=[8, 16], dropout=0.0)
    objective = LogitKD(pupil, OnlineTeacher(teacher), temperature=4.0, alpha=0.9)
    result = fit(objective, data, RECIPE, AUGMENT, runtime, 0, "kd")
    for row in result.history:
        assert {"train_kd", "train_ce"} <= set(row)
        assert row["train_loss"] == pytest.approx(row["train_kd"] + row["train_ce"], abs=2e-6)
    assert result.best_val_accuracy >= 90.0
    # the teacher was not trained: weights and BatchNorm statistics unchanged
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in teacher_state.items())


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "step", "constant"])
def test_every_schedule_stays_positive_over_the_whole_run(schedule):
    recipe = TrainConfig(epochs=3, lr=0.1, schedule=schedule, step_size=1, gamma=0.5, warmup_fraction=0.2)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=recipe.lr, momentum=0.9)
    sched = make_scheduler(opt, recipe, steps_per_epoch=5)
    used = []
    for _ in range(15):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert all(0 < lr <= recipe.lr + 1e-12 for lr in used), used
    if schedule == "step":
        assert used[0] == pytest.approx(0.1) and used[5] == pytest.approx(0.05) and used[10] == pytest.approx(0.025)
    if schedule == "constant":
        assert used == [0.1] * 15


def test_bf16_auto_is_decided_per_model_and_never_overrides_an_explicit_choice():
    """``bf16: auto`` on a bf16-capable CPU: bf16 for models worth it (the 32×32 student,
    any ResNet-18), fp32 for the tiny digits student; ``on``/``off`` are kept as given."""
    auto = Runtime(torch.device("cpu"), 1, torch.bfloat16, True, False, bf16_policy="auto")
    tiny = models.build("student_cnn", 1, 10, 8)
    assert auto.for_model(tiny, (1, 8, 8)).amp_dtype is None
    assert auto.for_model(models.build("student_cnn", 3, 10, 32), (3, 32, 32)).amp_dtype == torch.bfloat16
    assert auto.for_model(models.build("resnet18", 1, 10, 8), (1, 8, 8)).amp_dtype == torch.bfloat16
    forced = replace(auto, bf16_policy="on")
    assert forced.for_model(tiny, (1, 8, 8)).amp_dtype == torch.bfloat16
    off = replace(auto, amp_dtype=None, bf16_policy="off")
    assert off.for_model(models.build("resnet18", 3, 10, 32), (3, 32, 32)).amp_dtype is None
