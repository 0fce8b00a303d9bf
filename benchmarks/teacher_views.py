"""How good a teacher is as the students would see it: the validation accuracy of kdpipe model
files on each image alone and averaged with its mirror image (``kd.teacher_flip``), and of
their average when several are given (an ensemble, as ``multi_teacher`` builds), in float32.
Validation
split only: recipes are chosen there, never on test.

Run in a project that has run ``dvc repro`` (it reads ``data/prepared/`` and the model files)::

    python benchmarks/teacher_views.py models/teacher.pt
    python benchmarks/teacher_views.py models/teacher.pt teachers/ensemble/other_teacher.pt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kdpipe import models  # noqa: E402
from kdpipe.data.loader import Normalizer  # noqa: E402
from kdpipe.data.prepare import Split, load_prepared  # noqa: E402
from kdpipe.inference import predict_logits  # noqa: E402


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return round((logits.argmax(1) == labels).float().mean().item() * 100, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="kdpipe model files (e.g. models/teacher.pt)")
    parser.add_argument("--prepared", default="data/prepared", help="the prepared data (default: data/prepared)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_prepared(args.prepared)
    normalize = Normalizer.from_meta(data.meta["mean"], data.meta["std"])
    val = data.val
    # the mirror images, flipped as uint8 before normalising: the same images flip_mean gives the teacher
    mirrored = Split(val.images.flip(-1).contiguous(), val.labels)
    rows, single_sum, flip_sum = [], 0, 0
    for path in args.models:
        model, _ = models.load(path, data.meta)
        single = predict_logits(model, val, normalize, 256)
        flipped = (single + predict_logits(model, mirrored, normalize, 256)) / 2
        single_sum, flip_sum = single_sum + single, flip_sum + flipped
        rows.append({"model": path, "val_accuracy": accuracy(single, val.labels),
                     "val_accuracy_flip_mean": accuracy(flipped, val.labels)})
    if len(args.models) > 1:
        rows.append({"model": "mean of the logits above", "val_accuracy": accuracy(single_sum, val.labels),
                     "val_accuracy_flip_mean": accuracy(flip_sum, val.labels)})
    print(f"{len(val)} validation images")
    for row in rows:
        print(f"{row['model']}: {row['val_accuracy']:.2f}% alone, {row['val_accuracy_flip_mean']:.2f}% "
              "averaged with the mirror image")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
