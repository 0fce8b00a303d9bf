"""The steps the stage scripts call: build the right objective, train it with the shared
engine, and write the model, its history, its metrics and its MLflow run."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdpipe import models, paths
from kdpipe.config import Params, TrainConfig
from kdpipe.data.loader import Normalizer
from kdpipe.data.prepare import PreparedData, load_prepared
from kdpipe.distill import CrossEntropyObjective, Objective, get_method
from kdpipe.errors import KdpipeError
from kdpipe.io import write_csv, write_json
from kdpipe.models.mobilenet import DEFAULT_INPUT_SIZE, load_pretrained
from kdpipe.runtime import Runtime, setup_runtime
from kdpipe.teacher_targets import teacher_targets_for
from kdpipe.tracking import stage_run
from kdpipe.train import fit


def teacher_arch_params(params: Params, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    if params.teacher.arch != "mobilenet_v2":
        return {"width": params.teacher.width}
    # the data set's statistics let the model map its inputs to what ImageNet weights expect
    return {"input_size": params.teacher.input_size or DEFAULT_INPUT_SIZE,
            "freeze_backbone": params.teacher.freeze_backbone,
            "data_mean": list(meta["mean"]) if meta else None, "data_std": list(meta["std"]) if meta else None}


def student_arch_params(params: Params) -> dict[str, Any]:
    return {"widths": list(params.student.widths), "dropout": params.student.dropout,
            "convs_per_block": params.student.convs_per_block}


def build_model(arch: str, arch_params: dict[str, Any], data: PreparedData) -> nn.Module:
    return models.build(arch, data.channels, data.num_classes, data.image_size, **arch_params)


def train_and_save(
    name: str,
    stage: str,
    objective: Objective,
    arch: str,
    arch_params: dict[str, Any],
    recipe: TrainConfig,
    params: Params,
    data: PreparedData,
    runtime: Runtime,
    method: str | None = None,
) -> dict[str, Any]:
    """Train ``objective``'s student and write models/<name>.pt, its history and metrics."""
    with stage_run(stage, params, method) as run:
        result = fit(objective, data, recipe, params.data.augment, runtime, params.seed, desc=name,
                     on_epoch=lambda row: run.log_metrics({k: v for k, v in row.items() if k != "epoch"},
                                                          step=row["epoch"]))
        student = objective.student.cpu().float().to(memory_format=torch.contiguous_format).eval()
        models.save(paths.model_path(name), student, arch, arch_params, data.meta,
                    extra={"best_epoch": result.best_epoch, "stage": stage})
        write_csv(paths.history_path(name), [{"model": name, **row} for row in result.history])
        summary = {
            "best_val_accuracy": round(result.best_val_accuracy, 4),
            "best_epoch": result.best_epoch,
            "epochs": recipe.epochs,
            "train_seconds": round(result.seconds, 2),
            "params": models.count_params(student),
            "runtime": result.runtime or runtime.describe(),
        }
        write_json(paths.train_metrics_path(name), summary)
        run.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        if params.mlflow.log_models:
            normalize = Normalizer.from_meta(data.meta["mean"], data.meta["std"])
            run.log_model(student, input_example=normalize(data.test.images[:1]).numpy())
        return summary


def train_teacher(params: Params) -> dict[str, Any]:
    runtime = setup_runtime(params.runtime, params.seed)
    data = load_prepared(paths.PREPARED_DIR)
    arch_params = teacher_arch_params(params, data.meta)
    model = build_model(params.teacher.arch, arch_params, data)
    load_pretrained(model, params.teacher.pretrained, params.teacher.weights_path)
    objective = CrossEntropyObjective(model, params.teacher.label_smoothing)
    return train_and_save(paths.TEACHER, "train_teacher", objective, params.teacher.arch, arch_params,
                          params.teacher, params, data, runtime)


def train_baseline(params: Params) -> dict[str, Any]:
    runtime = setup_runtime(params.runtime, params.seed)
    data = load_prepared(paths.PREPARED_DIR)
    arch_params = student_arch_params(params)
    model = build_model(params.student.arch, arch_params, data)
    objective = CrossEntropyObjective(model, params.student.label_smoothing)
    return train_and_save(paths.BASELINE, "train_student", objective, params.student.arch, arch_params,
                          params.student, params, data, runtime)


def distill(params: Params, method: str) -> dict[str, Any]:
    """Train the same student, same recipe and budget as the baseline, with ``method``."""
    if method not in params.kd.methods:
        raise KdpipeError(
            f"method {method!r} is not in kd.methods={params.kd.methods}; add it there "
            "(dvc.yaml runs one distill stage per entry)."
        )
    runtime = setup_runtime(params.runtime, params.seed)
    data = load_prepared(paths.PREPARED_DIR)
    arch_params = student_arch_params(params)
    student = build_model(params.student.arch, arch_params, data)
    teacher, _ = models.load(paths.model_path(paths.TEACHER))
    factory = get_method(method)
    targets = teacher_targets_for(params, teacher, data, runtime)  # kd.teacher_targets: cached | online
    objective = factory(
        student=student, teacher=teacher, targets=targets, kd=params.kd,
        temperature=params.kd.temperature, alpha=params.kd.alpha, label_smoothing=params.student.label_smoothing,
        input_shape=(data.channels, data.image_size, data.image_size), meta=data.meta,
    )
    return train_and_save(paths.distilled_name(method), "distill", objective, params.student.arch, arch_params,
                          params.student, params, data, runtime, method=method)

