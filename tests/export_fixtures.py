"""Small models for the export and predict tests: any registered architecture at a cheap size,
saved as a kdpipe model file, and a student trained on the learnable toy data set."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdpipe import models
from kdpipe.data.loader import Normalizer
from kdpipe.data.prepare import PreparedData

# cheap variants of every architecture (one not listed here is exported with its defaults)
SMALL = {"resnet18": {"width": 8}, "vea_resnet18": {"width": 8}, "mobilenet_v2": {"input_size": 32},
         "student_cnn": {"widths": [8, 16]}, "fast_cnn": {"widths": [8, 16, 16], "stem_width": 8}}


def saved_model(path: Path, arch: str, meta: dict[str, Any], seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """A freshly built ``arch`` for images described by ``meta``, saved at ``path`` and loaded
    back as every stage loads it: (model in eval mode, its file's metadata)."""
    plugin = models.MODELS.get(arch)
    settings = dataclasses.replace(plugin.settings(), **SMALL.get(arch, {}))
    kwargs = models.arch_params(arch, settings, meta)
    torch.manual_seed(seed)
    model = models.build(arch, meta["channels"], len(meta["class_names"]), meta["image_size"], **kwargs)
    models.save(path, model, arch, kwargs, meta)
    return models.load(path, meta)


def train_student(data: PreparedData, path: Path, steps: int = 120, seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """A small student trained on ``data`` until it classifies the toy squares, saved at ``path``."""
    model, _ = saved_model(path, "student_cnn", data.meta, seed)
    normalize = Normalizer.from_meta(data.meta["mean"], data.meta["std"])
    x, y = normalize(data.train.images), data.train.labels
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    arch_params = models.load(path)[1]["arch_params"]
    models.save(path, model, "student_cnn", arch_params, data.meta)
    return models.load(path, data.meta)


def exported_toy_student(folder: Path, n_test: int, seed: int) -> tuple[PreparedData, nn.Module, Normalizer, dict]:
    """A greyscale 8×8 student trained on the toy squares, saved as ``folder/student.pt`` and
    exported to ``folder/student.onnx``; returns (data, model, normalize, ONNX metadata)."""
    from kdpipe.onnx_export import export_onnx, onnx_metadata
    from tests.conftest import make_prepared

    data = make_prepared(n_train=256, n_val=16, n_test=n_test, channels=1, size=8, classes=4, seed=seed)
    model, meta = train_student(data, folder / "student.pt")
    normalize = Normalizer.from_meta(data.meta["mean"], data.meta["std"])
    props = onnx_metadata("baseline", meta)
    export_onnx(model, normalize(data.test.images[:2]), folder / "student.onnx", props)
    return data, model, normalize, props
