"""``kdpipe predict``: classify image files with a kdpipe model, a ``.pt`` or an ``.onnx`` file.

Both kinds of file say what the model expects (channels, size, mean/std, class names), so an
image of any size and mode is fed the way the prepared data was: converted to greyscale or
RGB (an alpha channel is dropped, as prepare drops it), resized with prepare's antialiased
bilinear resize, scaled and normalised. A file that cannot be read as an image is reported
and the others are still classified.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from kdpipe.data.images import resize_uint8
from kdpipe.data.loader import Normalizer
from kdpipe.errors import KdpipeError

MODES = {1: "L", 3: "RGB"}  # what PIL converts an image to for a model of that many channels


@dataclass
class Classifier:
    """A model and how to feed it, whatever file it came from."""

    path: Path
    class_names: list[str]
    channels: int
    image_size: int
    normalize: Normalizer
    logits: Callable[[torch.Tensor], Any]  # normalised N×C×H×W → N×K logits (tensor or array)


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]] | None  # (class, probability), highest first; None when the image failed
    error: str | None = None


def load_classifier(path: str | Path, threads: int = 0) -> Classifier:
    """A ``.onnx`` file (ONNX Runtime on ``threads`` threads, 0: its default) or a ``.pt`` model file."""
    path = Path(path)
    if path.suffix == ".onnx":
        from kdpipe.onnx_runtime import OrtModel, read_metadata, session

        if not path.is_file():
            raise KdpipeError(f"{path} not found; the export stage writes the ONNX models (dvc repro export).")
        sess = session(path, threads)
        meta = read_metadata(sess, path)
        pre, runner = meta["preprocessing"], OrtModel(sess)
    elif path.suffix == ".pt":
        from kdpipe import models

        model, meta = models.load(path)
        pre = meta["preprocessing"]

        def runner(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return model(x)
    else:
        raise KdpipeError(f"{path} is neither a .pt nor an .onnx model file; pass models/<name>.pt or "
                          "data/onnx/<name>[.int8].onnx.")
    channels = int(pre["channels"])
    if channels not in MODES:
        raise KdpipeError(f"{path} expects {channels}-channel images; kdpipe predict reads greyscale (1) and RGB (3).")
    return Classifier(path, list(meta["class_names"]), channels, int(pre["image_size"]),
                      Normalizer.from_meta(pre["mean"], pre["std"]), runner)


def read_image(path: str | Path, channels: int, size: int) -> torch.Tensor:
    """uint8 C×size×size pixels of the image file at ``path``; a :class:`KdpipeError` names a file
    that is missing or not an image PIL can decode."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            pixels = np.asarray(image.convert(MODES[channels]), dtype=np.uint8)
    except FileNotFoundError:
        raise KdpipeError(f"{path}: no such file.") from None
    except IsADirectoryError:
        raise KdpipeError(f"{path}: is a folder, not an image file.") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise KdpipeError(f"{path}: not an image that can be read ({reason}).") from None
    chw = torch.from_numpy(pixels.reshape(*pixels.shape[:2], channels).copy()).permute(2, 0, 1)
    return resize_uint8(chw.unsqueeze(0), size)[0]


def top_k(logits: Any, class_names: list[str], k: int) -> list[tuple[str, float]]:
    """The ``k`` most probable classes of one image's logits, with softmax probabilities."""
    probs = torch.softmax(torch.as_tensor(np.asarray(logits), dtype=torch.float64), dim=-1)
    values, indices = probs.topk(min(k, len(class_names)))
    return [(class_names[i], round(float(p), 6)) for p, i in zip(values.tolist(), indices.tolist())]


def predict(classifier: Classifier, images: Sequence[str | Path], k: int = 3) -> Iterator[Prediction]:
    """One :class:`Prediction` per image file, in order."""
    for path in images:
        try:
            pixels = read_image(path, classifier.channels, classifier.image_size)
        except KdpipeError as exc:
            yield Prediction(str(path), None, str(exc))
            continue
        logits = classifier.logits(classifier.normalize(pixels.unsqueeze(0)))
        yield Prediction(str(path), top_k(np.asarray(logits)[0], classifier.class_names, k))


def format_prediction(p: Prediction, as_json: bool) -> str:
    """``path: class (probability %), ...`` or one JSON object."""
    if as_json:
        return json.dumps({"path": p.path, "predictions": [{"class": c, "probability": prob} for c, prob in p.top]})
    return f"{p.path}: " + ", ".join(f"{c} ({prob * 100:.1f}%)" for c, prob in p.top)


def run_predict(model: str, images: Sequence[str], k: int = 3, as_json: bool = False,
                out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Classify ``images`` with ``model`` and print the results (``out``, ``err``: default
    stdout and stderr); 1 when any image failed, else 0."""
    out, err = out or sys.stdout, err or sys.stderr
    if k < 1:
        raise KdpipeError(f"--top-k {k}: expected an integer >= 1.")
    classifier = load_classifier(model)
    failed = 0
    for p in predict(classifier, images, k):
        if p.top is None:
            failed += 1
            print(f"error: {p.error}", file=err)
        else:
            print(format_prediction(p, as_json), file=out, flush=True)
    return 1 if failed else 0
