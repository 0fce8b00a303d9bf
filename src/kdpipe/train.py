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
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from kdpipe.config import AugmentConfig, TrainConfig
from kdpipe.data.loader import Normalizer, augmentation, place_split, train_batches
from kdpipe.data.prepare import PreparedData, Split
from kdpipe.distill.base import BatchContext, Objective
from kdpipe.inference import loss_and_accuracy, predict_logits
from kdpipe.runtime import Runtime


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
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


def fit(
    objective: Objective,
    data: PreparedData,
    recipe: TrainConfig,
    augment: AugmentConfig,
    runtime: Runtime,
    seed: int,
    desc: str,
    on_epoch: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train ``objective.student`` in place; on return it holds the best-on-validation weights."""
    student = objective.student
    runtime = runtime.for_model(student, (data.channels, data.image_size, data.image_size))
    objective.to(runtime.device, memory_format=runtime.memory_format)
    normalize = Normalizer.from_meta(data.meta["mean"], data.meta["std"], runtime.device)
    train, val = place_split(data.train, runtime.device), to_device(data.val, runtime.device)
    pad, flip = augmentation(augment, data.meta)
    steps = math.ceil(len(train) / recipe.batch_size)
    opt = make_optimizer(objective.trainable_parameters(), recipe)
    sched = make_scheduler(opt, recipe, steps)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16)
    # compile time is not hidden: it is part of the first epoch's epoch_seconds and of seconds
    step_fn = torch.compile(objective.forward_train) if runtime.compile else objective.forward_train

    result, best_state, start = TrainResult(), None, time.perf_counter()
    for epoch in range(recipe.epochs):
        objective.train()
        sums: dict[str, torch.Tensor] = {}
        correct = torch.zeros((), device=runtime.device)
        epoch_start = time.perf_counter()
        batches = train_batches(train, recipe.batch_size, seed, epoch, pad, flip, normalize,
                                runtime.memory_format, runtime.device)
        for batch in tqdm(batches, total=steps, desc=f"{desc} epoch {epoch + 1}/{recipe.epochs}", leave=False,
                          disable=None, file=sys.stderr):
            with runtime.autocast():
                logits, losses = step_fn(batch.images, batch.labels, BatchContext(batch.indices, epoch))
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            lr = opt.param_groups[0]["lr"]  # the rate this step uses (the scheduler then moves on)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            n = batch.labels.numel()
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float() * n
            correct += (logits.detach().argmax(1) == batch.labels).sum()
        if runtime.device.type == "cuda":
            torch.cuda.synchronize(runtime.device)  # time the work, not its queueing
        train_seconds = time.perf_counter() - epoch_start
        val_logits = predict_logits(student, val, normalize, 512, runtime.autocast(), runtime.memory_format)
        val_loss, val_acc = loss_and_accuracy(val_logits, val.labels)
        row = {
            "epoch": epoch + 1,
            "train_loss": round(sum(v.item() for v in sums.values()) / len(train), 6),
            "train_acc": round(correct.item() / len(train) * 100.0, 4),
            "val_loss": round(val_loss, 6),
            "val_acc": round(val_acc, 4),
            "lr": round(lr, 8),  # of the epoch's last update
            "epoch_seconds": round(train_seconds, 3),
            **{f"train_{name}": round(v.item() / len(train), 6) for name, v in sums.items()},
        }
        result.history.append(row)
        if val_acc > result.best_val_accuracy:
            result.best_val_accuracy, result.best_epoch = val_acc, epoch + 1
            best_state = copy.deepcopy(student.state_dict())
        tqdm.write(
            f"{desc} epoch {epoch + 1}/{recipe.epochs}: loss {row['train_loss']:.4f} "
            f"train {row['train_acc']:.2f}% val {val_acc:.2f}% ({train_seconds:.1f}s)",
            file=sys.stderr,
        )
        if on_epoch is not None:
            on_epoch(row)
    if best_state is not None:
        student.load_state_dict(best_state)
    result.seconds = time.perf_counter() - start
    result.runtime = runtime.describe()
    return result
