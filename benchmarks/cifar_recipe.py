"""Recipe check on the CIFAR-10 mini archive: kdpipe's engine with a given recipe, or the
common KD-repository recipe (per-image PIL augmentation, Adam 1e-3, StepLR), for the teacher
(ResNet-18), the baseline student or a distilled student. Prints one JSON line with the test
accuracy and the training seconds.

Data: the archive's 4,068 training images, split like the pipeline's prepare stage
(15% stratified validation, seed 42) into 3,458 train / 610 val; the archive's 1,017
``test_batch`` images are the test set. Both recipes train on the same 3,458 images.

Examples (from the repository root)::

    PYTHONPATH=src python benchmarks/cifar_recipe.py --model teacher --epochs 16 --save /tmp/teacher.pt
    PYTHONPATH=src python benchmarks/cifar_recipe.py --model student --epochs 30
    PYTHONPATH=src python benchmarks/cifar_recipe.py --model distill --teacher /tmp/teacher.pt --epochs 30
    PYTHONPATH=src python benchmarks/cifar_recipe.py --model student --recipe common --epochs 15
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cifar_data import DEFAULT_ARCHIVE, load_cifar  # noqa: E402
from train_speed import PILDataset  # noqa: E402

from kdpipe import models  # noqa: E402
from kdpipe.config import AugmentConfig, RuntimeConfig, TrainConfig  # noqa: E402
from kdpipe.data.loader import Normalizer, TrainingBatches  # noqa: E402
from kdpipe.data.prepare import PreparedData, Split, channel_stats, stratified_split  # noqa: E402
from kdpipe.distill import CrossEntropyObjective, MethodInputs, OnlineTeacher  # noqa: E402
from kdpipe.distill.logit import LogitKD, LogitSettings  # noqa: E402
from kdpipe.distill.targets import CachedTeacher  # noqa: E402
from kdpipe.inference import predict_logits  # noqa: E402
from kdpipe.runtime import setup_runtime  # noqa: E402
from kdpipe.teacher_targets import compute_teacher_logits  # noqa: E402
from kdpipe.train import TrainJob, fit  # noqa: E402

STUDENT = {"widths": [32, 64, 128], "dropout": 0.2}  # student.student_cnn.*


def prepared(seed: int = 42, archive: str | None = None) -> PreparedData:
    cifar = load_cifar(archive)
    if cifar.source == "generated":
        raise SystemExit(f"the CIFAR-10 mini archive is needed: {archive or DEFAULT_ARCHIVE} (see --archive)")
    val_idx, train_idx = stratified_split(cifar.train_labels, [0.15], seed)
    train = Split(cifar.train_images[train_idx], cifar.train_labels[train_idx])
    mean, std = channel_stats(train.images)
    meta = {"dataset": "cifar10-mini", "class_names": cifar.class_names, "channels": 3, "image_size": 32,
            "mean": mean, "std": std, "flip": True, "sizes": {}}
    return PreparedData(train, Split(cifar.train_images[val_idx], cifar.train_labels[val_idx]),
                        Split(cifar.test_images, cifar.test_labels), meta)


def test_accuracy(model, data: PreparedData) -> float:
    normalize = Normalizer.from_meta(data.meta["mean"], data.meta["std"])
    logits = predict_logits(model.cpu().float().to(memory_format=torch.contiguous_format), data.test, normalize, 256)
    return round(float((logits.argmax(1) == data.test.labels).float().mean()) * 100, 2)


def common_recipe(arch: str, data: PreparedData, epochs: int, seed: int, teacher=None, T=4.0, alpha=0.9,
                  seconds: float | None = None, width: int = 64) -> dict:
    """Per-image PIL augmentation in a DataLoader, Adam 1e-3, StepLR(5, 0.5), fp32 NCHW;
    reports the last epoch's test accuracy and the best one (common repos report the best).
    With ``seconds``, training stops after the first epoch that brings the training time to
    that budget (a same-CPU-time comparison), or after ``epochs``, whichever comes first."""
    import torchvision.transforms as T_
    from torch.utils.data import DataLoader

    torch.manual_seed(seed)
    model = models.build(arch, 3, 10, 32, **(STUDENT if arch == "student_cnn" else {"width": width}))
    tf = T_.Compose([T_.RandomCrop(32, padding=4), T_.RandomHorizontalFlip(), T_.ToTensor(),
                     T_.Normalize(data.meta["mean"], data.meta["std"])])
    loader = DataLoader(PILDataset(data.train.images, data.train.labels, tf), batch_size=128, shuffle=True,
                        num_workers=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    start, accs, epoch_seconds = time.perf_counter(), [], []
    for _ in range(epochs):
        t0 = time.perf_counter()
        model.train()
        for x, y in loader:
            out = model(x)
            loss = F.cross_entropy(out, y)
            if teacher is not None:
                with torch.no_grad():
                    t = teacher(x)
                soft = F.kl_div(F.log_softmax(out / T, 1), F.softmax(t / T, 1), reduction="batchmean") * T * T
                loss = alpha * soft + (1 - alpha) * loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        epoch_seconds.append(time.perf_counter() - t0)
        accs.append(test_accuracy(model, data))
        model.to(memory_format=torch.contiguous_format)
        print(f"common epoch {len(accs)}: test {accs[-1]:.2f}% ({epoch_seconds[-1]:.1f}s)", file=sys.stderr, flush=True)
        if seconds is not None and sum(epoch_seconds) >= seconds:
            break
    return {"test_accuracy": accs[-1], "best_test_accuracy": max(accs), "epochs_run": len(accs),
            "train_seconds": round(sum(epoch_seconds), 1), "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["teacher", "student", "distill"], required=True)
    p.add_argument("--recipe", choices=["kdpipe", "common"], default="kdpipe")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seconds", type=float, default=None,
                   help="common recipe: stop once training has taken this many seconds (same-CPU-time runs)")
    p.add_argument("--width", type=int, default=64,
                   help="teacher: ResNet-18 first-stage width (teacher.resnet18.width)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--optimizer", default="sgd")
    p.add_argument("--lr", type=float, default=None, help="default: 0.1 teacher, 0.05 student")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--schedule", default="onecycle")
    p.add_argument("--warmup", type=float, default=0.15)
    p.add_argument("--crop-padding", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--targets", choices=["cached", "online"], default="cached")
    p.add_argument("--teacher", help="a teacher saved by --model teacher --save")
    p.add_argument("--save", help="where to save the trained model (kdpipe format)")
    p.add_argument("--bf16", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--archive", default=None, help="CIFAR-10 mini archive (default: ../shared/data/...)")
    args = p.parse_args()
    data = prepared(archive=args.archive)
    runtime = setup_runtime(RuntimeConfig(threads=args.threads, bf16=args.bf16), args.seed)
    teacher = None
    if args.model == "distill":
        teacher, _ = models.load(args.teacher)
    if args.recipe == "common":
        arch = "resnet18" if args.model == "teacher" else "student_cnn"
        if teacher is not None:
            teacher = teacher.eval()
        out = common_recipe(arch, data, args.epochs, args.seed, teacher, args.temperature, args.alpha, args.seconds,
                            args.width)
    else:
        arch = "resnet18" if args.model == "teacher" else "student_cnn"
        lr = args.lr if args.lr is not None else (0.1 if arch == "resnet18" else 0.05)
        recipe = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=lr,
                             momentum=0.9, nesterov=True, weight_decay=args.weight_decay,
                             label_smoothing=args.label_smoothing, schedule=args.schedule,
                             warmup_fraction=args.warmup)
        augment = AugmentConfig(crop_padding=args.crop_padding, flip=True)
        torch.manual_seed(args.seed)
        arch_params = {"width": args.width} if arch == "resnet18" else {**STUDENT, "dropout": args.dropout}
        model = models.build(arch, 3, 10, 32, **arch_params)
        start = time.perf_counter()
        pass_seconds = 0.0
        if teacher is None:
            objective = CrossEntropyObjective(model, args.label_smoothing)
        else:
            if args.targets == "cached":
                # the batches the student will draw (same batch size, augmentation and seed)
                batches = TrainingBatches.for_run(data, args.batch_size, augment, args.seed, runtime)
                logits = compute_teacher_logits(teacher, data, args.epochs, batches, runtime)
                targets = CachedTeacher(logits)
                pass_seconds = time.perf_counter() - start
            else:
                targets = OnlineTeacher(teacher, runtime)
            inputs = MethodInputs(model, targets, args.label_smoothing,
                                  (data.channels, data.image_size, data.image_size), data.meta)
            settings = LogitSettings(temperature=args.temperature, alpha=args.alpha, teacher_targets=args.targets)
            objective = LogitKD(inputs, settings)
        result = fit(TrainJob(args.model, objective, data, recipe, augment, runtime, args.seed))
        out = {"test_accuracy": test_accuracy(model, data), "best_val_accuracy": result.best_val_accuracy,
               "best_epoch": result.best_epoch, "train_seconds": round(result.seconds, 1),
               "teacher_pass_seconds": round(pass_seconds, 1), "seconds": round(time.perf_counter() - start, 1),
               "runtime": result.runtime}
        if args.save:
            models.save(args.save, model, arch, arch_params, data.meta, extra={"recipe": vars(args)})
    print(json.dumps({"model": args.model, "recipe": args.recipe, **{k: v for k, v in vars(args).items()
                                                                     if k not in ("model", "recipe")}, **out}))


if __name__ == "__main__":
    main()
