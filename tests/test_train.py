"""kdpipe.train, the training engine: it learns, records its history, keeps the best weights,
sums and logs every loss term, follows its schedule and is deterministic for a seed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kdpipe import models
from kdpipe.config import parse_params
from kdpipe.data.loader import Normalizer, TrainingBatches
from kdpipe.distill import CrossEntropyObjective
from kdpipe.distill.base import BatchContext, Objective
from kdpipe.distill.dkd import dkd_terms
from kdpipe.distill.losses import label_ce
from kdpipe.errors import KdpipeError
from kdpipe.inference import loss_and_accuracy, predict_logits
from kdpipe.runtime import setup_runtime
from kdpipe.train import BestWeights, Optimisation, TrainJob, fit, make_optimizer, make_scheduler, train_epoch, validate
from tests.conftest import build_method, make_prepared

STUDENT = {"epochs": 5, "batch_size": 16, "optimizer": "adam", "lr": 0.01, "weight_decay": 0.0,
           "schedule": "onecycle", "warmup_fraction": 0.2}
RUNTIME = {"device": "cpu", "threads": 1}
HISTORY_COLUMNS = {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr"}  # no timing: it lives in result.epoch_seconds


def make_params(student=None, runtime=None, crop_padding=1, mix="none"):
    return parse_params({"student": {**STUDENT, **(student or {})}, "runtime": {**RUNTIME, **(runtime or {})},
                         "data": {"augment": {"crop_padding": crop_padding, "flip": True, "mix": mix}}})


def run_fit(seed: int, params=None, on_epoch=None, flip: bool = False, objective_for=CrossEntropyObjective):
    """What the workflow does: set up the runtime (which seeds every RNG), build, train.

    The toy classes are quadrants, so a mirror changes the label: the toy data says
    ``flip: False`` and the engine must then ignore ``augment.flip``."""
    params = params or make_params()
    data = make_prepared(flip=flip)
    runtime = setup_runtime(params.runtime, seed)
    model = models.build("student_cnn", 1, data.num_classes, 8, widths=[8, 16], dropout=0.1)
    job = TrainJob("test", objective_for(model), data, params.student, params.data.augment, runtime, seed)
    return model, fit(job, on_epoch=on_epoch), data


# ---- fit --------------------------------------------------------------------------------------


def test_engine_learns_the_toy_data_and_writes_history_rows():
    rows = []
    model, result, data = run_fit(0, on_epoch=rows.append)
    epochs, lr = STUDENT["epochs"], STUDENT["lr"]
    assert len(result.history) == epochs == len(result.epoch_seconds)
    # MLflow gets each epoch's row with its time; the history (a DVC plot) has none
    assert rows == [{**row, "epoch_seconds": s} for row, s in zip(result.history, result.epoch_seconds)]
    assert all(s > 0 for s in result.epoch_seconds)
    for i, row in enumerate(result.history):
        assert HISTORY_COLUMNS | {"train_ce"} == set(row)
        assert row["epoch"] == i + 1
        assert 0 <= row["train_acc"] <= 100 and 0 <= row["val_acc"] <= 100
        assert row["train_loss"] > 0 and row["val_loss"] > 0
        assert row["train_ce"] == row["train_loss"]  # the only term of the baseline
        assert row["lr"] > 0
    # onecycle: warm up to the peak, then anneal to lr / (10 · 100) on the last update
    lrs = [r["lr"] for r in result.history]
    assert max(lrs) <= lr + 1e-9
    assert lrs[-1] == pytest.approx(lr / 1000, rel=1e-3)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.best_val_accuracy >= 90.0
    assert result.seconds > 0 and result.runtime["device"] == "cpu" and result.runtime["threads"] == 1
    # the returned model really has that accuracy on the validation split
    normalize = Normalizer.from_meta(data.meta["mean"], data.meta["std"])
    _, val_acc = loss_and_accuracy(predict_logits(model, data.val, normalize, 64), data.val.labels)
    assert val_acc == pytest.approx(result.best_val_accuracy, abs=1e-6)
    # and on the held-out test split, which it never saw
    _, test_acc = loss_and_accuracy(predict_logits(model, data.test, normalize, 64), data.test.labels)
    assert test_acc >= 90.0


def test_engine_keeps_the_best_on_validation_weights():
    """Wreck the weights after epoch 3: epoch 4 then trains from zeros and validates badly, and
    fit must hand back epoch 3's (or an earlier best) weights, not the last ones."""
    params = make_params({"epochs": 4, "schedule": "constant"}, crop_padding=1)
    snapshots = {}
    holder = {}

    def on_epoch(row):
        model = holder["model"]
        snapshots[row["epoch"]] = copy.deepcopy(model.state_dict())
        if row["epoch"] == 3:
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(0.0)  # finite garbage (NaN would stop the run: the divergence guard)

    data = make_prepared()
    runtime = setup_runtime(params.runtime, 0)
    model = models.build("student_cnn", 1, data.num_classes, 8, widths=[8, 16], dropout=0.0)
    holder["model"] = model
    result = fit(TrainJob("best", CrossEntropyObjective(model), data, params.student, params.data.augment, runtime, 0),
                 on_epoch)

    accs = [r["val_acc"] for r in result.history]
    assert accs[3] < max(accs[:3])  # the wrecked epoch is worse
    best = accs.index(max(accs)) + 1
    assert result.best_epoch == best and result.best_val_accuracy == pytest.approx(max(accs), abs=1e-4)
    final = model.state_dict()
    for name, tensor in snapshots[best].items():
        assert torch.equal(final[name], tensor), name
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("runtime", [{"bf16": "off", "channels_last": "off"}, {"bf16": "on", "channels_last": "on"}],
                         ids=["fp32", "bf16-channels_last"])
def test_fit_is_deterministic_for_a_seed(runtime):
    params = make_params(runtime=runtime)
    model_a, result_a, _ = run_fit(3, params, flip=True)
    model_b, result_b, _ = run_fit(3, params, flip=True)
    assert result_a.history == result_b.history
    assert result_a.best_epoch == result_b.best_epoch
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    # and the seed matters: another seed gives another run
    model_c, result_c, _ = run_fit(4, params, flip=True)
    assert result_c.history != result_a.history
    assert not torch.equal(model_c.state_dict()["head.3.weight"], state_a["head.3.weight"])


def test_distillation_trains_the_student_and_logs_each_term():
    params = make_params()
    data = make_prepared()
    runtime = setup_runtime(params.runtime, 0)
    teacher = models.build("student_cnn", 1, 4, 8, widths=[8, 16], dropout=0.0)
    fit(TrainJob("teacher", CrossEntropyObjective(teacher), data, params.student, parse_params({}).data.augment,
                 runtime, 0))
    teacher_state = copy.deepcopy(teacher.state_dict())
    pupil = models.build("student_cnn", 1, 4, 8, widths=[8, 16], dropout=0.0)
    objective = build_method("logit", pupil, teacher, temperature=4.0, alpha=0.9)
    result = fit(TrainJob("kd", objective, data, params.student, params.data.augment, runtime, 0))
    for row in result.history:
        assert {"train_kd", "train_ce"} <= set(row)
        assert row["train_loss"] == pytest.approx(row["train_kd"] + row["train_ce"], abs=2e-6)
    assert result.best_val_accuracy >= 90.0
    # the teacher was not trained: weights and BatchNorm statistics unchanged
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in teacher_state.items())


# ---- the parts of one run ---------------------------------------------------------------------


class FixedTerms(Objective):
    """Two terms with known per-batch values: a = 1 + epoch, b = mean label (as floats)."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(1, 1))
        self.seen: list[BatchContext] = []

    def forward_train(self, images, labels, batch):
        self.seen.append(batch)
        logits = torch.nn.functional.one_hot(labels, 4).float() + 0 * self.student.weight.sum()  # always right
        return logits, {"a": (1.0 + batch.epoch) * (self.student.weight.sum() * 0 + 1),
                        "b": labels.float().mean() + 0 * self.student.weight.sum()}


def test_train_epoch_averages_each_term_over_images_and_records_the_batches():
    params = make_params({"batch_size": 24, "schedule": "constant", "optimizer": "sgd", "lr": 0.01})
    data = make_prepared(n_train=64)
    runtime = setup_runtime(params.runtime, 0)
    objective = FixedTerms()
    job = TrainJob("terms", objective, data, params.student, params.data.augment, runtime, 0)
    batches = TrainingBatches.for_run(data, 24, params.data.augment, 0, runtime)
    opt = make_optimizer(objective.trainable_parameters(), params.student)
    optim = Optimisation(opt, make_scheduler(opt, params.student, batches.steps),
                         torch.amp.GradScaler("cpu", enabled=False))
    row = train_epoch(job, batches, 2, optim, objective.forward_train)
    assert [b.epoch for b in objective.seen] == [2, 2, 2]  # 64 images in batches of 24, 24, 16
    assert sorted(torch.cat([b.indices for b in objective.seen]).tolist()) == list(range(64))
    assert row["train_a"] == pytest.approx(3.0)
    assert row["train_b"] == pytest.approx(data.train.labels.float().mean().item(), abs=1e-6)  # image-weighted
    assert row["train_loss"] == pytest.approx(row["train_a"] + row["train_b"], abs=1e-6)
    assert row["train_acc"] == 100.0 and row["lr"] == pytest.approx(0.01)


def test_validate_is_the_loss_and_accuracy_of_the_models_predictions():
    data = make_prepared()
    params = make_params(runtime={"bf16": "off", "channels_last": "off"})
    runtime = setup_runtime(params.runtime, 0)
    torch.manual_seed(0)
    model = models.build("student_cnn", 1, 4, 8, widths=[8]).train()
    normalize = Normalizer.from_meta(data.meta["mean"], data.meta["std"])
    loss, acc = validate(model, data.val, normalize, runtime)
    assert model.training  # the mode is restored
    assert (loss, acc) == loss_and_accuracy(predict_logits(model, data.val, normalize, 64), data.val.labels)


def test_best_weights_keep_the_first_strictly_best_epoch_as_a_copy():
    model = nn.Linear(2, 1)
    best = BestWeights()
    best.restore(model)  # nothing kept yet: a no-op
    for epoch, (acc, value) in enumerate([(50.0, 1.0), (70.0, 2.0), (70.0, 3.0), (60.0, 4.0)], start=1):
        with torch.no_grad():
            model.weight.fill_(value)
        best.update(model, acc, epoch)
    assert (best.accuracy, best.epoch) == (70.0, 2)
    best.restore(model)
    assert torch.equal(model.weight, torch.full((1, 2), 2.0))


def test_optimisation_step_updates_and_returns_the_lr_it_used():
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    optim = Optimisation(opt, sched, torch.amp.GradScaler("cpu", enabled=False))
    used = [optim.step((param - 1).pow(2).sum()) for _ in range(3)]
    assert used == [0.1, 0.05, 0.025]
    # steps of lr·grad with grad = 2(p − 1): 0 → 0.2 → 0.28 → 0.316
    assert param.item() == pytest.approx(0.316, rel=1e-6)


def test_make_optimizer_follows_the_recipe():
    params = [nn.Parameter(torch.zeros(1))]
    sgd = make_optimizer(params, make_params({"optimizer": "sgd", "momentum": 0.9, "nesterov": True}).student)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    # nesterov needs momentum: dropped, not an error
    plain = make_optimizer(params, make_params({"optimizer": "sgd", "momentum": 0.0, "nesterov": True}).student)
    assert not plain.defaults["nesterov"]
    adamw = make_optimizer(params, make_params({"optimizer": "adamw", "weight_decay": 0.01}).student)
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["weight_decay"] == 0.01
    assert type(make_optimizer(params, make_params({"optimizer": "adam"}).student)) is torch.optim.Adam


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "step", "constant"])
def test_every_schedule_stays_positive_over_the_whole_run(schedule):
    recipe = parse_params({"student": {"epochs": 3, "lr": 0.1, "schedule": schedule, "step_size": 1, "gamma": 0.5,
                                       "warmup_fraction": 0.2}}).student
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
    if schedule == "cosine":  # 3 warm-up steps (20% of 15), then a half cosine
        assert used[:3] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1]) and used[-1] < used[3]


# ---- mixed views (soft labels) ----------------------------------------------------------------


class SoftTerms(Objective):
    """Predicts the dominant class of each soft label; term s = the labels' row sum (1)."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(1, 1))
        self.shapes: list[tuple[int, ...]] = []

    def forward_train(self, images, labels, batch):
        self.shapes.append(tuple(labels.shape))
        zero = 0 * self.student.weight.sum()
        return labels.float() + zero, {"s": labels.sum(1).mean() + zero}


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_train_epoch_counts_images_and_dominant_labels_of_mixed_batches(mix):
    params = make_params({"batch_size": 24, "schedule": "constant", "optimizer": "sgd", "lr": 0.01}, mix=mix)
    data = make_prepared(n_train=64)
    runtime = setup_runtime(params.runtime, 0)
    objective = SoftTerms()
    job = TrainJob("soft", objective, data, params.student, params.data.augment, runtime, 0)
    batches = TrainingBatches.for_run(data, 24, params.data.augment, 0, runtime)
    opt = make_optimizer(objective.trainable_parameters(), params.student)
    optim = Optimisation(opt, make_scheduler(opt, params.student, batches.steps),
                         torch.amp.GradScaler("cpu", enabled=False))
    row = train_epoch(job, batches, 0, optim, objective.forward_train)
    assert objective.shapes == [(24, 4), (24, 4), (16, 4)]  # soft labels over the 4 classes
    assert row["train_s"] == pytest.approx(1.0, abs=1e-6)  # averaged over images, not label entries
    assert row["train_acc"] == 100.0  # the argmax of the soft label is the dominant class


def test_every_label_term_accepts_the_soft_labels_of_mixed_batches():
    """label_ce reads probability targets (label smoothing too); DKD splits the classes at the
    dominant label. One-hot soft labels give exactly the hard-label losses."""
    gen = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(12, 5, generator=gen), torch.randn(12, 5, generator=gen)
    hard = torch.arange(12) % 5
    one_hot = torch.nn.functional.one_hot(hard, 5).float()
    for smoothing in (0.0, 0.1):
        assert torch.allclose(label_ce(logits, one_hot, smoothing), label_ce(logits, hard, smoothing))
    soft = 0.7 * one_hot + 0.3 * torch.nn.functional.one_hot((hard + 2) % 5, 5).float()
    manual = -(soft * torch.log_softmax(logits, 1)).sum(1).mean()
    assert torch.allclose(label_ce(logits, soft), manual)
    for a, b in zip(dkd_terms(logits, teacher, soft, 4.0), dkd_terms(logits, teacher, hard, 4.0)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_the_baseline_learns_from_mixed_views_deterministically(mix):
    params = make_params(mix=mix)
    model_a, result_a, data = run_fit(0, params)
    model_b, result_b, _ = run_fit(0, params)
    assert result_a.history == result_b.history
    assert all(torch.equal(v, model_b.state_dict()[k]) for k, v in model_a.state_dict().items())
    assert result_a.best_val_accuracy >= 80.0
    assert result_a.history[-1]["train_loss"] < result_a.history[0]["train_loss"]


def test_teacher_mix_replaces_data_augment_mix_for_the_teacher_run_only(monkeypatch, tmp_path):
    """teacher.mix is what the teacher trains with; every student run keeps data.augment."""
    from kdpipe import workflow

    monkeypatch.chdir(tmp_path)
    params = parse_params({"data": {"augment": {"crop_padding": 2, "mix": "mixup", "mix_alpha": 0.4}},
                           "teacher": {"mix": "cutmix"}, "mlflow": {"enabled": False}})
    assert params.augment_for("student") == params.data.augment
    seen = {}

    class Stop(Exception):
        pass

    def record(job, **_):
        seen[job.name] = job.augment
        raise Stop

    monkeypatch.setattr(workflow, "fit", record)
    setup = workflow.Setup(params, 0, setup_runtime(params.runtime, 0), make_prepared())
    for role in ("teacher", "student"):
        model, arch_params = setup.build(role)
        with pytest.raises(Stop):
            setup.train_and_save(role, f"train_{role}", role, CrossEntropyObjective(model), arch_params)
    assert (seen["teacher"].mix, seen["teacher"].mix_alpha, seen["teacher"].crop_padding) == ("cutmix", 0.4, 2)
    assert seen["student"] == params.data.augment and seen["student"].mix == "mixup"
    unset = parse_params({"data": {"augment": {"mix": "cutmix"}}})
    assert unset.augment_for("teacher") == unset.data.augment  # null: the data set's mixing


# ---- a diverged training stops with one sentence --------------------------------------------


def test_a_diverging_training_stops_with_one_sentence_naming_the_learning_rate():
    params = make_params(student={"optimizer": "sgd", "lr": 1e30, "epochs": 3})
    epochs_seen = []
    with pytest.raises(KdpipeError, match=r"test training diverged in epoch 1 \(loss nan\); lower the learning "
                                          r"rate \(student.lr=1e\+30\)") as info:
        run_fit(0, params, on_epoch=epochs_seen.append)
    assert "\n" not in str(info.value) and epochs_seen == []  # stopped before the epoch was logged


def test_non_finite_weights_stop_training_even_when_the_loss_looks_fine():
    class Poisoned(CrossEntropyObjective):
        def forward_train(self, images, labels, ctx):
            logits, losses = super().forward_train(images, labels, ctx)
            with torch.no_grad():
                list(self.student.parameters())[-1].fill_(float("inf"))
            return logits, losses

    with pytest.raises(KdpipeError, match=r"diverged in epoch 1 \((loss|non-finite weights)"):
        run_fit(0, make_params(student={"epochs": 2}), objective_for=Poisoned)


# ---- resume after a kill: the same bytes as an uninterrupted run ------------------------------


class Killed(Exception):
    pass


def test_a_killed_training_resumes_to_the_same_weights_and_history(tmp_path):
    from kdpipe.checkpoint import Checkpoint

    params = make_params(student={"epochs": 4})
    model_a, result_a, _ = run_fit(3, params)

    checkpoint = Checkpoint("test", "fingerprint-1", tmp_path)

    def kill_after_epoch_2(row):
        if row["epoch"] == 2:
            raise Killed

    data = make_prepared()
    runtime = setup_runtime(params.runtime, 3)
    model_b = models.build("student_cnn", 1, data.num_classes, 8, widths=[8, 16], dropout=0.1)
    job = TrainJob("test", CrossEntropyObjective(model_b), data, params.student, params.data.augment, runtime, 3)
    with pytest.raises(Killed):
        fit(job, on_epoch=kill_after_epoch_2, checkpoint=checkpoint)
    assert checkpoint.path.exists()
    torch.manual_seed(12345)  # a new process: other RNG states, other initial weights
    runtime = setup_runtime(params.runtime, 3)
    model_c = models.build("student_cnn", 1, data.num_classes, 8, widths=[8, 16], dropout=0.1)
    replayed = []
    job = TrainJob("test", CrossEntropyObjective(model_c), data, params.student, params.data.augment, runtime, 3)
    result_c = fit(job, on_epoch=replayed.append, checkpoint=checkpoint)
    assert [r["epoch"] for r in replayed] == [1, 2, 3, 4]  # restored epochs replayed (to MLflow), then trained
    assert result_c.history == result_a.history
    assert (result_c.best_epoch, result_c.best_val_accuracy) == (result_a.best_epoch, result_a.best_val_accuracy)
    for key, value in model_a.state_dict().items():
        assert torch.equal(model_c.state_dict()[key], value), key


def test_a_checkpoint_of_another_run_is_never_resumed(tmp_path, capsys):
    from kdpipe.checkpoint import Checkpoint

    params = make_params(student={"epochs": 2})
    old = Checkpoint("test", "other-params", tmp_path)
    data = make_prepared()
    runtime = setup_runtime(params.runtime, 0)
    model = models.build("student_cnn", 1, data.num_classes, 8, widths=[8, 16], dropout=0.1)
    fit(TrainJob("test", CrossEntropyObjective(model), data, params.student, params.data.augment, runtime, 0),
        checkpoint=old)
    replayed = []
    new = Checkpoint("test", "these-params", tmp_path)
    runtime = setup_runtime(params.runtime, 0)
    model = models.build("student_cnn", 1, data.num_classes, 8, widths=[8, 16], dropout=0.1)
    fit(TrainJob("test", CrossEntropyObjective(model), data, params.student, params.data.augment, runtime, 0),
        on_epoch=replayed.append, checkpoint=new)
    assert "made for other params, code or inputs; training starts from epoch 1" in capsys.readouterr().err
    assert [r["epoch"] for r in replayed] == [1, 2]
