"""Resume a killed training where it stopped, to the same bytes.

After every epoch the training engine writes a checkpoint outside DVC's outputs
(``.kdpipe/checkpoints/<model>.pt``): the objective's weights (student and any trainable
adapter), the optimiser, the schedule, the loss scaler, the random generators, the best
weights so far and the history. A re-run of the stage with the same inputs continues after
the last finished epoch; since every augmented view and batch order is a function of
(seed, epoch), the resumed run ends with the same model bytes and metrics as an
uninterrupted one.

A checkpoint is used only when its fingerprint matches the run: the stage, the whole
``params.yaml``, kdpipe's code and the digests of the input files. Anything else (other
params, edited code, another teacher) starts from epoch 1 and replaces it. The checkpoint is
deleted once the model file is written.
"""

from __future__ import annotations

import hashlib
import random
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdpipe.errors import KdpipeError
from kdpipe.io import file_digest, load_torch, save_torch

CHECKPOINT_DIR = Path(".kdpipe/checkpoints")
FORMAT = "kdpipe-checkpoint/1"
_PACKAGE_ROOT = Path(__file__).resolve().parent


def code_digest(roots: Iterable[Path] = (_PACKAGE_ROOT,)) -> str:
    """sha256 over every ``.py`` file of kdpipe (names and bytes): edited code never resumes."""
    digest = hashlib.sha256()
    for root in roots:
        for path in sorted(Path(root).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def run_fingerprint(stage: str, inputs: Iterable[str | Path], params_file: str | Path = "params.yaml") -> str:
    """What a checkpoint must have been made for: the stage, params.yaml's bytes, the code and
    every input file's (or folder's files') digest."""
    digest = hashlib.sha256(f"{FORMAT}\0{stage}\0".encode())
    params_file = Path(params_file)
    digest.update(params_file.read_bytes() if params_file.is_file() else b"")
    digest.update(code_digest().encode())
    for item in inputs:
        item = Path(item)
        files = sorted(p for p in item.rglob("*") if p.is_file()) if item.is_dir() else [item]
        for path in files:
            digest.update(f"\0{path}\0".encode() + (file_digest(path).encode() if path.is_file() else b"missing"))
    return digest.hexdigest()


def rng_state() -> dict[str, Any]:
    """Every random generator a training step may draw from (dropout uses torch's)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": [random.getstate()[0], list(random.getstate()[1])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate((state["python"][0], tuple(state["python"][1]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpoint:
    """The checkpoint file of one model's training, for one run fingerprint."""

    def __init__(self, name: str, fingerprint: str, folder: str | Path = CHECKPOINT_DIR) -> None:
        self.path = Path(folder) / f"{name}.pt"
        self.fingerprint = fingerprint

    def save(self, state: dict[str, Any]) -> None:
        save_torch(self.path, {"format": FORMAT, "fingerprint": self.fingerprint, **state})

    def load(self) -> dict[str, Any] | None:
        """The saved state if it was made for this run; None (and a note) otherwise."""
        if not self.path.exists():
            return None
        try:
            blob = load_torch(self.path)
        except KdpipeError:
            print(f"ignoring the unreadable checkpoint {self.path}; training starts from epoch 1", file=sys.stderr)
            return None
        if not isinstance(blob, dict) or blob.get("format") != FORMAT or blob.get("fingerprint") != self.fingerprint:
            print(f"ignoring {self.path}: it was made for other params, code or inputs; training starts from "
                  "epoch 1", file=sys.stderr)
            return None
        return blob

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
