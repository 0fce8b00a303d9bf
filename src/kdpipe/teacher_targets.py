"""teacher_targets: the teacher's logits on exactly the views distillation will train on.

Every augmented view is a pure function of (seed, epoch, index) and every epoch's batches a
pure function of (seed, epoch, batch size) (:mod:`kdpipe.data.views`,
:func:`kdpipe.data.loader.train_batches`). This stage draws the very batches that
distillation will draw, for all ``student.epochs``, runs the teacher on each through the
same :class:`~kdpipe.distill.targets.OnlineTeacher` code, in the same precision and memory
format, and stores the logits. Distillation with ``kd.teacher_targets: cached`` then reads
them (:class:`~kdpipe.distill.targets.CachedTeacher`) instead of running the teacher, so a
``kd.temperature`` × ``kd.alpha`` sweep pays for the teacher once.

On-disk format, ``data/teacher_targets/`` (a DVC-cached directory):

- ``logits.npy``: float32, shape ``student.epochs × train images × classes``; row
  ``[e, i]`` is the teacher's output on training image ``i`` as seen in epoch ``e``
  (indexed by image, not by batch position, so a lookup is one gather).
- ``meta.json``: what the logits were computed for (seed, epochs, batch size, views,
  hashes of the teacher file and the training split, the teacher's precision, whether its
  logits are averaged with its mirror images' (``kd.teacher_flip``)). Distillation
  refuses a cache whose fingerprint differs from its own run.

float32, not float16: the cache then holds exactly the numbers the online teacher produces
(a bf16 teacher's logits are stored exactly, since every bf16 value is a float32 value), so
the distilled student is bit-identical in both modes. float16 would round logits of
magnitude ~10 by up to ~5e-3. The cost is small: 4 bytes × classes per image and epoch,
e.g. 30 epochs of 50,000 CIFAR-10 images = 60 MB, against 150 MB of uint8 images.

With ``kd.teacher_targets: online`` the stage stores only ``meta.json`` saying so.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from kdpipe import machine, models, paths
from kdpipe.config import AugmentConfig, Params, TrainConfig
from kdpipe.data.loader import TrainingBatches, augmentation
from kdpipe.data.prepare import PreparedData, load_prepared
from kdpipe.distill.base import BatchContext
from kdpipe.distill.targets import CachedTeacher, OnlineTeacher, TeacherLogits
from kdpipe.errors import KdpipeError
from kdpipe.io import atomic_dir, file_digest, read_json, restore_hint, write_json
from kdpipe.runtime import Runtime, setup_runtime

FORMAT = "kdpipe-teacher-targets/3"  # 2: logits_sha256, no timing; 3: teacher_flip
LOGITS_FILE = "logits.npy"
META_FILE = "meta.json"
# every fingerprint key must match between the cache and the distillation run using it, except:
_MAY_DIFFER = ("threads",)


def tensor_sha256(*tensors: torch.Tensor) -> str:
    """sha256 of the tensors' dtypes, shapes and bytes, read a chunk at a time (the training
    images may be mapped from a file larger than memory: they are never copied whole)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(str((t.dtype, tuple(t.shape))).encode())
        flat = t.detach().cpu().contiguous().reshape(-1)
        step = max(1, (16 << 20) // max(1, flat.element_size()))
        for start in range(0, flat.numel(), step):
            h.update(flat[start:start + step].numpy().view(np.uint8))
    return h.hexdigest()


def check_teacher_flip(flip: bool, augment: AugmentConfig, data: PreparedData) -> None:
    """Averaging the teacher over mirror images (``kd.teacher_flip``) assumes they keep their
    class: refused where the students' views are never mirrored (``data.augment.flip: false``, or
    a data set such as digits whose classes a mirror changes)."""
    if flip and not augmentation(augment, data.meta)[1]:
        raise KdpipeError("kd.teacher_flip is true but this run never mirrors its images (data.augment.flip is "
                          "false, or the data set's classes change in a mirror, as digits' do); set "
                          "kd.teacher_flip: false.")


def teacher_precision(teacher: nn.Module, runtime: Runtime, data: PreparedData) -> str:
    rt = runtime.for_model(teacher, (data.channels, data.image_size, data.image_size))
    return str(rt.amp_dtype).replace("torch.", "") if rt.amp_dtype is not None else "float32"


def fingerprint(data: PreparedData, batches: TrainingBatches, epochs: int, teacher: nn.Module, teacher_sha256: str,
                runtime: Runtime, flip: bool) -> dict[str, Any]:
    """Everything that decides the cached logits: the batches (what the views are), the
    epochs, the training images, who looks at them (with their mirror images too, ``flip``)
    and in which precision."""
    return {
        **batches.describe(),
        "epochs": epochs,
        "train_images": len(data.train),
        "num_classes": data.num_classes,
        "train_sha256": tensor_sha256(data.train.images, data.train.labels),
        "teacher_sha256": teacher_sha256,
        "teacher_precision": teacher_precision(teacher, runtime, data),
        "teacher_flip": flip,
        "threads": runtime.threads,
    }


@torch.no_grad()
def compute_teacher_logits(teacher: nn.Module, data: PreparedData, epochs: int, batches: TrainingBatches,
                           runtime: Runtime, out: np.ndarray | None = None, flip: bool = False) -> np.ndarray:
    """The teacher's float32 logits on every view distillation will draw: epochs × N × classes.

    ``batches`` is the :class:`TrainingBatches` a student trained with the same batch size,
    augmentation and seed draws from, and the teacher runs through :class:`OnlineTeacher`
    exactly as in online distillation, so every row is bit-identical to the online teacher's
    output (averaged with the mirror image's when ``flip``: ``kd.teacher_flip``).
    """
    online = OnlineTeacher(teacher, runtime, flip).to(runtime.device, memory_format=runtime.memory_format)
    shape = (epochs, len(data.train), data.num_classes)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    assert out.shape == shape and out.dtype == np.float32
    for epoch in tqdm(range(epochs), desc="teacher targets", leave=False, disable=None):
        for batch in batches.epoch(epoch):
            logits = online(batch.images, BatchContext(batch.indices, epoch))
            out[epoch, batch.indices.numpy()] = logits.float().cpu().numpy()
    return out


def write_teacher_targets(out_dir: str | Path, mode: str, teacher: nn.Module | None = None,
                          teacher_sha256: str = "", data: PreparedData | None = None, epochs: int = 0,
                          batches: TrainingBatches | None = None, runtime: Runtime | None = None,
                          flip: bool = False) -> dict[str, Any]:
    """Write ``out_dir`` atomically (a finished directory or none); returns its meta."""
    with atomic_dir(out_dir) as tmp:
        if mode == "online":
            meta: dict[str, Any] = {"format": FORMAT, "mode": "online",
                                    "note": "kd.teacher_targets=online: distillation runs the teacher itself"}
        else:
            assert teacher is not None and data is not None and batches is not None and runtime is not None
            logits = np.lib.format.open_memmap(tmp / LOGITS_FILE, mode="w+", dtype=np.float32,
                                               shape=(epochs, len(data.train), data.num_classes))
            compute_teacher_logits(teacher, data, epochs, batches, runtime, out=logits, flip=flip)
            logits.flush()
            finite = bool(np.isfinite(logits).all())
            del logits
            if not finite:
                raise KdpipeError("the teacher gives non-finite logits (NaN or inf) on the training views: its "
                                  "model file is broken; retrain it (dvc repro -f -s train_teacher).")
            meta = {"format": FORMAT, "mode": "cached", "dtype": "float32",
                    "shape": [epochs, len(data.train), data.num_classes],
                    "logits_sha256": file_digest(tmp / LOGITS_FILE),  # checked before every use
                    **fingerprint(data, batches, epochs, teacher, teacher_sha256, runtime, flip)}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load_cached_teacher(out_dir: str | Path, expected: dict[str, Any], module: nn.Module | None = None) -> CachedTeacher:
    """The cache in ``out_dir`` as a :class:`CachedTeacher` (carrying the live teacher ``module``
    when given), after checking it was computed for exactly this run (``expected``:
    :func:`fingerprint` of the distillation run)."""
    out_dir = Path(out_dir)
    meta_path = out_dir / META_FILE
    if not meta_path.exists():
        raise KdpipeError(f"{meta_path} not found; run the teacher_targets stage first (dvc repro teacher_targets).")
    meta = read_json(meta_path)
    if meta.get("format") != FORMAT:
        raise KdpipeError(f"{out_dir} is not a {FORMAT} directory; re-run the teacher_targets stage.")
    if meta.get("mode") != "cached":
        raise KdpipeError(
            f"{out_dir} holds no logits (it was made with kd.teacher_targets={meta.get('mode')}); "
            "run `dvc repro` so the teacher_targets stage computes them, or use kd.teacher_targets=online."
        )
    diffs = [f"{k}: cache {meta.get(k)!r} vs run {expected.get(k)!r}" for k in expected
             if k not in _MAY_DIFFER and meta.get(k) != expected.get(k)]
    if diffs:
        raise KdpipeError(
            f"the cached teacher targets in {out_dir} were computed for another run ({'; '.join(diffs)}); "
            "re-run the teacher_targets stage (dvc repro) or use kd.teacher_targets=online."
        )
    logits_path = out_dir / LOGITS_FILE
    rebuild = f"rebuild it with `dvc repro -f -s teacher_targets` or {restore_hint(out_dir)}"
    if not logits_path.is_file() or file_digest(logits_path) != meta.get("logits_sha256"):
        raise KdpipeError(f"{logits_path} is missing or its contents changed since the teacher_targets stage wrote "
                          f"it (sha256 differs from meta.json); {rebuild}.")
    logits = np.load(logits_path, mmap_mode="r")
    if list(logits.shape) != list(meta["shape"]) or logits.dtype != np.float32 or not np.isfinite(logits).all():
        raise KdpipeError(f"{logits_path} does not match its meta.json or holds non-finite values; {rebuild}.")
    return CachedTeacher(logits, module)


def teacher_source(teacher: nn.Module, data: PreparedData, recipe: TrainConfig, augment: AugmentConfig, seed: int,
                   runtime: Runtime, cached: bool, live: bool, flip: bool = False) -> TeacherLogits:
    """The teacher's logits for a distillation run seeded with ``seed`` (the student's,
    ``params.student_seed``): the teacher_targets cache when ``cached`` (carrying the live
    teacher too when ``live``: feature-based methods), else the teacher online; averaged with
    its mirror images' when ``flip`` (``kd.teacher_flip``)."""
    check_teacher_flip(flip, augment, data)
    if not cached:
        return OnlineTeacher(teacher, runtime, flip)
    # only its description is needed: no copy of the split on the device (fit places its own)
    student_batches = TrainingBatches.for_run(data, recipe.batch_size, augment, seed, runtime, place=False)
    expected = fingerprint(data, student_batches, recipe.epochs, teacher,
                           file_digest(paths.model_path(paths.TEACHER)), runtime, flip)
    return load_cached_teacher(paths.TEACHER_TARGETS_DIR, expected, teacher if live else None)


def build_teacher_targets(params: Params) -> dict[str, Any]:
    """The teacher_targets stage: write data/teacher_targets/ for the configured student run
    (its views and batch order follow the student's seed, ``params.student_seed``)."""
    from kdpipe.tracking import stage_run

    if params.kd.teacher_targets == "online":
        meta = write_teacher_targets(paths.TEACHER_TARGETS_DIR, "online")
        write_json(paths.timing_path("teacher_targets"), {"seconds": 0.0, "mode": "online"})
        print("kd.teacher_targets=online: no teacher targets stored; distillation runs the teacher")
        return meta
    seed = params.student_seed
    runtime = setup_runtime(params.runtime, seed)
    data = load_prepared(paths.PREPARED_DIR)
    teacher_path = paths.model_path(paths.TEACHER)
    teacher, _ = models.load(teacher_path, data.meta)
    check_teacher_flip(params.kd.teacher_flip, params.data.augment, data)
    batches = TrainingBatches.for_run(data, params.student.batch_size, params.data.augment, seed, runtime)
    with stage_run("teacher_targets", params) as run:
        start = time.perf_counter()
        meta = write_teacher_targets(
            paths.TEACHER_TARGETS_DIR, "cached", teacher=teacher, teacher_sha256=file_digest(teacher_path),
            data=data, epochs=params.student.epochs, batches=batches, runtime=runtime, flip=params.kd.teacher_flip,
        )
        seconds = round(time.perf_counter() - start, 2)
        # the cache holds no timing (its bytes must depend on its inputs only): the time goes apart
        write_json(paths.timing_path("teacher_targets"), {"seconds": seconds, "machine": machine.describe(runtime.threads)})
        run.log_metrics({"teacher_targets_seconds": seconds,
                         "teacher_targets_mb": (paths.TEACHER_TARGETS_DIR / LOGITS_FILE).stat().st_size / 2**20})
    print(f"teacher targets: {meta['epochs']} epochs × {meta['train_images']} views"
          f"{' and their mirror images' if meta['teacher_flip'] else ''} "
          f"({meta['teacher_precision']}) in {seconds:.1f}s → {paths.TEACHER_TARGETS_DIR}")
    return meta
