"""The steps the stage scripts call: build the right objective, train it with the shared
engine, and write the model, its history, its metrics and its MLflow run."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdpipe import distributed, machine, models, paths
from kdpipe.checkpoint import Checkpoint, run_fingerprint
from kdpipe.config import Params
from kdpipe.data.loader import Normalizer
from kdpipe.data.prepare import PreparedData, load_prepared
from kdpipe.distill.base import METHODS, CrossEntropyObjective, MethodInputs, Objective, needs_teacher_module
from kdpipe.errors import KdpipeError
from kdpipe.io import write_csv, write_json
from kdpipe.runtime import Runtime, setup_runtime
from kdpipe.teacher_targets import teacher_source
from kdpipe.tracking import stage_run
from kdpipe.train import TrainJob, TrainResult, fit


@dataclass
class Setup:
    """What every training stage starts from: validated params, the run's seed, the runtime
    (RNGs seeded with it, threads set), the prepared data and, under torchrun
    (``runtime.nproc`` > 1), this process's place in the training group.

    The teacher run uses ``teacher.seed`` and the student runs (baseline, distill)
    ``student.seed`` (``params.seed_for``; null: the global seed), which seeds the
    initialisation, the batch order and the augmented views, so seed replicates of the
    students share the split and the teacher, and several teachers can share the split."""

    params: Params
    seed: int
    runtime: Runtime
    data: PreparedData
    group: distributed.Distributed = distributed.SINGLE

    @classmethod
    def load(cls, params: Params, role: str) -> "Setup":
        seed = params.seed_for(role)
        runtime = setup_runtime(params.runtime, seed)
        return cls(params, seed, runtime, load_prepared(paths.PREPARED_DIR), distributed.init(runtime.device))

    def build(self, role: str) -> tuple[nn.Module, dict[str, Any]]:
        """A fresh model of the ``teacher`` or ``student`` section's architecture, and the
        builder arguments its model file records."""
        cfg = getattr(self.params, role)
        arch_params = models.arch_params(cfg.arch, cfg.arch_settings, self.data.meta)
        d = self.data
        return models.build(cfg.arch, d.channels, d.num_classes, d.image_size, **arch_params), arch_params

    def train_and_save(self, name: str, stage: str, role: str, objective: Objective, arch_params: dict[str, Any],
                       method: str | None = None, inputs: tuple[Path, ...] = ()) -> dict[str, Any]:
        """Train ``objective``'s student with the ``role`` recipe; write models/<name>.pt, its
        history, its metrics and its MLflow run. A checkpoint of a killed run with the same
        params, code and ``inputs`` (besides the prepared data) is resumed. In a training group
        every process trains and rank 0 alone writes."""
        inputs = (paths.PREPARED_DIR, *inputs)
        params, data, recipe = self.params, self.data, getattr(self.params, role)
        job = TrainJob(name, objective, data, recipe, params.augment_for(role), self.runtime, self.seed, self.group)
        checkpoint = Checkpoint(name, run_fingerprint(stage + (f"@{method}" if method else ""), inputs))
        if not self.group.is_main:
            fit(job, checkpoint=checkpoint)  # reads a checkpoint to resume from, never writes one
            return {}
        with stage_run(stage, params, method) as run:
            result = fit(job, on_epoch=lambda row: run.log_metrics(
                {k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"]), checkpoint=checkpoint)
            student = objective.student.cpu().float().to(memory_format=torch.contiguous_format).eval()
            models.save(paths.model_path(name), student, recipe.arch, arch_params, data.meta,
                        extra={"best_epoch": result.best_epoch, "stage": stage})
            write_csv(paths.history_path(name), [{"model": name, **row} for row in result.history])
            summary = {
                "best_val_accuracy": round(result.best_val_accuracy, 4),
                "best_epoch": result.best_epoch,
                "epochs": recipe.epochs,
                "params": models.count_params(student),
                "runtime": result.runtime or self.runtime.describe(),
            }
            write_json(paths.train_metrics_path(name), summary)
            timing = {**training_timing(result, self.runtime.threads), "processes": self.group.world}
            write_json(paths.timing_path(name), timing)
            run.log_metrics({k: v for k, v in {**summary, **timing}.items() if isinstance(v, (int, float))})
            if params.mlflow.log_models:
                normalize = Normalizer.from_meta(data.meta["mean"], data.meta["std"])
                run.log_model(student, input_example=normalize(data.test.images[:1]).numpy())
        checkpoint.remove()  # the model file is written: nothing left to resume
        return summary


def training_timing(result: TrainResult, threads: int) -> dict[str, Any]:
    """What a training cost on this machine (metrics/timing/<model>.json): the total, the first
    epoch (it carries warm-up and any compilation) and the median of the others."""
    later = result.epoch_seconds[1:] or result.epoch_seconds
    return {
        "train_seconds": round(result.seconds, 2),
        "first_epoch_seconds": round(result.epoch_seconds[0], 3) if result.epoch_seconds else None,
        "epoch_seconds_median": round(statistics.median(later), 3) if later else None,
        "machine": machine.describe(threads),
    }


def train_teacher(params: Params) -> dict[str, Any]:
    setup = Setup.load(params, "teacher")
    model, arch_params = setup.build("teacher")
    initialize = models.MODELS.get(params.teacher.arch).info.get("initialize")
    if initialize is not None:  # e.g. mobilenet_v2's pretrained weights
        initialize(model, params.teacher.arch_settings)
    objective = CrossEntropyObjective(model, params.teacher.label_smoothing)
    return setup.train_and_save(paths.TEACHER, "train_teacher", "teacher", objective, arch_params,
                                inputs=(Path("teachers/pretrained"),))


def train_baseline(params: Params) -> dict[str, Any]:
    setup = Setup.load(params, "student")
    model, arch_params = setup.build("student")
    objective = CrossEntropyObjective(model, params.student.label_smoothing)
    return setup.train_and_save(paths.BASELINE, "train_student", "student", objective, arch_params)


def distill(params: Params, method: str, settings: Any | None = None) -> dict[str, Any]:
    """Train the same student, same recipe and budget as the baseline, with ``method`` and its
    ``settings`` (default: ``params.kd.<method>`` with the shared values it reads)."""
    if method not in params.kd.methods:
        raise KdpipeError(
            f"method {method!r} is not in kd.methods={params.kd.methods}; add it there "
            "(dvc.yaml runs one distill stage per entry)."
        )
    plugin = METHODS.get(method)
    settings = params.kd.method(method) if settings is None else settings
    setup = Setup.load(params, "student")
    student, arch_params = setup.build("student")
    teacher, _ = models.load(paths.model_path(paths.TEACHER), setup.data.meta)
    cached = getattr(settings, "teacher_targets", "online") == "cached"  # methods without it read no logits
    live = needs_teacher_module(method)
    targets = teacher_source(teacher, setup.data, params.student, params.data.augment, setup.seed, setup.runtime,
                             cached=cached, live=live, flip=getattr(settings, "teacher_flip", False))
    data = setup.data
    inputs = MethodInputs(student, targets, params.student.label_smoothing,
                          (data.channels, data.image_size, data.image_size), data.meta)
    objective = plugin.factory(inputs, settings)
    input_files = (paths.model_path(paths.TEACHER), paths.TEACHER_TARGETS_DIR / "meta.json",
              paths.KD_SETTINGS_DIR / f"{method}.json",
              *(Path(t) for t in getattr(settings, "teachers", ())))
    return setup.train_and_save(paths.distilled_name(method), "distill", "student", objective, arch_params,
                                method=method, inputs=input_files)
