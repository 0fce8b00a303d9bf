"""One training engine for the teacher, the baseline and every distillation method.

The loop is short on purpose: in-memory uint8 batches with deterministic views, one
objective that returns named loss terms, an optimiser and a per-step schedule, and
validation after every epoch with the best-on-validation weights kept.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from kdpipe.checkpoint import Checkpoint, rng_state, set_rng_state
from kdpipe.config import AugmentConfig, TrainConfig
from kdpipe.data.loader import Normalizer, TrainingBatches
from kdpipe.data.prepare import PreparedData, Split
from kdpipe.distill.base import BatchContext, Objective
from kdpipe.distributed import SINGLE, Distributed, sync_batchnorm
from kdpipe.inference import loss_and_accuracy, predict_logits
from kdpipe.errors import KdpipeError
from kdpipe.runtime import Runtime


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # one row per epoch: losses, accuracies, lr
    epoch_seconds: list[float] = field(default_factory=list)  # wall time of each epoch (kept apart)
    best_epoch: int = 0
    best_val_accuracy: float = -1.0
    seconds: float = 0.0
    runtime: dict = field(default_factory=dict)  # the runtime the student was trained with


def make_optimizer(params, recipe: TrainConfig) -> torch.optim.Optimizer:
    params = list(params)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum,
                               nesterov=recipe.nesterov and recipe.momentum > 0, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, recipe: TrainConfig, steps_per_epoch: int):
    """A scheduler stepped once per batch."""
    total = recipe.epochs * steps_per_epoch
    if recipe.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=recipe.lr, total_steps=total, pct_start=min(max(recipe.warmup_fraction, 1.01 / total), 0.99),
            anneal_strategy="linear", div_factor=10.0, final_div_factor=100.0,
            cycle_momentum=recipe.optimizer == "sgd" and recipe.momentum > 0,
            base_momentum=min(0.85, recipe.momentum), max_momentum=recipe.momentum,
        )
    if recipe.schedule == "cosine":
        warm = int(recipe.warmup_fraction * total)

        def cosine(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

        return torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    if recipe.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=recipe.step_size * steps_per_epoch, gamma=recipe.gamma)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def to_device(split: Split, device: torch.device) -> Split:
    return Split(split.images.to(device), split.labels.to(device))


@dataclass
class TrainJob:
    """One training run's inputs: what to train, on what, with which recipe, where."""

    name: str  # the model's name (progress bars, logs)
    objective: Objective
    data: PreparedData
    recipe: TrainConfig
    augment: AugmentConfig
    runtime: Runtime
    seed: int
    group: Distributed = SINGLE  # the processes training together (runtime.nproc); rank 0 writes


class TrainStep(nn.Module):
    """The objective's training step as a module's forward, which DistributedDataParallel wraps."""

    def __init__(self, objective: Objective) -> None:
        super().__init__()
        self.objective = objective

    def forward(self, images: torch.Tensor, labels: torch.Tensor, batch: BatchContext):
        return self.objective.forward_train(images, labels, batch)


def check_batches_split(group: Distributed, n_train: int, batch_size: int, key: str) -> None:
    """Every process needs images in every global batch (an empty share has no mean loss)."""
    if not group.active:
        return
    last = n_train % batch_size
    if batch_size < group.world or 0 < last < group.world:
        raise KdpipeError(
            f"with runtime.nproc={group.world} every process needs at least one image of each batch, but "
            f"{key}={batch_size} on {n_train} training images leaves "
            f"{'a batch' if batch_size < group.world else f'a last batch of {last}'} to share; "
            f"choose another {key} or runtime.nproc.")


class BestWeights:
    """Keeps a copy of the weights with the best validation accuracy so far."""

    def __init__(self) -> None:
        self.accuracy, self.epoch, self.state = -1.0, 0, None

    def update(self, model: torch.nn.Module, accuracy: float, epoch: int) -> None:
        if accuracy > self.accuracy:
            self.accuracy, self.epoch = accuracy, epoch
            self.state = copy.deepcopy(model.state_dict())

    def restore(self, model: torch.nn.Module) -> None:
        if self.state is not None:
            model.load_state_dict(self.state)


@dataclass
class Optimisation:
    """The optimiser, its per-step schedule and the loss scaler (fp16 only) of one run."""

    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler

    def step(self, loss: torch.Tensor) -> float:
        """One update; returns the learning rate it used (the scheduler then moves on)."""
        self.opt.zero_grad(set_to_none=True)
        lr = self.opt.param_groups[0]["lr"]
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        return lr


def train_epoch(job: TrainJob, batches: TrainingBatches, epoch: int, optim: Optimisation, step_fn) -> dict:
    """One epoch over ``batches``: returns the epoch's training row (loss terms, accuracy, lr, time)."""
    runtime, recipe, group = job.runtime, job.recipe, job.group
    job.objective.train()
    sums: dict[str, torch.Tensor] = {}
    correct = torch.zeros((), device=runtime.device)
    lr, start, n_train = 0.0, time.perf_counter(), len(batches.split)
    for batch in tqdm(batches.epoch(epoch), total=batches.steps, desc=f"{job.name} epoch {epoch + 1}/{recipe.epochs}",
                      leave=False, disable=None if group.is_main else True, file=sys.stderr):
        with runtime.autocast():
            logits, losses = step_fn(batch.images, batch.labels, BatchContext(batch.indices, epoch))
        n = batch.labels.shape[0]
        # a share of a global batch: weighted so that DDP's gradient average is the global mean
        lr = optim.step(sum(losses.values()) * group.loss_weight(n, batch.total or n))
        for name, value in losses.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float() * n
        # mixed batches carry soft labels (N×K): a prediction is right when it is the dominant class
        labels = batch.labels.argmax(1) if batch.labels.ndim == 2 else batch.labels
        correct += (logits.detach().argmax(1) == labels).sum()
    if group.active:  # the epoch's totals over all processes' shares
        names = list(sums)  # the same order on every rank: the same objective made them
        totals = group.all_sum(torch.stack([correct.float(), *(sums[k] for k in names)]))
        correct, sums = totals[0], dict(zip(names, totals[1:]))
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)  # time the work, not its queueing
    return {
        "train_loss": round(sum(v.item() for v in sums.values()) / n_train, 6),
        "train_acc": round(correct.item() / n_train * 100.0, 4),
        "lr": round(lr, 8),  # of the epoch's last update
        "epoch_seconds": round(time.perf_counter() - start, 3),
        **{f"train_{name}": round(v.item() / n_train, 6) for name, v in sums.items()},
    }


def validate(model: torch.nn.Module, val: Split, normalize: Normalizer, runtime: Runtime) -> tuple[float, float]:
    """(loss, accuracy %) of ``model`` on the validation split."""
    logits = predict_logits(model, val, normalize, 512, runtime.autocast(), runtime.memory_format)
    return loss_and_accuracy(logits, val.labels)


def check_finite(job: TrainJob, student: torch.nn.Module, row: dict) -> None:
    """Stop a diverged training (a NaN or infinite loss or weight) with one sentence, before
    any model file is written: its weights would be garbage scored as a result."""
    bad_loss = not all(math.isfinite(v) for k, v in row.items() if k.startswith(("train_", "val_")))
    bad_weights = not all(bool(torch.isfinite(p).all()) for p in student.parameters())
    if bad_loss or bad_weights:
        key = "teacher.lr" if job.name == "teacher" else "student.lr"
        what = f"loss {row['train_loss']}" if bad_loss else "non-finite weights"
        raise KdpipeError(f"{job.name} training diverged in epoch {row['epoch']} ({what}); lower the learning rate "
                          f"({key}={job.recipe.lr:g}) or the loss weights, and run again (no model was written).")


def training_state(objective: Objective, optim: "Optimisation", best: BestWeights, result: TrainResult,
                   seconds: float) -> dict:
    """Everything needed to continue after the last finished epoch (:mod:`kdpipe.checkpoint`)."""
    return {
        "objective": objective.state_dict(), "optimizer": optim.opt.state_dict(),
        "scheduler": optim.sched.state_dict(), "scaler": optim.scaler.state_dict(),
        "best": {"accuracy": best.accuracy, "epoch": best.epoch, "state": best.state},
        "history": result.history, "epoch_seconds": result.epoch_seconds, "seconds": seconds,
        "rng": rng_state(),
    }


def resume(job: TrainJob, checkpoint: Checkpoint, objective: Objective, optim: "Optimisation", best: BestWeights,
           result: TrainResult, on_epoch: Callable[[dict], None] | None) -> int:
    """Load ``checkpoint`` into this run if it was made for it; returns the first epoch to train
    (0: start from scratch). The restored epochs are replayed to ``on_epoch`` (MLflow)."""
    state = checkpoint.load()
    if state is None:
        return 0
    objective.load_state_dict(state["objective"])
    optim.opt.load_state_dict(state["optimizer"])
    optim.sched.load_state_dict(state["scheduler"])
    optim.scaler.load_state_dict(state["scaler"])
    best.accuracy, best.epoch, best.state = state["best"]["accuracy"], state["best"]["epoch"], state["best"]["state"]
    result.history[:] = state["history"]
    result.epoch_seconds[:] = state["epoch_seconds"]
    result.seconds = state["seconds"]
    set_rng_state(state["rng"])
    done = len(result.history)
    if job.group.is_main:
        print(f"{job.name}: resuming from {checkpoint.path} after epoch {done} of {job.recipe.epochs} "
              f"(best validation accuracy so far {best.accuracy:.2f}% at epoch {best.epoch})", file=sys.stderr)
    if on_epoch is not None:
        for row, seconds in zip(result.history, result.epoch_seconds):
            on_epoch({**row, "epoch_seconds": seconds})
    return done


def fit(job: TrainJob, on_epoch: Callable[[dict], None] | None = None,
        checkpoint: Checkpoint | None = None) -> TrainResult:
    """Train ``job.objective.student`` in place; on return it holds the best-on-validation weights.

    With a ``checkpoint``, every finished epoch is saved there and a matching checkpoint left by
    a killed run is resumed (the result is the same as an uninterrupted run's).

    In a training group (``job.group``) every process calls this: each trains on its share of
    every batch under DistributedDataParallel; rank 0 validates (its result is shared, so all
    take the same decisions) and alone saves checkpoints and calls ``on_epoch``."""
    objective, data, recipe, group = job.objective, job.data, job.recipe, job.group
    check_batches_split(group, len(data.train), recipe.batch_size,
                        "teacher.batch_size" if job.name == "teacher" else "student.batch_size")
    job = replace(job, runtime=job.runtime.for_model(objective.student, (data.channels, data.image_size, data.image_size)))
    runtime = job.runtime
    objective.student = sync_batchnorm(objective.student, group, runtime.device)
    student = objective.student
    objective.to(runtime.device, memory_format=runtime.memory_format)
    batches = TrainingBatches.for_run(data, recipe.batch_size, job.augment, job.seed, runtime, group=group)
    val = to_device(data.val, runtime.device) if group.is_main else None
    opt = make_optimizer(objective.trainable_parameters(), recipe)
    optim = Optimisation(opt, make_scheduler(opt, recipe, batches.steps),
                         torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16))
    step = group.wrap(TrainStep(objective), runtime.device) if group.active else objective.forward_train
    # compile time is not hidden: it is part of the first epoch's epoch_seconds and of seconds
    step_fn = torch.compile(step) if runtime.compile else step

    result, best, start = TrainResult(), BestWeights(), time.perf_counter()
    first = resume(job, checkpoint, objective, optim, best, result, on_epoch) if checkpoint is not None else 0
    for epoch in range(first, recipe.epochs):
        trained = train_epoch(job, batches, epoch, optim, step_fn)
        seconds = trained.pop("epoch_seconds")
        val_loss, val_acc = validate(student, val, batches.normalize, runtime) if group.is_main else (0.0, 0.0)
        val_loss, val_acc = group.from_main((val_loss, val_acc), runtime.device)
        row = {"epoch": epoch + 1, "train_loss": trained.pop("train_loss"), "train_acc": trained.pop("train_acc"),
               "val_loss": round(val_loss, 6), "val_acc": round(val_acc, 4), **trained}
        check_finite(job, student, row)
        result.history.append(row)  # no timing in the history: it stays a function of the inputs
        result.epoch_seconds.append(seconds)
        best.update(student, val_acc, epoch + 1)
        if not group.is_main:
            continue
        if checkpoint is not None:
            checkpoint.save(training_state(objective, optim, best, result, result.seconds + time.perf_counter() - start))
        tqdm.write(f"{job.name} epoch {epoch + 1}/{recipe.epochs}: loss {row['train_loss']:.4f} "
                   f"train {row['train_acc']:.2f}% val {val_acc:.2f}% ({seconds:.1f}s)"
                   + (f" [{group.world} processes]" if group.active else ""), file=sys.stderr)
        if on_epoch is not None:
            on_epoch({**row, "epoch_seconds": seconds})
    best.restore(student)
    result.best_epoch, result.best_val_accuracy = best.epoch, best.accuracy
    result.seconds += time.perf_counter() - start  # plus the killed run's epochs when resumed
    result.runtime = runtime.describe()
    return result
