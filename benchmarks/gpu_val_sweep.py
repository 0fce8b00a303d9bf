"""Validation sweep of teacher lengths and student recipes over several student seeds, run as
parallel stage chains.

Why: on the 3.5K-image CIFAR-10 slice one run's validation accuracy has a standard error of
about 1.8 points (609 images), so a recipe chosen from one seed is mostly chosen by noise, and
on a 2-core CPU each seed costs 10-20 minutes. A GPU box (16 cores, one GPU) runs a dozen
student trainings at once, each Python-bound and light on the GPU. This prepares the data once,
trains one teacher per ``--teachers`` epoch count, then for every student recipe
(``--variant NAME KEY=VALUE ...``: params set for the students, e.g. their epochs and mixing),
every teacher and every seed runs ``teacher_targets``, ``kd_settings`` and ``distill`` for
``logit`` and ``dkd`` (the two in parallel), and for every recipe and seed the baseline, each
chain in its own scratch copy of the project, with the stage commands read from dvc.yaml. It
collects **validation accuracies only** (best over epochs and the last epoch's) and prints
each method's mean, its paired difference against the baseline of the same recipe and seed,
and against the best baseline recipe's, so the test split plays no part in the choice.

    PYTHONPATH=src python3 benchmarks/gpu_val_sweep.py --out results/ --teachers 50 \
        --variant se80 student.epochs=80 --variant se160mix student.epochs=160 data.augment.mix=mixup \
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
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpu_stages import run_stage, scratch_copy, stage_commands, write_params

METHODS = ("logit", "dkd")


class Sweep:
    def __init__(self, scratch: Path, out: Path, commands: dict[str, str]) -> None:
        self.scratch, self.out, self.start = scratch, out, time.time()
        self.commands = commands  # dvc.yaml's cmd per stage name (foreach expanded)
        self.results: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()  # chains finish in parallel threads
        (scratch / "logs").mkdir(parents=True, exist_ok=True)
        out.mkdir(parents=True, exist_ok=True)

    def log(self, message: str) -> None:
        line = f"[{time.time() - self.start:7.1f} s] {message}"
        print(line, flush=True)
        with self.lock, open(self.out / "log.txt", "a") as f:
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
        with self.lock:
            self.results[key] = {"best_val": best["best_val_accuracy"], "best_epoch": best.get("best_epoch"),
                                 "last_val": float(last["val_acc"]), "last_train": float(last["train_acc"]),
                                 "seconds": round(seconds, 1)}
            (self.out / "results.json").write_text(json.dumps(self.results, indent=1, sort_keys=True))

    def branch(self, source: Path, name: str, sets: list[str]) -> Path:
        project = self.scratch / name
        shutil.copytree(source, project)
        write_params(project, sets)
        return project


def result_key(model: str, seed: int, variant: str, teacher: int | None = None) -> str:
    """``baseline se80 s42`` or ``logit t50 se80 s42``: one student's entry in results.json."""
    return f"{model} t{teacher} {variant} s{seed}" if teacher is not None else f"{model} {variant} s{seed}"


def paired(results: dict[str, dict[str, Any]], key: str, student: Callable[[int], str],
           base: dict[int, float]) -> tuple[float, float, float, int] | None:
    """A student recipe's mean over the seeds it shares with ``base``, and the mean and std of its
    paired differences against it; ``None`` under two seeds."""
    pairs = [(results[student(s)][key], b) for s, b in base.items() if student(s) in results]
    if len(pairs) < 2:
        return None
    diffs = [a - b for a, b in pairs]
    return statistics.mean(a for a, _ in pairs), statistics.mean(diffs), statistics.stdev(diffs), len(pairs)


def _diff_words(stats: tuple[float, float, float, int] | None) -> str:
    if stats is None:
        return "fewer than 2 seeds finished"
    _, mean, std, n = stats
    return f"vs baseline {mean:+.2f} ± {std:.2f} (std over {n} seeds)"


def summary(results: dict[str, dict[str, Any]], teachers: list[int], seeds: list[int],
            variants: list[str]) -> list[str]:
    """Mean validation accuracy per recipe and method, with its paired difference against the
    baseline of the same recipe and against the best baseline recipe (KD must beat the best)."""
    lines = []
    for key in ("best_val", "last_val"):
        bases = {v: {s: results[result_key("baseline", s, v)][key] for s in seeds
                     if result_key("baseline", s, v) in results} for v in variants}
        bases = {v: b for v, b in bases.items() if b}
        if not bases:
            return ["no baseline finished: nothing to compare against"]
        best = max(bases, key=lambda v: statistics.mean(bases[v].values()))
        lines.append(f"{key}: best baseline {best}")
        for v in variants:
            if v not in bases:
                lines.append(f"  {v}: no baseline finished")
                continue
            lines.append(f"  {v}: baseline {statistics.mean(bases[v].values()):.2f} over {len(bases[v])} seeds")
            for t in teachers:
                for m in METHODS:
                    def student(s: int, m: str = m, v: str = v, t: int = t) -> str:
                        return result_key(m, s, v, t)
                    own = paired(results, key, student, bases[v])
                    lines.append(f"    teacher {t} ep, {m}: "
                                 + (f"{own[0]:.2f}, " if own else "") + _diff_words(own))
                    if v != best:
                        lines.append(f"      against the {best} baseline: "
                                     + _diff_words(paired(results, key, student, bases[best])))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json and log.txt")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/kdpipe-sweep"), help="scratch folder")
    parser.add_argument("--preset", default="cifar10-cpu")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a params.yaml value")
    parser.add_argument("--teachers", default="50,75,100", help="teacher.epochs values, one teacher each")
    parser.add_argument("--seeds", default="42,1,2,3", help="student seeds")
    parser.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"),
                        help="a student recipe: its name, then params.yaml values set for the baseline "
                             "and the distilled students (repeatable; default: se80 student.epochs=80)")
    parser.add_argument("--jobs", type=int, default=12, help="chains run at once")
    args = parser.parse_args()
    teachers = [int(t) for t in args.teachers.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = {v[0]: v[1:] for v in (args.variant or [["se80", "student.epochs=80"]])}

    if args.dir.exists():
        shutil.rmtree(args.dir)
    base = args.dir / "base"
    params = scratch_copy(base, args.preset, [*args.set, f"kd.methods=[{','.join(METHODS)}]"])
    sweep = Sweep(args.dir, args.out, {name: cmd for name, cmd, _ in stage_commands(params)})
    sweep.stages(base, ["check_params", "download", "prepare"], "prepare")
    sweep.log("data prepared")
    def teacher(t: int) -> None:
        project = sweep.branch(base, f"t{t}", [f"teacher.epochs={t}"])
        sweep.record(f"teacher t{t}", project, "teacher", sweep.stages(project, ["train_teacher"], f"t{t}"))

    def baseline(v: str, s: int) -> None:
        project = sweep.branch(base, f"b_{v}_s{s}", [*variants[v], f"student.seed={s}"])
        seconds = sweep.stages(project, ["train_student"], f"b_{v}_s{s}")
        sweep.record(result_key("baseline", s, v), project, "baseline", seconds)

    def distil(t: int, v: str, s: int) -> None:
        tag = f"t{t}_{v}_s{s}"
        project = sweep.branch(args.dir / f"t{t}", tag, [*variants[v], f"student.seed={s}"])
        seconds = sweep.stages(project, ["teacher_targets", "kd_settings"], tag)
        # the methods are independent once the targets exist; each gets its own copy, since
        # kdpipe lets one stage at a time run in a workspace
        copies = {m: sweep.branch(project, f"{tag}_{m}", []) for m in METHODS}
        with cf.ThreadPoolExecutor(len(METHODS)) as methods:
            runs = {m: methods.submit(sweep.stages, copies[m], [f"distill@{m}"], f"{tag}_{m}") for m in METHODS}
        for m in METHODS:
            sweep.record(result_key(m, s, v, t), copies[m], f"distilled_{m}", seconds + runs[m].result())

    with cf.ThreadPoolExecutor(args.jobs) as pool:
        jobs = {pool.submit(teacher, t): ("teacher", t) for t in teachers}
        jobs.update({pool.submit(baseline, v, s): ("baseline", (v, s)) for v in variants for s in seeds})
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
                    for v in variants:
                        for s in seeds:
                            nxt = pool.submit(distil, key, v, s)
                            jobs[nxt] = ("distil", (key, v, s))
                            pending.add(nxt)
    for line in summary(sweep.results, teachers, seeds, list(variants)):
        sweep.log(line)


if __name__ == "__main__":
    main()
