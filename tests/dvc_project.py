"""A throw-away copy of the project as its own git + DVC repository, for the end-to-end tests.

Why this exists: test_pipeline_e2e, test_data_e2e, test_e2e_kd_methods and test_dvc_teacher_targets
each used to build this copy themselves, with four slightly different lists of what to copy; when
dvc.yaml gained a dependency on ``teachers/`` one of them forgot it and broke. Now the list is
:data:`PROJECT_FILES`, in one place, and :func:`make_dvc_project` checks it against the inputs
dvc.yaml declares, so the next new dependency folder fails here with a message that says so.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from kdpipe import presets
from tests.conftest import PROJECT_ROOT

# What a DVC run of the project reads, and nothing it writes (data/, models/, metrics/, plots/ and
# reports/ are outputs, dvc.lock is the record of a run): the code, the stage scripts, the data-set
# presets, the teachers' folders, the pipeline and its params, the package description, the ignores.
PROJECT_FILES = ("src", "stages", "conf", "teachers", "examples", "dvc.yaml", "params.yaml", "pyproject.toml",
                 ".gitignore", ".dvcignore")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
# Variables that tie a process to some other DVC run or kdpipe project: the copy must not inherit them.
RUN_CONTEXT_VARS = ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_ROOT", "KDPIPE_ROOT")
GIT_USER, GIT_EMAIL = "kdpipe-test", "test@example.com"


def _param(dotted: str) -> Any:
    """The shipped params.yaml's value at ``dotted`` (e.g. ``data.imagefolder.path``)."""
    node = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    for key in dotted.split("."):
        node = node[key]
    return node


def dvc_inputs(dvc_yaml: Path = PROJECT_ROOT / "dvc.yaml") -> set[str]:
    """Top-level files/folders that dvc.yaml's stages depend on but no stage produces; a dependency
    that is all one params value (``${data.imagefolder.path}``) counts with its shipped value."""
    def top(entry: str | Mapping[str, Any]) -> str:
        path = entry if isinstance(entry, str) else next(iter(entry))
        whole = re.fullmatch(r"\$\{([\w.]+)\}", path)
        return Path(_param(whole.group(1)) if whole else path).parts[0]

    deps: set[str] = set()
    outs: set[str] = set()
    for stage in yaml.safe_load(dvc_yaml.read_text())["stages"].values():
        body = stage.get("do", stage)  # foreach stages keep their definition under `do`
        deps.update(top(d) for d in body.get("deps", []))
        for key in ("outs", "metrics", "plots"):
            outs.update(top(o) for o in body.get(key, []))
    return deps - outs


def set_params(path: Path, overrides: Mapping[str, Any]) -> None:
    """Write ``overrides`` (dotted keys, e.g. ``"teacher.epochs"``) into the params file at ``path``."""
    params = yaml.safe_load(path.read_text())
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = params
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def _run(cmd: list[str], cwd: Path, env: Mapping[str, str]) -> None:
    done = subprocess.run(cmd, cwd=cwd, env=dict(env), capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def make_dvc_project(dest: Path, params: Mapping[str, Any] | None = None, *, preset: str | None = None,
                     commit: bool = True, mlflow_db: Path | None = None,
                     env: Mapping[str, str] | None = None) -> tuple[Path, dict[str, str]]:
    """Copy the project into ``dest`` and make it a git + DVC repository with no outputs yet.

    ``preset`` (a conf/presets name) is applied to params.yaml first, as ``python -m kdpipe.presets``
    would, then ``params`` (dotted keys). The DVC config and plot templates are copied after
    ``dvc init``; with ``commit`` everything is committed. Returns ``(dest, env)``: the environment for
    running git, dvc and the stages there (this interpreter's bin first on PATH, ``dest/src`` as
    PYTHONPATH, MLflow in sqlite at ``mlflow_db`` (default ``dest/mlflow.db``), a git identity, no DVC
    analytics, no inherited DVC/kdpipe run context), updated with ``env``.
    """
    missing = dvc_inputs() - set(PROJECT_FILES)
    if missing:
        pytest.fail(f"dvc.yaml depends on {sorted(missing)}: add it to PROJECT_FILES in {__file__}")
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        source = PROJECT_ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=IGNORED)
        else:
            shutil.copy2(source, dest / name)
    if preset is not None:
        presets.apply(preset, dest / "params.yaml", dest / "conf" / "presets")  # the documented switch
    if params:
        set_params(dest / "params.yaml", params)

    run_env = {
        **{key: value for key, value in os.environ.items() if key not in RUN_CONTEXT_VARS},
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONPATH": str(dest / "src"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{mlflow_db or dest / 'mlflow.db'}",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": GIT_USER, "GIT_AUTHOR_EMAIL": GIT_EMAIL,
        "GIT_COMMITTER_NAME": GIT_USER, "GIT_COMMITTER_EMAIL": GIT_EMAIL,
        **(env or {}),
    }

    _run(["git", "init", "-q"], dest, run_env)
    _run(["git", "config", "user.name", GIT_USER], dest, run_env)
    _run(["git", "config", "user.email", GIT_EMAIL], dest, run_env)
    _run(["dvc", "init", "-q"], dest, run_env)
    shutil.copy2(PROJECT_ROOT / ".dvc" / "config", dest / ".dvc" / "config")
    shutil.copytree(PROJECT_ROOT / ".dvc" / "plots", dest / ".dvc" / "plots", dirs_exist_ok=True)
    if commit:
        _run(["git", "add", "-A"], dest, run_env)
        _run(["git", "commit", "-q", "-m", "project without outputs"], dest, run_env)
    return dest, run_env
