"""Data-parallel training across processes: ``runtime.nproc`` above 1 runs the training stages
under ``torchrun`` with PyTorch's DistributedDataParallel (gloo on the CPU, nccl on CUDA).

What stays the same as one process, and why:

- ``student.batch_size`` / ``teacher.batch_size`` is the *global* batch: every process walks
  the same epoch order (a function of seed and epoch) and takes its contiguous share of each
  global batch (:meth:`Distributed.shard`), so the batches, their views and mixes, and the
  learning-rate schedule are those of a one-process run, and the cached teacher targets are
  looked up by the same (epoch, index) keys.
- Each process's loss is weighted by its share of the global batch before DDP averages the
  gradients (:meth:`Distributed.loss_weight`), so the gradient is the global batch's mean even
  when the last batch does not split evenly.
- BatchNorm: on CUDA the student's BatchNorm layers become SyncBatchNorm (statistics over the
  global batch, as in one process); PyTorch has no SyncBatchNorm on the CPU, so there each
  process normalises with its own share's statistics (a smaller batch: results differ slightly
  from one process, measured in the README).
- Only rank 0 validates, writes models, metrics, plots, checkpoints and MLflow runs; its
  validation result is broadcast so every rank takes the same decisions.

Launching: a training stage started as a plain process with ``runtime.nproc`` above 1
re-runs itself under ``python -m torch.distributed.run --standalone`` (:func:`relaunch`);
started by ``torchrun`` itself (multi-node, with rendezvous arguments) it joins the group it
was given.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdpipe.machine import available_cores

# set by relaunch() for the processes it starts: the launcher holds the workspace lock for them
LAUNCHED_ENV = "KDPIPE_DISTRIBUTED_LAUNCHER"


@dataclass(frozen=True)
class Distributed:
    """This process's place in the training group: rank ``rank`` of ``world`` processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes outputs and logs."""
        return self.rank == 0

    def shard(self, positions: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of one global batch's ``positions`` (sizes differ by at most one)."""
        if not self.active:
            return positions
        return torch.tensor_split(positions, self.world)[self.rank]

    def loss_weight(self, local: int, total: int) -> float:
        """Factor on this rank's mean loss so that DDP's gradient average is the global batch's mean."""
        return 1.0 if not self.active else local * self.world / total

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks (in place; returned for convenience)."""
        if self.active:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def from_main(self, values: Sequence[float], device: torch.device) -> list[float]:
        """Rank 0's ``values``, on every rank."""
        if not self.active:
            return list(values)
        tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
        torch.distributed.broadcast(tensor, src=0)
        return tensor.tolist()

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """``module`` under DistributedDataParallel (unchanged in one process)."""
        if not self.active:
            return module
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)


SINGLE = Distributed()


def from_env(environ: dict[str, str] | None = None) -> Distributed:
    """The group ``torchrun`` describes in the environment (one process when there is none)."""
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    return Distributed(int(env["RANK"]), world, int(env.get("LOCAL_RANK", "0")),
                       int(env.get("LOCAL_WORLD_SIZE", str(world))))


def init(device: torch.device) -> Distributed:
    """Join the process group torchrun set up (gloo on the CPU, nccl on CUDA); one process: nothing."""
    group = from_env()
    if group.active and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return group


def close() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def sync_batchnorm(module: nn.Module, group: Distributed, device: torch.device) -> nn.Module:
    """BatchNorm over the global batch where PyTorch supports it (CUDA)."""
    if group.active and device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return module


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """The torchrun command that runs ``argv`` (a script and its arguments) on ``nproc`` local processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *argv]


def relaunch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``argv`` under torchrun with ``nproc`` processes and return its exit status; SIGTERM
    and Ctrl-C are passed on, so the workers end their MLflow runs and temporary files."""
    command = launch_command(nproc, argv)
    print(f"runtime.nproc={nproc}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    env = {**os.environ, LAUNCHED_ENV: "1"}
    # torchrun would set 1 (with a banner); kdpipe.runtime sets each process's threads itself
    env.setdefault("OMP_NUM_THREADS", str(max(1, available_cores() // nproc)))
    child = subprocess.Popen(command, env=env)

    def forward(signum: int, frame: Any) -> None:
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
