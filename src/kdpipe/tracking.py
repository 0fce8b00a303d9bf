"""MLflow: one run per stage execution, tagged so DVC experiments and MLflow runs line up."""

from __future__ import annotations

import contextlib
import os
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kdpipe.config import Params, flatten
from kdpipe.redact import redact

PROJECT_ROOT_ENV = "KDPIPE_ROOT"


def default_tracking_uri(root: str | Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store at the project root.

    DVC gives every stage command ``DVC_ROOT``: the repository root, also when ``dvc exp run
    --temp`` or ``--queue`` runs the stage in a temporary copy whose store would be thrown away.
    """
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path(root or os.environ.get(PROJECT_ROOT_ENV) or os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
    return f"sqlite:///{root / 'mlflow.db'}"


def git_revision(cwd: str | Path = ".") -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class StageRun:
    """The handle a stage logs through; every call is a no-op when MLflow is disabled."""

    def __init__(self, mlflow_module: Any | None) -> None:
        self._mlflow = mlflow_module

    @property
    def enabled(self) -> bool:
        return self._mlflow is not None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._mlflow is not None:
            clean = {k.replace("@", "_"): float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            self._mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._mlflow is not None and Path(path).exists():
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_model(self, model: Any, input_example: Any, name: str = "model") -> None:
        """Log a torch model with an input example; pinned requirements avoid a slow
        dependency inference."""
        if self._mlflow is None:
            return
        import mlflow.pytorch
        import numpy as np
        import torch

        example = np.asarray(input_example)
        if example.ndim > 0 and example.shape[0] == 1:
            # MLflow exports with torch.export, which fixes a size-1 batch dimension: the logged
            # model would then refuse any batch but one image. Two images keep it dynamic.
            example = np.concatenate([example, example])

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mlflow.pytorch.log_model(
                model, name=name, input_example=example,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            )


@contextlib.contextmanager
def stage_run(stage: str, params: Params, method: str | None = None) -> Iterator[StageRun]:
    """Open one MLflow run for this stage execution (or a disabled handle)."""
    if not params.mlflow.enabled:
        yield StageRun(None)
        return
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    import mlflow

    mlflow.set_tracking_uri(default_tracking_uri())
    mlflow.set_experiment(params.mlflow.experiment)
    tags = {
        "stage": stage,
        "dataset": params.data.name,
        "kd_method": method or "none",
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "git_revision": git_revision(),
        "mlflow.source.git.commit": git_revision(),
    }
    run_name = f"{stage}@{method}" if method else stage
    with mlflow.start_run(run_name=run_name, tags=tags):
        mlflow.log_params({k: redact(v) for k, v in flatten(params).items()})
        yield StageRun(mlflow)
