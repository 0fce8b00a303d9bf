"""Training speed: kdpipe's engine against a plain PyTorch loop written the way common KD
repositories write it, side by side in one run, on CIFAR-shaped data.

The reference loop: a torchvision ``Compose([RandomCrop(32, padding=4),
RandomHorizontalFlip(), ToTensor(), Normalize(...)])`` applied per image through PIL in a
``DataLoader`` (``num_workers=0``), float32 NCHW models, Adam, and for KD the teacher run
on every batch. kdpipe: :func:`kdpipe.train.fit` with the default runtime (threads, bf16 per
model, channels_last), whole-batch uint8 views and SGD; KD with the teacher online, and
with cached targets (:mod:`kdpipe.teacher_targets`).

Each comparison runs its two loops in lockstep, one epoch of each in turn, so that both see
the same machine load; the figure per loop is the median epoch time over the epochs after
the first (warm-up). Printed last, one JSON line::

    student_speedup              reference student epoch / kdpipe student epoch
    teacher_speedup              reference teacher epoch / kdpipe teacher epoch
    distill_online_speedup       reference KD epoch / kdpipe KD epoch (teacher online)
    distill_cached_over_baseline kdpipe KD epoch with cached targets / kdpipe baseline epoch
    compile_<role>_speedup       kdpipe eager epoch / kdpipe epoch with runtime.compile (with
                                 ``--only compile_student,compile_teacher``; compile time is in
                                 the first epoch, printed as the compile overhead)

Run (from the repository root; a short run: ``--epochs 2 --images 1024``)::

    PYTHONPATH=src python benchmarks/train_speed.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cifar_data import CIFAR_MEAN, CIFAR_STD, load_cifar  # noqa: E402

from kdpipe import models  # noqa: E402
from kdpipe.config import AugmentConfig, RuntimeConfig, TrainConfig  # noqa: E402
from kdpipe.data.loader import TrainingBatches  # noqa: E402
from kdpipe.data.prepare import PreparedData, Split  # noqa: E402
from kdpipe.distill import CrossEntropyObjective, MethodInputs, OnlineTeacher, TeacherLogits  # noqa: E402
from kdpipe.distill.logit import LogitKD, LogitSettings  # noqa: E402
from kdpipe.distill.targets import CachedTeacher  # noqa: E402
from kdpipe.runtime import setup_runtime  # noqa: E402
from kdpipe.teacher_targets import compute_teacher_logits  # noqa: E402
from kdpipe.train import TrainJob, fit  # noqa: E402

STUDENT = {"widths": [32, 64, 128], "dropout": 0.2}  # student.student_cnn.*
T, ALPHA = 4.0, 0.9
AUGMENT = AugmentConfig(crop_padding=4, flip=True)  # the reference's RandomCrop(32, padding=4) + flip


# --------------------------------------------------------------------------- the reference
class PILDataset(Dataset):
    """What common KD repositories do: one HWC uint8 image at a time, through PIL."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform) -> None:
        self.images = images.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def reference_loader(images, labels, batch_size: int, seed: int) -> DataLoader:
    import torchvision.transforms as T_

    transform = T_.Compose([T_.RandomCrop(32, padding=4), T_.RandomHorizontalFlip(), T_.ToTensor(),
                            T_.Normalize(CIFAR_MEAN, CIFAR_STD)])
    return DataLoader(PILDataset(images, labels, transform), batch_size=batch_size, shuffle=True, num_workers=0,
                      generator=torch.Generator().manual_seed(seed))


def reference_epoch(model, opt, loader, teacher=None) -> float:
    """One training epoch of the reference loop; returns its seconds."""
    start = time.perf_counter()
    model.train()
    running, correct = 0.0, 0
    for x, y in loader:
        out = model(x)
        if teacher is not None:
            with torch.no_grad():
                t = teacher(x)
            soft = F.kl_div(F.log_softmax(out / T, 1), F.softmax(t / T, 1), reduction="batchmean") * T * T
            loss = ALPHA * soft + (1 - ALPHA) * F.cross_entropy(out, y)
        else:
            loss = F.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        running += loss.item()
        correct += (out.argmax(1) == y).sum().item()
    return time.perf_counter() - start


# --------------------------------------------------------------------------- lockstep
class Lockstep:
    """Runs loops in threads, one epoch of each in turn (so both see the same machine)."""

    def __init__(self, n: int) -> None:
        self.n, self.turn, self.done = n, 0, set()
        self.cond = threading.Condition()

    def wait(self, i: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == i)

    def hand_over(self, i: int, finished: bool = False) -> None:
        with self.cond:
            if finished:
                self.done.add(i)
            for k in range(1, self.n + 1):
                nxt = (i + k) % self.n
                if nxt not in self.done:
                    self.turn = nxt
                    break
            self.cond.notify_all()

    def run(self, loops: list[Callable[[Callable[[], None]], None]], threads: int) -> None:
        errors: list[BaseException] = []

        def body(i: int, loop) -> None:
            torch.set_num_threads(threads)
            self.wait(i)
            try:
                loop(lambda: (self.hand_over(i), self.wait(i)))
            except BaseException as exc:  # surface it in the main thread
                errors.append(exc)
            finally:
                self.hand_over(i, finished=True)

        workers = [threading.Thread(target=body, args=(i, loop)) for i, loop in enumerate(loops)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if errors:
            raise errors[0]


def median_after_first(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times)


# --------------------------------------------------------------------------- kdpipe side
def kdpipe_loop(objective, data, recipe, runtime, times: list[float], seed: int):
    def loop(next_turn):
        def on_epoch(row):
            times.append(row["epoch_seconds"])
            next_turn()

        fit(TrainJob("kdpipe", objective, data, recipe, AUGMENT, runtime, seed), on_epoch=on_epoch)

    return loop


def logit_kd(student: torch.nn.Module, targets: TeacherLogits, data: PreparedData) -> LogitKD:
    """Hinton KD (T, ALPHA, no label smoothing) of ``student`` on ``targets``."""
    mode = "cached" if isinstance(targets, CachedTeacher) else "online"
    inputs = MethodInputs(student, targets, 0.0, (data.channels, data.image_size, data.image_size), data.meta)
    return LogitKD(inputs, LogitSettings(temperature=T, alpha=ALPHA, teacher_targets=mode))


def reference_loop(model, loader, times: list[float], teacher=None):
    def loop(next_turn):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(EPOCHS):
            times.append(reference_epoch(model, opt, loader, teacher))
            next_turn()

    return loop


TEACHER_WIDTH = 64


def build(arch: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.build(arch, 3, 10, 32, **(STUDENT if arch == "student_cnn" else {"width": TEACHER_WIDTH}))


def report(name: str, times: list[float]) -> float:
    med = median_after_first(times)
    print(f"  {name:<34} epochs {', '.join(f'{t:.2f}' for t in times)} s  → median {med:.2f} s", flush=True)
    return med


EPOCHS = 3


def main() -> None:
    global EPOCHS, TEACHER_WIDTH
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per loop (≥2; the first is warm-up)")
    parser.add_argument("--images", type=int, default=4068, help="training images (≥4000 for the reported figures)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="0: all cores")
    parser.add_argument("--archive", default=None, help="CIFAR-10 python archive (default: ../shared/data/...)")
    parser.add_argument("--only", default="student,teacher,distill",
                        help="comma-separated subset of student,teacher,distill,compile_student,compile_teacher "
                             "(compile_*: kdpipe's loop eager against runtime.compile, side by side)")
    parser.add_argument("--compile", action="store_true", help="the same as adding compile_student to --only")
    parser.add_argument("--teacher-width", type=int, default=64,
                        help="the teacher ResNet-18's first-stage width (teacher.resnet18.width; 64: the standard one)")
    args = parser.parse_args()
    EPOCHS, TEACHER_WIDTH = max(2, args.epochs), args.teacher_width
    seed = 0
    runtime = setup_runtime(RuntimeConfig(threads=args.threads), seed)
    cifar = load_cifar(args.archive, n_train=args.images, n_test=512)
    images, labels = cifar.train_images, cifar.train_labels
    meta = {"dataset": "cifar10", "class_names": cifar.class_names, "channels": 3, "image_size": 32,
            "mean": list(CIFAR_MEAN), "std": list(CIFAR_STD), "flip": True, "sizes": {}}
    data = PreparedData(Split(images, labels), Split(cifar.test_images, cifar.test_labels),
                        Split(cifar.test_images, cifar.test_labels), meta)
    recipe = TrainConfig(epochs=EPOCHS, batch_size=args.batch_size, optimizer="sgd", lr=0.05, momentum=0.9,
                         nesterov=True, weight_decay=5e-4, label_smoothing=0.0, schedule="onecycle")
    loader = reference_loader(images, labels, args.batch_size, seed)
    only = set(args.only.split(",")) | ({"compile_student"} if args.compile else set())
    unknown = only - {"student", "teacher", "distill", "compile_student", "compile_teacher"}
    if unknown:
        parser.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}")
    print(f"data: {cifar.source}, {len(labels)} training images 3×32×32, batch {args.batch_size}, "
          f"{EPOCHS} epochs per loop, {runtime.threads} threads; kdpipe runtime: {runtime.describe()}", flush=True)
    results: dict[str, float] = {}
    times: dict[str, list[float]] = {}

    def compare(name: str, loops: dict[str, Callable]) -> None:
        for key in loops:
            times[key] = []
        print(f"{name}:", flush=True)
        Lockstep(len(loops)).run([make(times[key]) for key, make in loops.items()], runtime.threads)
        for key in loops:
            results[key] = report(key, times[key])

    if "student" in only:
        compare("student (CE)", {
            "reference_student": lambda t: reference_loop(build("student_cnn", 1), loader, t),
            "kdpipe_student": lambda t: kdpipe_loop(CrossEntropyObjective(build("student_cnn", 1)), data, recipe,
                                                    runtime, t, seed),
        })
        results["student_speedup"] = results["reference_student"] / results["kdpipe_student"]
    compiled = setup_runtime(RuntimeConfig(threads=args.threads, compile=True), seed)
    for role, arch, model_seed in (("student", "student_cnn", 1), ("teacher", "resnet18", 2)):
        if f"compile_{role}" not in only:
            continue
        compare(f"{role} ({arch}), runtime.compile=true", {
            f"kdpipe_{role}_eager": lambda t, a=arch, s=model_seed: kdpipe_loop(
                CrossEntropyObjective(build(a, s)), data, recipe, runtime, t, seed),
            f"kdpipe_{role}_compiled": lambda t, a=arch, s=model_seed: kdpipe_loop(
                CrossEntropyObjective(build(a, s)), data, recipe, compiled, t, seed),
        })
        first = times[f"kdpipe_{role}_compiled"][0] - times[f"kdpipe_{role}_eager"][0]
        print(f"  compile overhead (first epoch, compiled - eager): {first:.1f} s", flush=True)
        results[f"compile_{role}_speedup"] = results[f"kdpipe_{role}_eager"] / results[f"kdpipe_{role}_compiled"]
    if "teacher" in only:
        compare(f"teacher (ResNet-18, width {TEACHER_WIDTH}, CE)", {
            "reference_teacher": lambda t: reference_loop(build("resnet18", 2), loader, t),
            "kdpipe_teacher": lambda t: kdpipe_loop(CrossEntropyObjective(build("resnet18", 2)), data, recipe,
                                                    runtime, t, seed),
        })
        results["teacher_speedup"] = results["reference_teacher"] / results["kdpipe_teacher"]
    if "distill" in only:
        teacher = build("resnet18", 2).eval()
        compare("distillation, teacher online", {
            "reference_distill": lambda t: reference_loop(build("student_cnn", 1), loader, t, teacher=teacher),
            "kdpipe_distill_online": lambda t: kdpipe_loop(
                logit_kd(build("student_cnn", 1), OnlineTeacher(teacher, runtime), data), data, recipe, runtime,
                t, seed),
        })
        results["distill_online_speedup"] = results["reference_distill"] / results["kdpipe_distill_online"]
        start = time.perf_counter()
        batches = TrainingBatches.for_run(data, args.batch_size, AUGMENT, seed, runtime)  # what the student draws
        logits = compute_teacher_logits(teacher, data, EPOCHS, batches, runtime)
        pass_seconds = time.perf_counter() - start
        print(f"teacher_targets pass: {pass_seconds:.1f} s for {EPOCHS} epochs of views "
              f"({pass_seconds / EPOCHS:.2f} s per epoch, paid once per teacher and student schedule)", flush=True)
        results["teacher_targets_seconds_per_epoch"] = pass_seconds / EPOCHS
        compare("distillation with cached targets vs the baseline", {
            "kdpipe_baseline": lambda t: kdpipe_loop(CrossEntropyObjective(build("student_cnn", 1)), data, recipe,
                                                     runtime, t, seed),
            "kdpipe_distill_cached": lambda t: kdpipe_loop(
                logit_kd(build("student_cnn", 1), CachedTeacher(logits), data), data, recipe, runtime, t, seed),
        })
        results["distill_cached_over_baseline"] = results["kdpipe_distill_cached"] / results["kdpipe_baseline"]
    keys = ["student_speedup", "teacher_speedup", "distill_online_speedup", "distill_cached_over_baseline"]
    summary = {k: round(results[k], 3) for k in keys if k in results}
    summary.update({f"{k}_s": round(v, 3) for k, v in results.items() if k not in keys and not k.endswith("speedup")})
    if "compile_student_speedup" in results:
        summary["compile_student_speedup"] = round(results["compile_student_speedup"], 3)
    summary.update(images=len(labels), epochs=EPOCHS, batch_size=args.batch_size, threads=runtime.threads,
                   teacher_width=TEACHER_WIDTH,
                   data=Path(cifar.source).name)
    print(json.dumps(summary))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
