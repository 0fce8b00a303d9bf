"""One registry for teachers and students, and self-describing model files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdpipe.errors import KdpipeError
from kdpipe.io import load_torch, restore_hint, save_torch
from kdpipe.plugins import Registry
from kdpipe.validation import as_dict

Builder = Callable[..., nn.Module]
MODELS: Registry[Builder] = Registry("architecture", "arch", "kdpipe.models")


def register(name: str, settings: type, roles: tuple[str, ...], **info: Any) -> Callable[[Builder], Builder]:
    """Register an architecture: ``builder(in_channels, num_classes, image_size, **arch_params)``
    with ``settings`` its ``teacher.<name>`` / ``student.<name>`` section, usable in ``roles``.

    ``arch_params(settings, meta)`` (in ``info``) turns settings into the builder's keyword
    arguments, which model files store; by default they are the settings' fields.
    """
    return MODELS.register(name, settings, roles=roles, **info)


def arch_params(arch: str, settings: Any, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The builder keywords for ``arch`` built with ``settings`` on data described by ``meta``."""
    plugin = MODELS.get(arch)
    convert = plugin.info.get("arch_params")
    return dict(convert(settings, meta)) if convert else as_dict(settings)


def build(arch: str, in_channels: int, num_classes: int, image_size: int, **arch_params: Any) -> nn.Module:
    """Build ``arch``; every model exposes ``feature_names`` (modules whose outputs are
    the feature maps that feature-based distillation taps)."""
    if arch not in MODELS:
        raise KdpipeError(f"unknown architecture {arch!r}; known: {', '.join(MODELS.names())}.")
    model = MODELS.get(arch).factory(in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                                     **arch_params)
    missing = [n for n in model.feature_names if n not in dict(model.named_modules())]
    assert not missing, f"{arch} names feature layers it does not have: {missing}"
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def size_mb(model: nn.Module) -> float:
    """Parameters plus buffers (BatchNorm statistics), in MiB."""
    total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return total / 2**20


MODEL_FORMAT = "kdpipe-model/1"
MODEL_KEYS = {"format", "arch", "arch_params", "state_dict", "class_names", "preprocessing"}


def check_matches_data(model_meta: dict[str, Any], data_meta: dict[str, Any], path: str | Path) -> None:
    """Stop when a model file was trained for other images than the prepared data: channels,
    image size, class names, or normalisation differ."""
    pre = model_meta["preprocessing"]
    pairs = [("channels", pre["channels"], data_meta["channels"]),
             ("image size", pre["image_size"], data_meta["image_size"]),
             ("classes", list(model_meta["class_names"]), list(data_meta["class_names"])),
             ("mean/std", [list(pre["mean"]), list(pre["std"])], [list(data_meta["mean"]), list(data_meta["std"])])]
    diffs = [f"{what} {a} in the model vs {b} in data/prepared" for what, a, b in pairs if a != b]
    if diffs:
        shown = "; ".join(d if len(d) < 160 else d[:157] + "..." for d in diffs)
        raise KdpipeError(f"{path} was trained on other data ({shown}); retrain it on this data (dvc repro) "
                          "or switch data.* back to what it was trained on.")


def save(path: str | Path, model: nn.Module, arch: str, arch_params: dict[str, Any], meta: dict[str, Any],
         extra: dict[str, Any] | None = None) -> None:
    """Write weights plus everything needed to rebuild and feed the model."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_torch(
        path,
        {
            "format": MODEL_FORMAT,
            "arch": arch,
            "arch_params": dict(arch_params),
            "state_dict": state,
            "class_names": list(meta["class_names"]),
            "preprocessing": {
                "channels": int(meta["channels"]),
                "image_size": int(meta["image_size"]),
                "mean": list(meta["mean"]),
                "std": list(meta["std"]),
                "input": "uint8 N×C×H×W scaled to 0..1, then (x - mean) / std",
            },
            "extra": dict(extra or {}),
        },
    )


def load(path: str | Path, data_meta: dict[str, Any] | None = None,
         rebuild: str = "run the stage that trains it (dvc repro)") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a saved model in eval mode; returns (model, metadata without weights). With the
    prepared data's ``data_meta``, first check the model was trained for such images."""
    path = Path(path)
    blob = load_torch(path, rebuild)
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT or not MODEL_KEYS <= set(blob):
        raise KdpipeError(f"{path} is not a kdpipe model file (a plain state_dict or another program's file: no "
                          f"{MODEL_FORMAT!r} header); {rebuild}, or {restore_hint(path)}.")
    if data_meta is not None:
        check_matches_data(blob, data_meta, path)
    pre = blob["preprocessing"]
    try:
        model = build(blob["arch"], pre["channels"], len(blob["class_names"]), pre["image_size"], **blob["arch_params"])
        model.load_state_dict(blob["state_dict"])
    except (RuntimeError, TypeError, KeyError) as exc:
        raise KdpipeError(f"{path} does not match its recorded architecture {blob['arch']!r} "
                          f"({str(exc).splitlines()[0][:120]}); {rebuild}.") from None
    model.eval()
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    return model, meta
