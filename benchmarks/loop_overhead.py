"""Where an epoch of kdpipe's engine goes: the input pipeline (the engine's
``TrainingBatches``, i.e. ``train_batches``: gather, crop/flip, normalise) against the whole
training epoch (forward, loss, backward, optimiser, schedule, bookkeeping), for the student
on digits-shaped (1×8×8) and CIFAR-shaped (3×32×32) data, plus the teacher-targets lookup.
CPU seconds (``time.process_time``), so other processes on a shared machine disturb the
shares less.

    PYTHONPATH=src python benchmarks/loop_overhead.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kdpipe import models  # noqa: E402
from kdpipe.config import AugmentConfig, RuntimeConfig, TrainConfig  # noqa: E402
from kdpipe.data.loader import TrainingBatches  # noqa: E402
from kdpipe.data.prepare import PreparedData, Split  # noqa: E402
from kdpipe.distill import CrossEntropyObjective  # noqa: E402
from kdpipe.distill.base import BatchContext, MethodInputs  # noqa: E402
from kdpipe.distill.logit import LogitKD, LogitSettings  # noqa: E402
from kdpipe.distill.targets import CachedTeacher  # noqa: E402
from kdpipe.runtime import setup_runtime  # noqa: E402
from kdpipe.train import TrainJob, fit  # noqa: E402


def data(n: int, c: int, s: int) -> PreparedData:
    gen = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (n, c, s, s), dtype=torch.uint8, generator=gen), torch.randint(0, 10, (n,)))
    meta = {"dataset": "x", "class_names": [str(i) for i in range(10)], "channels": c, "image_size": s,
            "mean": [0.5] * c, "std": [0.25] * c, "flip": True, "sizes": {}}
    return PreparedData(split, Split(split.images[:256], split.labels[:256]), split, meta)


def cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def main() -> None:
    runtime = setup_runtime(RuntimeConfig(), 0)
    epochs = 6
    for name, (n, c, s, pad) in {"digits 1×8×8": (1259, 1, 8, 1), "CIFAR 3×32×32": (4068, 3, 32, 4)}.items():
        d = data(n, c, s)
        recipe = TrainConfig(epochs=epochs, batch_size=128)
        augment = AugmentConfig(pad, True)
        batches = TrainingBatches.for_run(d, 128, augment, 0, runtime)  # the batches fit draws

        def loader_epoch(epoch: int = 0) -> None:
            for _ in batches.epoch(epoch):
                pass

        loader = statistics.median(cpu_seconds(lambda: loader_epoch(e)) for e in range(epochs))
        student = models.build("student_cnn", c, 10, s, widths=[32, 64, 128], dropout=0.2)
        box = {}
        fit_cpu = cpu_seconds(lambda: box.update(r=fit(TrainJob("x", CrossEntropyObjective(student), d, recipe,
                                                                augment, runtime, 0))))
        result = box["r"]
        wall = statistics.median(result.epoch_seconds[1:])
        table = CachedTeacher(np.random.default_rng(0).standard_normal((epochs, n, 10), dtype=np.float32))
        ctx_batches = list(batches.epoch(0))
        lookup = statistics.median(cpu_seconds(lambda: [table(b.images, BatchContext(b.indices, 0))
                                                        for b in ctx_batches]) for _ in range(5))
        kd_student = models.build("student_cnn", c, 10, s, widths=[32, 64, 128], dropout=0.2)
        kd_objective = LogitKD(MethodInputs(kd_student, table, 0.0, (c, s, s), d.meta),
                               LogitSettings(temperature=4.0, alpha=0.9, teacher_targets="cached"))
        kd = fit(TrainJob("x", kd_objective, d, recipe, augment, runtime, 0))
        kd_wall = statistics.median(kd.epoch_seconds[1:])
        print(f"{name}: {n} images, batch 128, student, {runtime.threads} threads, runtime {result.runtime}")
        print(f"  train_batches epoch: {loader * 1e3:.1f} ms CPU  | training epoch (with validation): "
              f"{fit_cpu / epochs * 1e3:.1f} ms CPU, {wall * 1e3:.1f} ms wall"
              f"  → input pipeline: {100 * loader / (fit_cpu / epochs):.1f}% of the CPU time")
        print(f"  cached-targets lookup for an epoch: {lookup * 1e3:.2f} ms CPU"
              f"  | KD epoch with cached targets: {kd_wall * 1e3:.1f} ms wall ({kd_wall / wall:.2f}× baseline)")


if __name__ == "__main__":
    main()
