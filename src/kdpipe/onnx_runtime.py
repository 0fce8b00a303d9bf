"""ONNX Runtime sessions set up the one way kdpipe measures and predicts with them.

A session runs on a fixed number of intra-op threads, one inter-op thread and with
spinning off: a spinning thread pool keeps its cores busy for a while after each call and
would slow whatever runs next (the next model of an interleaved timing, another stage).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdpipe.data.loader import Normalizer, eval_batches
from kdpipe.data.prepare import Split
from kdpipe.errors import KdpipeError
from kdpipe.onnx_export import ONNX_FORMAT, require


def session(path: str | Path, threads: int) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU with ``threads`` intra-op threads."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own types for missing, truncated or invalid files
        raise KdpipeError(f"{path} is not a usable ONNX model ({str(exc).splitlines()[0][:160]}); re-run the export "
                          "stage (dvc repro export).") from None


def session_threads(sess: Any) -> dict[str, Any]:
    """The thread settings a session really runs with (read back, not assumed)."""
    options = sess.get_session_options()
    return {"intra_op_threads": options.intra_op_num_threads, "inter_op_threads": options.inter_op_num_threads,
            "allow_spinning": options.get_session_config_entry("session.intra_op.allow_spinning") != "0"}


class OrtModel:
    """A session called like a PyTorch model: normalised images in, logits out (numpy)."""

    def __init__(self, sess: Any) -> None:
        self.session = sess
        self.input_name = sess.get_inputs()[0].name

    def __call__(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        x = images.numpy() if isinstance(images, torch.Tensor) else images
        return self.session.run(None, {self.input_name: x})[0]


def predict_logits(model: OrtModel, split: Split, normalize: Normalizer, batch_size: int) -> torch.Tensor:
    """Logits for every image of ``split``, in order (as :func:`kdpipe.inference.predict_logits`)."""
    return torch.cat([torch.from_numpy(model(batch.images)) for batch in eval_batches(split, batch_size, normalize)])


def read_metadata(sess: Any, path: str | Path) -> dict[str, Any]:
    """The kdpipe metadata of an ONNX model (class names, preprocessing, ...), JSON values decoded."""
    props = dict(sess.get_modelmeta().custom_metadata_map)
    if props.get("format") != ONNX_FORMAT:
        raise KdpipeError(f"{path} has no kdpipe metadata (no {ONNX_FORMAT!r} in its metadata_props); use an ONNX "
                          "file written by the export stage (data/onnx/).")
    meta: dict[str, Any] = {}
    for key, value in props.items():
        try:
            meta[key] = json.loads(value) if key in ("class_names", "preprocessing", "quantization") else value
        except ValueError:
            raise KdpipeError(f"{path} has unreadable metadata {key!r}; re-run the export stage (dvc repro export).") \
                from None
    return meta
