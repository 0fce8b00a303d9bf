"""One tiny training with the real engine, in one process or as one rank under torchrun:
``python -m torch.distributed.run --standalone --nproc-per-node=2 tests/ddp_worker.py OUT``.

The student has no BatchNorm (on the CPU each rank normalises its own share, which is not
what one process does), so two ranks must reproduce one process up to the order of float sums.
The teacher's logits come from a cached table; every rank records which (epoch, index) rows it
looked up, to show that sharding reads exactly the targets one process reads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

from kdpipe import distributed
from kdpipe.config import parse_params
from kdpipe.distill.targets import CachedTeacher
from kdpipe.runtime import setup_runtime
from kdpipe.train import TrainJob, fit

N_TRAIN, BATCH, EPOCHS, CLASSES = 51, 16, 2, 4  # the last batch (3 images) splits 2 + 1


class RecordingTeacher(CachedTeacher):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__(logits)
        self.seen: list[tuple[int, int, list[float]]] = []

    def forward(self, images, batch):
        rows = super().forward(images, batch)
        self.seen += [(batch.epoch, int(i), r) for i, r in zip(batch.indices.tolist(), rows.tolist())]
        return rows


def train(group: distributed.Distributed) -> tuple[nn.Module, list[dict], RecordingTeacher]:
    from kdpipe.distill import METHODS, MethodInputs
    from tests.conftest import make_prepared, method_settings

    params = parse_params({
        "student": {"epochs": EPOCHS, "batch_size": BATCH, "lr": 0.05, "optimizer": "sgd", "schedule": "onecycle"},
        "runtime": {"device": "cpu", "threads": 1, "bf16": "off", "channels_last": "off"},
        "data": {"augment": {"crop_padding": 1, "flip": True, "mix": "mixup"}},
    })
    runtime = setup_runtime(params.runtime, 7)
    data = make_prepared(n_train=N_TRAIN, flip=True)
    student = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, CLASSES))
    table = torch.randn(EPOCHS, N_TRAIN, CLASSES, generator=torch.Generator().manual_seed(3))
    teacher = RecordingTeacher(table)
    inputs = MethodInputs(student, teacher, 0.0, (1, 8, 8), data.meta)
    objective = METHODS.get("logit").factory(inputs, method_settings("logit", temperature=2.0, alpha=0.7))
    job = TrainJob("student", objective, data, params.student, params.data.augment, runtime, 7, group)
    result = fit(job)
    return student, result.history, teacher


def main(out: Path) -> None:
    group = distributed.init(torch.device("cpu"))
    student, history, teacher = train(group)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"seen-{group.rank}.json").write_text(json.dumps(teacher.seen))
    if group.is_main:
        torch.save(student.state_dict(), out / "student.pt")
        (out / "history.json").write_text(json.dumps(history))
        (out / "world.json").write_text(json.dumps(group.world))
    distributed.close()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `tests` as a package
    main(Path(sys.argv[1]))
