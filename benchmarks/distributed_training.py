"""One process against N under torchrun: the real train_student (or train_teacher) stage on the
project's prepared data, same params, alternating runs so both see the same machine.

    python benchmarks/distributed_training.py                  # 1 vs 2 processes, baseline student
    python benchmarks/distributed_training.py --stage train_teacher --epochs 3 --repeats 2

Run `dvc repro prepare` first (it reads data/prepared). Prints, per process count, the median
epoch time (after the first), the whole training time and the best validation accuracy, and
the CPU's model and flags. Measure with nothing else running: on a 2-core CPU two processes
take one core each, so a second concurrent job halves both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL = {"train_student": "baseline", "train_teacher": "teacher"}


def run_once(workdir: Path, stage: str, nproc: int, epochs: int | None) -> dict:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    role = "teacher" if stage == "train_teacher" else "student"
    if epochs:
        params[role]["epochs"] = epochs
    params["runtime"]["nproc"] = nproc
    params["mlflow"]["enabled"] = False
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.rmtree(workdir / "metrics", ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    result = subprocess.run([sys.executable, f"stages/{stage}.py"], cwd=workdir, env=env, capture_output=True,
                            text=True)
    if result.returncode != 0:
        sys.exit(f"{stage} with runtime.nproc={nproc} failed:\n{result.stderr[-2000:]}")
    name = MODEL[stage]
    timing = json.loads((workdir / f"metrics/timing/{name}.json").read_text())
    summary = json.loads((workdir / f"metrics/{name}.json").read_text())
    return {"epoch_s": timing["epoch_seconds_median"], "train_s": timing["train_seconds"],
            "val": summary["best_val_accuracy"], "threads": timing["machine"]["threads"], "machine": timing["machine"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=sorted(MODEL), default="train_student")
    parser.add_argument("--nproc", type=int, default=2, help="processes to compare with one")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if not (REPO_ROOT / "data/prepared/meta.json").exists():
        sys.exit("data/prepared is missing; run `dvc repro prepare` first.")
    results: dict[int, list[dict]] = {1: [], args.nproc: []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copytree(REPO_ROOT / "stages", work / "stages")
        (work / "data").mkdir()
        (work / "data/prepared").symlink_to(REPO_ROOT / "data/prepared")
        for _ in range(args.repeats):
            for nproc in results:
                results[nproc].append(run_once(work, args.stage, nproc, args.epochs))
    machine = results[1][0]["machine"]
    print(f"CPU: {machine['cpu']}, flags {' '.join(machine['flags']) or '-'}, {machine['cores']} cores, "
          f"torch {machine['torch']}; stage {args.stage}, {args.repeats} runs each, alternating")
    print(f"{'processes':>9} {'threads':>7} {'epoch s (median)':>17} {'training s':>11} {'best val %':>11}")
    for nproc, runs in results.items():
        epoch = statistics.median(r["epoch_s"] for r in runs)
        train = statistics.median(r["train_s"] for r in runs)
        vals = ", ".join(f"{r['val']:.2f}" for r in runs)
        print(f"{nproc:>9} {runs[0]['threads']:>7} {epoch:>17.3f} {train:>11.2f} {vals:>11}")
    one = statistics.median(r["epoch_s"] for r in results[1])
    many = statistics.median(r["epoch_s"] for r in results[args.nproc])
    print(f"epoch speed-up of {args.nproc} processes over 1: {one / many:.2f}x")


if __name__ == "__main__":
    main()
