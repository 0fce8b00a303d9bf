"""A kdpipe model as a self-describing ONNX file.

The graph takes exactly what the PyTorch model takes (float32 ``images`` N×C×H×W, normalised
as the model file says) and returns ``logits`` N×K, with a dynamic batch dimension. The file's
``metadata_props`` carry what a ``.pt`` file carries besides the weights (class names, input
preprocessing, architecture), so ``kdpipe predict`` or any ONNX runtime can feed it without
kdpipe's model code.

PyTorch's default (dynamo) exporter is tried first; an architecture it cannot export is
exported by the TorchScript exporter (``dynamo=False``) and the file says which one was used.
"""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from kdpipe.errors import KdpipeError

ONNX_FORMAT = "kdpipe-onnx/1"
OPSET = 20  # the dynamo exporter's default in the pinned torch; ONNX Runtime 1.32 runs it
INPUT_NAME, OUTPUT_NAME = "images", "logits"
INPUT_CONTRACT = (f"float32 '{INPUT_NAME}' N×C×H×W: uint8 pixels scaled to 0..1, then (x - mean) / std per channel; "
                  f"output '{OUTPUT_NAME}' N×K (softmax gives the class probabilities)")


def require(module: str) -> ModuleType:
    """Import an ONNX package, or stop with one sentence saying how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise KdpipeError(f"{module.split('.')[0]} is not installed; install kdpipe's pinned dependencies "
                          "(make setup, or pip install -e .).") from None


def onnx_metadata(name: str, model_meta: dict[str, Any], precision: str = "float32",
                  extra: dict[str, Any] | None = None) -> dict[str, str]:
    """The ``metadata_props`` of a model's ONNX file, from its ``.pt`` metadata
    (:func:`kdpipe.models.load`); values that are not strings are JSON."""
    pre = model_meta["preprocessing"]
    props = {
        "format": ONNX_FORMAT,
        "model": name,
        "arch": model_meta["arch"],
        "precision": precision,
        "class_names": list(model_meta["class_names"]),
        "preprocessing": {"channels": int(pre["channels"]), "image_size": int(pre["image_size"]),
                          "mean": list(pre["mean"]), "std": list(pre["std"]), "input": INPUT_CONTRACT},
        **(extra or {}),
    }
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in props.items()}


def strip_trace_metadata(proto: Any) -> None:
    """Drop what the exporter records about where each node came from (stack traces with this
    checkout's file paths, FX node names): the same model must give the same bytes in any folder
    on any machine, or DVC sees a changed output after every clone."""
    graphs = [proto.graph, *(f for f in proto.functions)]
    for graph in graphs:
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        value.doc_string = ""
        del value.metadata_props[:]


def set_metadata(path: str | Path, props: dict[str, str]) -> None:
    """Replace the ``metadata_props`` of the ONNX file at ``path`` (and check the model)."""
    onnx = require("onnx")
    proto = onnx.load(str(path))
    strip_trace_metadata(proto)
    del proto.metadata_props[:]
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    meta = {k: json.loads(v) if k in ("class_names", "preprocessing") else v for k, v in props.items()}
    if "preprocessing" in meta:
        pre = meta["preprocessing"]
        proto.doc_string = (f"kdpipe {meta.get('model', '')} ({meta.get('arch', '')}, {meta.get('precision', '')}): "
                            f"{pre['channels']}×{pre['image_size']}×{pre['image_size']} images, "
                            f"{len(meta.get('class_names', []))} classes; {INPUT_CONTRACT}")
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def opset_of(path: str | Path) -> int:
    """The default-domain opset an ONNX file was written for."""
    onnx = require("onnx")
    proto = onnx.load(str(path), load_external_data=False)
    return next(int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _export(model: nn.Module, example: torch.Tensor, path: Path, dynamo: bool) -> None:
    shapes = {"dynamic_shapes": ({0: torch.export.Dim.DYNAMIC},)} if dynamo else {
        "dynamic_axes": {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=dynamo, opset_version=OPSET, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], external_data=False, verbose=False, **shapes)


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, props: dict[str, str]) -> dict[str, Any]:
    """Export ``model`` (eval mode, float32) to ``path`` with ``props`` as its metadata.

    ``example``: normalised images of the model's input shape; two or more, because
    ``torch.export`` fixes a batch dimension of size 1. Returns the exporter used, the opset
    and, after a fallback, why the dynamo exporter failed.
    """
    require("onnx")
    require("onnxscript")  # the dynamo exporter's dependency
    path = Path(path)
    model = model.eval()
    if example.shape[0] < 2:
        example = example.expand(2, *example.shape[1:]).contiguous()
    info: dict[str, Any] = {"exporter": "dynamo"}
    try:
        _export(model, example, path, dynamo=True)
    except Exception as exc:  # any exporter failure: the TorchScript exporter gets its chance
        info = {"exporter": "torchscript", "dynamo_error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        try:
            _export(model, example, path, dynamo=False)
        except Exception as exc2:
            raise KdpipeError(f"{props.get('model', 'the model')} ({props.get('arch', '?')}) could not be exported to "
                              f"ONNX by either exporter ({info['dynamo_error']}; then {type(exc2).__name__}: "
                              f"{str(exc2).splitlines()[0][:200]}).") from None
    set_metadata(path, {**props, "exporter": info["exporter"]})
    return {**info, "opset": opset_of(path)}
