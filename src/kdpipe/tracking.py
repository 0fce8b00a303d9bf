"""MLflow: one parent run per pipeline execution, one nested run per stage execution, tagged so
DVC experiments and MLflow runs line up.

* **Parent runs.** Every stage process opens its run under the parent run of its pipeline
  execution: the ``dvc repro`` or ``dvc exp run`` (queued or not) that started it. Stages are
  separate processes, so they find the parent by a key they share (tag ``kdpipe.execution``):
  the project root, ``DVC_EXP_NAME``, the git revision and the DVC process that runs the stages
  (its pid and start time; every ``dvc repro``, ``dvc exp run`` and queued experiment's
  ``dvc exp exec-run`` is its own process). A stage started by hand, outside DVC, has no DVC
  process: its key holds the params instead, and it joins a parent only if that parent saw
  activity in the last :data:`REUSE_MINUTES` minutes and has no run of the same stage yet.
  The parent is named after the DVC experiment, or ``workspace @ <short rev>`` for a plain
  ``dvc repro``; it is created FINISHED (it never stays RUNNING), every stage moves its end
  time, and a failed stage marks it FAILED.
* **Queued and parallel experiments.** ``dvc queue start -j N`` runs each experiment in a
  temporary copy, but with ``DVC_ROOT`` set to the repository, so the default store below is the
  project's; each experiment's stages share its ``dvc exp exec-run`` process, hence one parent per
  experiment. On a team server (``MLFLOW_TRACKING_URI``) runs of several machines meet: a stage
  ends only runs of its own machine (tag ``kdpipe.host``) whose process is gone.
* **Test accuracy on each model's own run.** :func:`log_model_results` (called by ``evaluate``)
  logs every model's test accuracy into the run that trained it.
* **Runs table first.** kdpipe creates its experiment with ``mlflow.experimentKind`` =
  ``custom_model_development`` (MLflow 3's "Machine learning" kind, not GenAI).
* **Self-contained artifacts.** ``mlflow.artifact_location`` (default ``mlruns``) is resolved
  against the project root when kdpipe creates the experiment; MLflow then stores that absolute
  path, so when the project's own SQLite store finds itself in another folder (the project was
  moved or copied), kdpipe rewrites the stored locations from the old root to the new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from kdpipe import paths
from kdpipe.config import Params, flatten
from kdpipe.errors import KdpipeError
from kdpipe.io import file_digest
from kdpipe.redact import redact

PROJECT_ROOT_ENV = "KDPIPE_ROOT"

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
# MLflow 3 knows "genai_development" and "custom_model_development" (shown as "Machine learning").
EXPERIMENT_KIND = "custom_model_development"
PARENT_TAG = "mlflow.parentRunId"
EXECUTION_TAG = "kdpipe.execution"
PID_TAG = "kdpipe.pid"  # on a stage run: its process, so a run left RUNNING by a SIGKILL can be ended
HOST_TAG = "kdpipe.host"  # on a stage run: the machine of that process (a team server holds runs of many)
RUN_KIND_TAG = "kdpipe.run_kind"  # "pipeline" on parent runs, "stage" on stage runs
MODEL_DIGEST_TAG = "kdpipe.model_sha256"  # on a training run: the sha256 of the model file it wrote
ROOT_TAG = "kdpipe.project_root"  # on the experiment: the project root its artifact locations are under
LOCATION_TAG = "kdpipe.artifact_location"  # on the experiment: mlflow.artifact_location when created
REUSE_MINUTES = 30  # outside DVC only: how long a parent stays open to the next stage
UI_QUERY = "workflowType=machine_learning"
TELEMETRY_ENV = ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")  # MLflow's switches; kdpipe sets the first if neither is

_EXPERIMENT_IDS: dict[tuple[str, ...], str] = {}
_STAGE_OF_MODEL = {paths.TEACHER: "train_teacher", paths.BASELINE: "train_student"}


def project_root(root: str | Path | None = None) -> Path:
    """``root``, else ``KDPIPE_ROOT``, else ``DVC_ROOT``, else the working directory, resolved.

    DVC gives every stage command ``DVC_ROOT``: the repository root, also when ``dvc exp run
    --temp`` or ``--queue`` runs the stage in a temporary copy that is thrown away afterwards.
    """
    return Path(root or os.environ.get(PROJECT_ROOT_ENV) or os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def default_tracking_uri(root: str | Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store at the project root."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{project_root(root) / 'mlflow.db'}"


def git_revision(cwd: str | Path = ".") -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ------------------------------------------------------------------------------ artifact location

def _is_uri(value: str) -> bool:
    """``s3://…``, ``file:///…``, ``mlflow-artifacts:/…``; not a Windows drive (``C:\\…``)."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", value) is not None


def _local_path(location: str | None) -> Path | None:
    """The local folder of an artifact location (a path or a ``file:`` URI), else None."""
    if not location:
        return None
    if location.startswith("file:"):
        return Path(unquote(urlsplit(location).path))
    if _is_uri(location):
        return None
    return Path(location)


def _is_local_store(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("sqlite:", "file:")) or not _is_uri(tracking_uri)


def artifact_location(configured: str, root: str | Path | None = None,
                      tracking_uri: str | None = None) -> str | None:
    """Where a new experiment keeps its artifacts: ``configured`` (``mlflow.artifact_location``)
    resolved against the project root when it is a relative folder, as given when it is an
    absolute path or a URI. A relative folder means nothing to a remote tracking server: then
    None, the server's own default (e.g. ``mlflow server --artifacts-destination``)."""
    if _is_uri(configured) or Path(configured).is_absolute():
        return configured
    if not _is_local_store(tracking_uri or default_tracking_uri(root)):
        return None
    return str(project_root(root) / configured)


def _own_store(tracking_uri: str, root: Path) -> Path | None:
    """The project's own SQLite file (``<root>/mlflow.db``) if ``tracking_uri`` is it, else None."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri[len("sqlite:///"):]).resolve()
    return db if db == (root / "mlflow.db").resolve() else None


def _rebase(value: str | None, old_root: str, new_root: str) -> str | None:
    """``value`` (a path or ``file:`` URI) moved from under ``old_root`` to under ``new_root``,
    or None when it is not under ``old_root``."""
    if not value:
        return None
    for scheme in ("", "file://"):
        old = scheme + old_root.rstrip("/")
        if value == old or value.startswith(old + "/"):
            return scheme + new_root.rstrip("/") + value[len(old):]
    return None


def _relocate(db: Path, experiment_id: str, old_root: str, new_root: str) -> int:
    """Rewrite every artifact location of the experiment under ``old_root`` to the same place
    under ``new_root`` (the experiment's, its runs' and its logged models'); the count rewritten.

    MLflow has no API to change a stored artifact location, so this edits the project's own
    SQLite store: columns ``experiments.artifact_location``, ``runs.artifact_uri`` and
    ``logged_models.artifact_location`` (tests/test_tracking.py checks them against MLflow)."""
    columns = (("experiments", "artifact_location"), ("runs", "artifact_uri"), ("logged_models", "artifact_location"))
    changed = 0
    with contextlib.closing(sqlite3.connect(db, timeout=60)) as con, con:
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        for table, column in columns:
            if table not in tables:
                continue
            rows = con.execute(f"SELECT rowid, {column} FROM {table} WHERE experiment_id = ?",
                               (int(experiment_id),)).fetchall()
            for rowid, value in rows:
                moved = _rebase(value, old_root, new_root)
                if moved is not None:
                    con.execute(f"UPDATE {table} SET {column} = ? WHERE rowid = ?", (moved, rowid))
                    changed += 1
    return changed


def _check_location(client: Any, experiment: Any, params: Params, root: Path, tracking_uri: str) -> None:
    """Keep an existing experiment's artifacts inside a moved or copied project, or say in one
    sentence why its artifacts are not where ``mlflow.artifact_location`` says."""
    configured = params.mlflow.artifact_location
    old_root = experiment.tags.get(ROOT_TAG)
    current = _local_path(experiment.artifact_location)
    db = _own_store(tracking_uri, root)
    if db is not None and current is not None:
        if old_root is None and current.is_relative_to(root):  # made by an older kdpipe, in this project
            client.set_experiment_tag(experiment.experiment_id, ROOT_TAG, str(root))
        elif old_root is not None and old_root != str(root) and current.is_relative_to(old_root):
            count = _relocate(db, experiment.experiment_id, old_root, str(root))
            client.set_experiment_tag(experiment.experiment_id, ROOT_TAG, str(root))
            print(f"kdpipe: this project moved from {old_root}: MLflow experiment '{experiment.name}' now keeps "
                  f"its artifacts under {root} ({count} stored locations rewritten).", file=sys.stderr)
            experiment = client.get_experiment(experiment.experiment_id)
            current = _local_path(experiment.artifact_location)
    expected = artifact_location(configured, root, tracking_uri)
    if expected is None or experiment.artifact_location == expected or (
            current is not None and _local_path(expected) == current):
        return
    if experiment.tags.get(LOCATION_TAG) is None and current is not None and current.is_relative_to(root) \
            and not _is_uri(configured) and not Path(configured).is_absolute():
        return  # made by an older kdpipe (MLflow's default mlruns/<id>), still inside the project
    print(f"kdpipe: MLflow experiment '{experiment.name}' keeps its artifacts in {experiment.artifact_location}, "
          f"not in {expected} (mlflow.artifact_location), because MLflow fixes an experiment's artifact location "
          f"when it creates it: set a new mlflow.experiment name to use {expected}.", file=sys.stderr)


def ensure_experiment(client: Any, params: Params, root: Path, tracking_uri: str) -> str:
    """The id of the experiment ``mlflow.experiment``, created the kdpipe way if missing: the
    "Machine learning" kind, artifacts at ``mlflow.artifact_location``."""
    from mlflow.exceptions import MlflowException

    name = params.mlflow.experiment
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, ROOT_TAG: str(root),
                LOCATION_TAG: params.mlflow.artifact_location}
        try:
            return client.create_experiment(
                name, artifact_location=artifact_location(params.mlflow.artifact_location, root, tracking_uri),
                tags=tags)
        except MlflowException:  # another stage (a parallel queued experiment) created it first
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        from kdpipe.errors import KdpipeError

        raise KdpipeError(f"MLflow experiment '{name}' is deleted: restore it (mlflow experiments restore "
                          f"--experiment-id {experiment.experiment_id}) or set another mlflow.experiment.")
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    _check_location(client, experiment, params, root, tracking_uri)
    return experiment.experiment_id


# ----------------------------------------------------------------------------- pipeline executions

@dataclass(frozen=True)
class Execution:
    """One pipeline execution, as a stage process sees it.

    ``key`` is shared by the stages of one execution and differs between executions; ``exact``
    says it names a DVC process (else it is the fallback of a stage run outside DVC)."""

    key: str
    name: str
    exact: bool
    exp_name: str
    revision: str


def _is_dvc_command(cmdline: list[str]) -> bool:
    """``dvc …``, ``python …/bin/dvc …`` or ``python -m dvc …``."""
    if any(Path(arg).name.lower() in ("dvc", "dvc.exe") for arg in cmdline[:2]):
        return True
    return len(cmdline) >= 3 and cmdline[1] == "-m" and cmdline[2] == "dvc"


def start_stamp(proc: Any) -> float:
    """When ``proc`` (a ``psutil.Process``) started, as a number that never changes while it runs.

    On Linux psutil's ``create_time()`` is the start in clock ticks since boot *plus the boot
    time*, which the kernel derives from the wall clock: when NTP or a VM adjusts the clock, a
    process's create_time moves by a second (the likely cause of one 28-minute ``dvc exp run``
    whose stages found three different parents). The ticks since boot (``/proc/<pid>/stat``,
    field 22) do not."""
    try:
        with open(f"/proc/{proc.pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # after the command name, which may hold spaces
        return float(int(fields[19]))  # field 22: starttime, in clock ticks after boot
    except (OSError, IndexError, ValueError):
        return proc.create_time()  # other systems store an absolute start time


def dvc_process() -> tuple[int, float] | None:
    """(pid, start stamp) of the DVC process running this stage (``dvc repro``, ``dvc exp run``,
    a queued experiment's ``dvc exp exec-run``), or None outside DVC."""
    if not (os.environ.get("DVC_STAGE") or os.environ.get("DVC_ROOT")):
        return None
    try:
        import psutil
    except ImportError:
        return None
    try:
        proc = psutil.Process().parent()
        for _ in range(12):
            if proc is None:
                return None
            if _is_dvc_command(proc.cmdline()):
                return proc.pid, start_stamp(proc)
            proc = proc.parent()
    except psutil.Error:
        return None
    return None


def current_execution(params: Params, root: Path) -> Execution:
    exp_name = os.environ.get("DVC_EXP_NAME", "")
    revision = git_revision()
    process = dvc_process()
    if process is not None:
        basis = f"dvc:{process[0]}:{process[1]:.3f}"
    else:
        basis = "params:" + json.dumps({k: str(v) for k, v in flatten(params).items()}, sort_keys=True)
    key = hashlib.sha256(f"{root}\n{exp_name}\n{revision}\n{basis}".encode()).hexdigest()[:24]
    name = exp_name or ("workspace" if revision == "unknown" else f"workspace @ {revision[:7]}")
    return Execution(key, name, process is not None, exp_name, revision)


def _children(client: Any, experiment_id: str, parent_id: str) -> list[Any]:
    return client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
                              max_results=1000, order_by=["attributes.start_time DESC"])


def find_parent(client: Any, experiment_id: str, execution: Execution, run_name: str | None = None) -> str | None:
    """The parent run of ``execution`` that a stage run named ``run_name`` may join, or None.

    A parent already holding a run of that name belongs to an earlier execution (a DVC
    execution runs each stage once); outside DVC, a parent idle for :data:`REUSE_MINUTES` is closed."""
    found = client.search_runs([experiment_id], filter_string=f"tags.`{EXECUTION_TAG}` = '{execution.key}'",
                               max_results=1, order_by=["attributes.start_time DESC"])
    if not found:
        return None
    parent = found[0]
    if run_name is not None:
        if run_name in {child.info.run_name for child in _children(client, experiment_id, parent.info.run_id)}:
            return None
        last = parent.info.end_time or parent.info.start_time
        if not execution.exact and time.time() * 1000 - last > REUSE_MINUTES * 60_000:
            return None
    return parent.info.run_id


def _run_tags(params: Params, execution: Execution, stage: str, method: str | None) -> dict[str, str]:
    return {
        "stage": stage,
        "dataset": params.data.name,
        "kd_method": method or "none",
        "dvc_exp_name": execution.exp_name,
        "git_revision": execution.revision,
        "mlflow.source.git.commit": execution.revision,
    }


def _params(params: Params) -> dict[str, Any]:
    return {k: redact(v) for k, v in flatten(params).items()}


def create_parent(client: Any, experiment_id: str, execution: Execution, params: Params) -> str:
    """A FINISHED parent run for ``execution``, with the params it ran with."""
    from mlflow.entities import Param

    where = f"DVC experiment {execution.exp_name}" if execution.exp_name else "dvc repro in the workspace"
    tags = {**_run_tags(params, execution, "pipeline", None), EXECUTION_TAG: execution.key,
            RUN_KIND_TAG: "pipeline",
            "mlflow.note.content": f"One pipeline execution ({where}, git {execution.revision[:7]}); "
                                   "its stage runs are nested below."}
    run = client.create_run(experiment_id, run_name=execution.name, tags=tags)
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in _params(params).items()])
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def _touch_parent(client: Any, parent_id: str, failed: bool) -> None:
    """The parent ends when its latest stage ends; a failed stage fails the execution."""
    status = "FAILED" if failed else client.get_run(parent_id).info.status
    client.set_terminated(parent_id, "FAILED" if status == "FAILED" else "FINISHED")


def _import_mlflow() -> Any:
    """``import mlflow`` with its logs quietened and, unless the user chose
    (``MLFLOW_DISABLE_TELEMETRY`` or ``DO_NOT_TRACK`` set), its usage telemetry off: MLflow
    otherwise starts a telemetry client in every stage process, which can cost about a second of
    each stage's start-up and reaches for the network from pipelines that often run offline."""
    if not any(os.environ.get(name) for name in TELEMETRY_ENV):
        os.environ[TELEMETRY_ENV[0]] = "true"
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    import mlflow

    return mlflow


def _setup(params: Params) -> tuple[Any, Any, str, Path]:
    """mlflow, a client, the experiment id and the project root, with MLflow's logs quietened."""
    mlflow = _import_mlflow()
    from mlflow.tracking import MlflowClient

    root = project_root()
    uri = default_tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    known = (uri, str(root), params.mlflow.experiment, params.mlflow.artifact_location)
    if known not in _EXPERIMENT_IDS:  # once per process: evaluate sets up twice
        _EXPERIMENT_IDS[known] = ensure_experiment(client, params, root, uri)
    experiment_id = _EXPERIMENT_IDS[known]
    mlflow.set_experiment(experiment_id=experiment_id)
    return mlflow, client, experiment_id, root


def model_of_stage(stage: str, method: str | None) -> str | None:
    """The model a training stage writes (``teacher``, ``baseline``, ``distilled_<method>``)."""
    if stage == "distill" and method:
        return paths.distilled_name(method)
    return {v: k for k, v in _STAGE_OF_MODEL.items()}.get(stage)


def training_run_name(model: str) -> str:
    """The stage run that trains ``model``: train_teacher, train_student or distill@<method>."""
    if paths.is_distilled(model):
        return f"distill@{model[len(paths.distilled_name('')):]}"
    return _STAGE_OF_MODEL[model]


def _file_digest(path: Path) -> str | None:
    return file_digest(path) if path.is_file() else None


# ---------------------------------------------------------------------------------- stage runs

class StageRun:
    """The handle a stage logs through; every call is a no-op when MLflow is disabled.

    Tracking never costs a training: the first failing call (a store that became unwritable, a
    server that went away) prints one warning and turns the handle off; the stage goes on and
    writes its outputs. With ``mlflow.required: true`` the failure stops the stage instead."""

    def __init__(self, mlflow_module: Any | None, params: Params | None = None) -> None:
        self._mlflow = mlflow_module
        self._params = params

    @property
    def enabled(self) -> bool:
        return self._mlflow is not None

    def _safely(self, what: str, call: Any) -> Any:
        if self._mlflow is None:
            return None
        try:
            return call()
        except Exception as exc:
            if self._params is not None and self._params.mlflow.required:
                raise KdpipeError(f"MLflow failed while {what} ({_short(exc)}) and mlflow.required is true; fix "
                                  f"the tracking store {redact(default_tracking_uri())} or set mlflow.required: "
                                  "false.") from None
            warn(f"MLflow failed while {what} ({_short(exc)}); this stage goes on without tracking")
            self._mlflow = None
            return None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        clean = {k.replace("@", "_"): float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self._safely("logging metrics", lambda: self._mlflow.log_metrics(clean, step=step))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if Path(path).exists():
            self._safely(f"logging {path}", lambda: self._mlflow.log_artifact(str(path), artifact_path=artifact_path))

    def log_model(self, model: Any, input_example: Any, name: str = "model") -> None:
        """Log a torch model with an input example, pickled with kdpipe's own code beside it
        (``code_paths``): it loads where kdpipe is not installed, and a stage does not pay
        MLflow's default ``pt2`` format, a ``torch.export`` trace of a few seconds per model
        (the deployable export is the ONNX stage's). Pinned requirements avoid a slow
        dependency inference."""
        if self._mlflow is None:
            return
        import numpy as np
        import torch

        import kdpipe

        example = np.asarray(input_example)

        def log() -> None:
            import mlflow.pytorch

            with warnings.catch_warnings(), _quiet_pickle_warning():
                warnings.simplefilter("ignore")
                mlflow.pytorch.log_model(model, name=name, input_example=example, serialization_format="pickle",
                                         code_paths=[str(Path(kdpipe.__file__).parent)],
                                         pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])

        self._safely("logging the model", log)

    def log_model_results(self, results: dict[str, dict[str, Any]]) -> dict[str, str]:
        """:func:`log_model_results` with this stage's params."""
        if self._params is None:
            return {}
        return self._safely("logging test accuracies", lambda: log_model_results(self._params, results)) or {}

    def log_onnx_model(self, path: str | Path, input_example: Any, name: str) -> None:
        """Log an ONNX file with MLflow's ONNX flavour: the signature comes from the input
        example (its batch dimension stays free), the requirements are the pinned runtimes."""
        if self._mlflow is None:
            return
        import numpy as np

        example = np.asarray(input_example)

        def log() -> None:
            import mlflow.onnx
            import onnx
            import onnxruntime
            from mlflow.models import infer_signature

            sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            outputs = dict(zip([o.name for o in sess.get_outputs()],
                               sess.run(None, {sess.get_inputs()[0].name: example})))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mlflow.onnx.log_model(
                    onnx.load(str(path)), name=name, input_example=example,
                    signature=infer_signature(example, outputs), onnx_execution_providers=["CPUExecutionProvider"],
                    save_as_external_data=False,
                    pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}"],
                )

        self._safely(f"logging {path}", log)


@contextlib.contextmanager
def _quiet_pickle_warning() -> Iterator[None]:
    """Drop MLflow's warning that a pickled model runs code when loaded: kdpipe chose pickle on
    purpose (README, `mlflow.log_models`), and the same paragraph on every training stage buries
    the stage's own output. Only that message is dropped."""
    logger = logging.getLogger("mlflow.pytorch")

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Saving pytorch model by Pickle")

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return redact(text[:160])


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def unreachable(uri: str, timeout_s: float = 5.0) -> str | None:
    """Why the tracking store at ``uri`` cannot be used (one phrase), or None. Takes at most
    ``timeout_s``: an http(s) server must answer, a local store must be writable."""
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
        except urllib.error.HTTPError:
            return None  # it answered: reachable
        except (OSError, ValueError) as exc:
            return f"no answer within {timeout_s:g}s ({_short(getattr(exc, 'reason', exc))})"
        return None
    if parts.scheme == "sqlite":
        db = Path(unquote(parts.path[1:] if parts.path.startswith("//") else parts.path))
        folder = db.parent
        if db.exists() and not os.access(db, os.W_OK):
            return f"{db} is read-only"
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            return f"{folder} is not a writable folder"
    return None


def _stale_runs_killed(client: Any, experiment_id: str, tracking_uri: str) -> None:
    """Mark KILLED the stage runs still RUNNING whose process is gone (a SIGKILL).

    Only this machine's runs: on a team server another machine's pid says nothing here. A run
    without a host tag (an older kdpipe) counts as this machine's only in a local store."""
    import psutil

    host = socket.gethostname()
    local = _is_local_store(tracking_uri)
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=200):
        pid = run.data.tags.get(PID_TAG)
        if run.data.tags.get(HOST_TAG, host if local else None) != host:
            continue
        if pid and pid.isdigit() and int(pid) != os.getpid() and not psutil.pid_exists(int(pid)):
            client.set_terminated(run.info.run_id, "KILLED")


@contextlib.contextmanager
def stage_run(stage: str, params: Params, method: str | None = None) -> Iterator[StageRun]:
    """Open this stage execution's MLflow run, nested under its pipeline execution's parent run
    (found or created), or a disabled handle: MLflow off, or its store unusable and not
    ``mlflow.required`` (one warning)."""
    if not params.mlflow.enabled:
        yield StageRun(None)
        return
    opened = _open_stage_run(stage, params, method)
    if opened is None:
        yield StageRun(None)
        return
    mlflow, client, parent_id = opened
    status = "FAILED"
    try:
        yield StageRun(mlflow, params)
        status = "FINISHED"
    except (KeyboardInterrupt, Exception) as exc:
        status = "FAILED" if isinstance(exc, Exception) else "KILLED"
        raise
    except BaseException:  # SIGTERM (kdpipe.stage.Terminated)
        status = "KILLED"
        raise
    finally:
        _close_stage_run(mlflow, client, parent_id, stage, method, status)


def _open_stage_run(stage: str, params: Params, method: str | None) -> tuple[Any, Any, str] | None:
    uri = default_tracking_uri()
    problem = unreachable(uri)
    try:
        if problem is None:
            mlflow, client, experiment_id, root = _setup(params)
            _stale_runs_killed(client, experiment_id, uri)
            execution = current_execution(params, root)
            run_name = f"{stage}@{method}" if method else stage
            parent_id = find_parent(client, experiment_id, execution, run_name) or create_parent(
                client, experiment_id, execution, params)
            tags = {**_run_tags(params, execution, stage, method), RUN_KIND_TAG: "stage", PID_TAG: str(os.getpid()),
                    HOST_TAG: socket.gethostname()}
            mlflow.start_run(run_name=run_name, experiment_id=experiment_id, tags=tags, parent_run_id=parent_id)
            mlflow.log_params(_params(params))
            return mlflow, client, parent_id
    except Exception as exc:
        problem = _short(exc)
    if params.mlflow.required:
        raise KdpipeError(f"the MLflow tracking store {redact(uri)} cannot be used ({problem}); start or fix it, "
                          "or set mlflow.required: false to run without it.")
    warn(f"the MLflow tracking store {redact(uri)} cannot be used ({problem}); this stage runs without "
         "tracking (mlflow.required: false)")
    return None


def _close_stage_run(mlflow: Any, client: Any, parent_id: str, stage: str, method: str | None, status: str) -> None:
    """End the stage run and update its parent; a failure here is a warning, never the stage's."""
    try:
        active = mlflow.active_run()
        model = model_of_stage(stage, method)
        digest = _file_digest(paths.model_path(model)) if model and status == "FINISHED" else None
        if active is not None and digest:
            client.set_tag(active.info.run_id, MODEL_DIGEST_TAG, digest)
        mlflow.end_run(status)
        _touch_parent(client, parent_id, status != "FINISHED")
    except Exception as exc:
        warn(f"could not close the MLflow run of {stage} ({_short(exc)})")


def _result_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The test accuracy (with its 95% interval) and, for a distilled model, the paired
    comparison with the baseline, as MLflow metric names."""
    out: dict[str, float] = {}
    for key in ("test_accuracy", "test_accuracy_ci95", "accuracy_diff_vs_baseline", "accuracy_diff_ci95",
                "mcnemar_p", "gap_closed"):
        value = result.get(key)
        if isinstance(value, (list, tuple)) and len(value) == 2:
            out[f"{key}_low"], out[f"{key}_high"] = float(value[0]), float(value[1])
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def _training_run(client: Any, experiment_id: str, parent_id: str | None, model: str) -> Any | None:
    """The run that trained ``model``: the one in this execution's parent, else (the model
    came from an earlier execution's cache) the latest run tagged with the model file's digest."""
    run_name = training_run_name(model)
    if parent_id is not None:
        for child in _children(client, experiment_id, parent_id):
            if child.info.run_name == run_name:
                return child
    digest = _file_digest(paths.model_path(model))
    if digest is None:
        return None
    found = client.search_runs([experiment_id], filter_string=f"tags.`{MODEL_DIGEST_TAG}` = '{digest}'",
                               max_results=1, order_by=["attributes.start_time DESC"])
    return found[0] if found else None


def log_model_results(params: Params, results: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Log each model's test results (``evaluate``'s ``results``: model name -> metrics) into the
    run that trained it (train_teacher, train_student, distill@<method>), and
    ``<model>.test_accuracy`` into this execution's parent run. Returns model -> run id."""
    if not params.mlflow.enabled:
        return {}
    mlflow, client, experiment_id, root = _setup(params)
    from mlflow.entities import Metric

    active = mlflow.active_run()
    if active is not None:
        parent_id = client.get_run(active.info.run_id).data.tags.get(PARENT_TAG)
    else:
        parent_id = find_parent(client, experiment_id, current_execution(params, root))
    now = int(time.time() * 1000)
    logged: dict[str, str] = {}
    summary: list[Any] = []
    for model, result in results.items():
        metrics = _result_metrics(result)
        if "test_accuracy" in metrics:
            summary.append(Metric(f"{model}.test_accuracy", metrics["test_accuracy"], now, 0))
        try:
            run = _training_run(client, experiment_id, parent_id, model)
        except KeyError:  # not a model kdpipe trains
            continue
        if run is None or not metrics:
            continue
        if all(run.data.metrics.get(k) == v for k, v in metrics.items()):
            logged[model] = run.info.run_id  # already there (an earlier evaluate of the same file)
            continue
        client.log_batch(run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
        logged[model] = run.info.run_id
    if parent_id is not None and summary:
        client.log_batch(parent_id, metrics=summary)
    return logged


def experiment_url(params: Params, base: str = "http://127.0.0.1:5000") -> str:
    """The UI address of the experiment's runs table: MLflow 3.17's UI opens an experiment on the
    view its sidebar switch last chose, GenAI by default, unless the address says
    ``workflowType=machine_learning``. Without a local store yet: the experiment list."""
    uri = default_tracking_uri()
    db = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
    if db is None or not db.is_file():
        return f"{base}/#/experiments?{UI_QUERY}"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        row = con.execute("SELECT experiment_id FROM experiments WHERE name = ? AND lifecycle_stage = 'active'",
                          (params.mlflow.experiment,)).fetchone()
    if row is None:
        return f"{base}/#/experiments?{UI_QUERY}"
    return f"{base}/#/experiments/{row[0]}?{UI_QUERY}"
