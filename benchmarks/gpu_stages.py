"""Run a preset's stages in dvc.yaml's order on a GPU machine, without DVC or MLflow, and time them.

Why: CI and the developers' machines have no GPU, so the CUDA paths (AMP, the data set kept
on the GPU, pinned copies of cached teacher targets, cuDNN) run only where a GPU is lent, on
a machine that may not have DVC or MLflow installed. This copies the project into a scratch
folder, writes the preset into its params.yaml (MLflow off), runs each stage's ``cmd`` from
dvc.yaml in order (``foreach`` expanded over ``kd.methods``), prints the seconds per stage and
the test accuracies, then runs ``--repeat`` stages a second time and says whether their model
files came out with the same bytes: DVC's run cache and ``dvc.lock`` assume they do.

    PYTHONPATH=src python3 benchmarks/gpu_stages.py --preset cifar10-cpu \
        --set data.cifar10.url=/path/cifar-10-mini-python.tar.gz --set data.cifar10.md5=...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".git", ".venv", ".dvc", "mlruns", "mlflow.db", ".kdpipe", ".gpu", "__pycache__"}  # at the root


# kdpipe.presets edits params.yaml through ruamel (kept comments), which a GPU box without DVC
# lacks: these two do the same on plain PyYAML dicts for the scratch copy.
def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def set_dotted(tree: dict[str, Any], dotted: str, raw: str) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = yaml.safe_load(raw)


def write_params(project: Path, sets: list[str], preset: str | None = None) -> dict[str, Any]:
    """Write ``KEY=VALUE`` settings (after the preset, if any) into a scratch copy's params.yaml."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    if preset:
        merge(params, yaml.safe_load((ROOT / "conf/presets" / f"{preset}.yaml").read_text()))
    for item in sets:
        key, _, value = item.partition("=")
        set_dotted(params, key, value)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def scratch_copy(dest: Path, preset: str | None, sets: list[str]) -> dict[str, Any]:
    """Copy the project (no .git, venv, DVC or MLflow state) to ``dest`` with the preset and
    settings written into its params.yaml, MLflow off; returns those params."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(ROOT, dest, ignore=lambda d, names: [n for n in names if n in SKIP and Path(d) == ROOT])
    return write_params(dest, ["mlflow.enabled=false", *sets], preset)


def run_stage(cmd: str, project: Path, **popen: Any) -> subprocess.CompletedProcess:
    """Run one dvc.yaml ``cmd`` in a scratch copy with this interpreter and its own ``src``."""
    env = {**os.environ, "PYTHONPATH": str(project / "src"), "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}
    return subprocess.run(cmd.replace("python ", f"{sys.executable} ", 1), shell=True, cwd=project, env=env, **popen)


def stage_commands(params: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    """(name, cmd, cached outs) for every stage of dvc.yaml in its order, foreach expanded;
    the cached outs are those DVC stores (not ``cache: false`` metrics, plots and histories)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = []
    for name, stage in stages.items():
        items = [(f"{name}@{item}", stage["do"], str(item)) for item in params["kd"]["methods"]] \
            if "foreach" in stage else [(name, stage, None)]
        for full_name, body, item in items:
            def sub(text: str) -> str:
                return text.replace("${item}", item) if item else text
            cached = [o if isinstance(o, str) else next(iter(o)) for o in body.get("outs", [])
                      if isinstance(o, str) or next(iter(o.values())).get("cache", True)]
            out.append((full_name, sub(body["cmd"]), [sub(o) for o in cached]))
    return out


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def run(name: str, cmd: str, project: Path) -> float:
    start = time.perf_counter()
    proc = run_stage(cmd, project)
    seconds = time.perf_counter() - start
    print(f"== {name}: {seconds:.1f} s (rc {proc.returncode})", flush=True)
    if proc.returncode:
        raise SystemExit(f"stage {name} failed with rc {proc.returncode}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", help="conf/presets/<name>.yaml written over params.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a params.yaml value")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/kdpipe-gpu"), help="scratch copy of the project")
    parser.add_argument("--repeat", nargs="*", default=["train_student", "teacher_targets"],
                        help="stages run twice to compare their model files' bytes")
    args = parser.parse_args()

    params = scratch_copy(args.dir, args.preset, args.set)

    import torch
    print(f"torch {torch.__version__}, CUDA {torch.cuda.is_available()}"
          + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""), flush=True)
    commands = {name: (cmd, cached) for name, cmd, cached in stage_commands(params)}
    times = {name: run(name, cmd, args.dir) for name, (cmd, _) in commands.items()}
    total = sum(times.values())
    print(f"== all stages: {total:.1f} s ({total / 60:.1f} min)")
    evaluation = json.loads((args.dir / "metrics/evaluation.json").read_text())
    for model, values in evaluation.items():
        if isinstance(values, dict) and "test_accuracy" in values:
            print(f"   {model}: test {values['test_accuracy']}  ci95 {values.get('test_accuracy_ci95')}")

    for name in args.repeat:
        cmd, cached = commands[name]
        files = [args.dir / p for p in cached]
        files = [f for p in files for f in (sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p])]
        before = {str(f.relative_to(args.dir)): digest(f) for f in files}
        run(f"{name} again", cmd, args.dir)
        after = {k: digest(args.dir / k) for k in before}
        same = before == after
        print(f"== {name} twice: {'same bytes' if same else 'DIFFERENT bytes'} "
              + ", ".join(f"{k} {before[k]}/{after[k]}" for k in before if before[k] != after[k] or same)[:600])


if __name__ == "__main__":
    main()
