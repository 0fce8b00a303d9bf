"""Validation sweep of teacher lengths over several student seeds, run as parallel stage chains.

Why: on the 3.5K-image CIFAR-10 slice one run's validation accuracy has a standard error of
about 1.8 points (609 images), so a recipe chosen from one seed is mostly chosen by noise, and
on a 2-core CPU each seed costs 10-20 minutes. A GPU box (16 cores, one GPU) runs a dozen
student trainings at once, each Python-bound and light on the GPU. This prepares the data once,
trains one teacher per ``--teachers`` epoch count, then for every (teacher, seed) runs
``teacher_targets``, ``kd_settings`` and ``distill`` for ``logit`` and ``dkd``, and for every
seed the baseline, each chain in its own scratch copy of the project, with the stage
commands read from dvc.yaml. It collects **validation accuracies only** (best over epochs and the
last epoch's) and prints each method's mean and its paired difference against the baseline of
the same seed, so the test split plays no part in the choice.

    PYTHONPATH=src python3 benchmarks/gpu_val_sweep.py --out results/ \
        --set data.cifar10.url=/path/cifar-10-mini-python.tar.gz --set data.cifar10.md5=...

Only ``results.json`` and ``log.txt`` are written under ``--out``; the stages' logs stay in
``--dir``/logs.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import json
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from gpu_stages import run_stage, scratch_copy, stage_commands, write_params

METHODS = ("logit", "dkd")


class Sweep:
    def __init__(self, scratch: Path, out: Path, commands: dict[str, str]) -> None:
        self.scratch, self.out, self.start = scratch, out, time.time()
        self.commands = commands  # dvc.yaml's cmd per stage name (foreach expanded)
        self.results: dict[str, dict[str, Any]] = {}
        (scratch / "logs").mkdir(parents=True, exist_ok=True)
        out.mkdir(parents=True, exist_ok=True)

    def log(self, message: str) -> None:
        line = f"[{time.time() - self.start:7.1f} s] {message}"
        print(line, flush=True)
        with open(self.out / "log.txt", "a") as f:
            f.write(line + "\n")

    def stages(self, project: Path, names: list[str], tag: str) -> float:
        """Run dvc.yaml stages by name in ``project``, their output in logs/<tag>.log; seconds taken."""
        start = time.time()
        with open(self.scratch / "logs" / f"{tag}.log", "a") as log:
            for name in names:
                cmd = self.commands[name]
                done = run_stage(cmd, project, stdout=log, stderr=subprocess.STDOUT)
                if done.returncode:
                    raise RuntimeError(f"{cmd} failed with rc {done.returncode} (see logs/{tag}.log)")
        return time.time() - start

    def record(self, key: str, project: Path, model: str, seconds: float) -> None:
        best = json.loads((project / f"metrics/{model}.json").read_text())
        with open(project / f"plots/history/{model}.csv") as f:
            last = list(csv.DictReader(f))[-1]
        self.results[key] = {"best_val": best["best_val_accuracy"], "best_epoch": best.get("best_epoch"),
                             "last_val": float(last["val_acc"]), "last_train": float(last["train_acc"]),
                             "seconds": round(seconds, 1)}
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, sort_keys=True))

    def branch(self, source: Path, name: str, sets: list[str]) -> Path:
        project = self.scratch / name
        shutil.copytree(source, project)
        write_params(project, sets)
        return project


def result_key(model: str, seed: int, epochs: int, teacher: int | None = None) -> str:
    """``baseline se80 s42`` or ``logit t50 se80 s42``: one student's entry in results.json."""
    return f"{model} t{teacher} se{epochs} s{seed}" if teacher is not None else f"{model} se{epochs} s{seed}"


def summary(results: dict[str, dict[str, Any]], teachers: list[int], seeds: list[int], epochs: int) -> list[str]:
    """Mean validation accuracy per method and its paired difference against the baseline."""
    lines = []
    for key in ("best_val", "last_val"):
        base = {s: results[result_key("baseline", s, epochs)][key] for s in seeds
                if result_key("baseline", s, epochs) in results}
        if not base:
            return ["no baseline finished: nothing to compare against"]
        lines.append(f"{key}: baseline {statistics.mean(base.values()):.2f}")
        for t in teachers:
            for m in METHODS:
                pairs = [(results[result_key(m, s, epochs, t)][key], base[s]) for s in base
                         if result_key(m, s, epochs, t) in results]
                if len(pairs) < 2:
                    continue
                diffs = [a - b for a, b in pairs]
                lines.append(f"  teacher {t} ep, {m}: {statistics.mean(a for a, _ in pairs):.2f}, vs baseline "
                             f"{statistics.mean(diffs):+.2f} ± {statistics.stdev(diffs):.2f} (std over {len(pairs)} seeds)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json and log.txt")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/kdpipe-sweep"), help="scratch folder")
    parser.add_argument("--preset", default="cifar10-cpu")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a params.yaml value")
    parser.add_argument("--teachers", default="50,75,100", help="teacher.epochs values, one teacher each")
    parser.add_argument("--seeds", default="42,1,2,3", help="student seeds")
    parser.add_argument("--epochs", type=int, default=80, help="student.epochs")
    parser.add_argument("--jobs", type=int, default=12, help="chains run at once")
    args = parser.parse_args()
    teachers = [int(t) for t in args.teachers.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]

    if args.dir.exists():
        shutil.rmtree(args.dir)
    base = args.dir / "base"
    params = scratch_copy(base, args.preset, [*args.set, f"kd.methods=[{','.join(METHODS)}]"])
    sweep = Sweep(args.dir, args.out, {name: cmd for name, cmd, _ in stage_commands(params)})
    sweep.stages(base, ["check_params", "download", "prepare"], "prepare")
    sweep.log("data prepared")
    student = [f"student.epochs={args.epochs}"]

    def teacher(t: int) -> None:
        project = sweep.branch(base, f"t{t}", [f"teacher.epochs={t}"])
        sweep.record(f"teacher t{t}", project, "teacher", sweep.stages(project, ["train_teacher"], f"t{t}"))

    def baseline(s: int) -> None:
        project = sweep.branch(base, f"b_s{s}", [*student, f"student.seed={s}"])
        seconds = sweep.stages(project, ["train_student"], f"b_s{s}")
        sweep.record(result_key("baseline", s, args.epochs), project, "baseline", seconds)

    def distil(t: int, s: int) -> None:
        project = sweep.branch(args.dir / f"t{t}", f"t{t}_s{s}", [*student, f"student.seed={s}"])
        seconds = sweep.stages(project, ["teacher_targets", "kd_settings", *(f"distill@{m}" for m in METHODS)],
                               f"t{t}_s{s}")
        for m in METHODS:
            sweep.record(result_key(m, s, args.epochs, t), project, f"distilled_{m}", seconds)

    with cf.ThreadPoolExecutor(args.jobs) as pool:
        jobs = {pool.submit(teacher, t): ("teacher", t) for t in teachers}
        jobs.update({pool.submit(baseline, s): ("baseline", s) for s in seeds})
        pending = set(jobs)
        while pending:
            done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for job in done:
                kind, key = jobs[job]
                if job.exception():
                    sweep.log(f"{kind} {key} FAILED: {job.exception()}")
                    continue
                sweep.log(f"{kind} {key} done")
                if kind == "teacher":  # its students start as soon as it is trained
                    for s in seeds:
                        nxt = pool.submit(distil, key, s)
                        jobs[nxt] = ("distil", (key, s))
                        pending.add(nxt)
    for line in summary(sweep.results, teachers, seeds, args.epochs):
        sweep.log(line)


if __name__ == "__main__":
    main()
