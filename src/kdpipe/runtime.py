"""Use the hardware: device, thread count, bf16/AMP autocast and memory format, decided once.

On the CPU, ``runtime.bf16: auto`` uses bf16 autocast only where oneDNN has native bf16
kernels (AVX-512 BF16 / AMX) *and* one forward pass costs at least :data:`BF16_MIN_GFLOPS`
per image (:meth:`Runtime.for_model`): below that, the casts cost as much as they save.
Measured on a 2-core AVX-512-BF16 CPU, bf16 vs fp32 training steps: the 95K student on
32×32 images 1.5× faster (30 epochs on the CIFAR-10 slice: 23.9 s vs 37.0 s, test accuracy
58.4% vs 58.2%), ResNet-18 1.3× on 8×8 digits and 1.8–2.2× on 32×32 images; the digits
student gained nothing. The decision is a pure function of architecture and input size,
never of a timing, so every stage and every run agrees on it. channels_last helped or was
neutral for every model measured, so ``auto`` turns it on, except under ``compile`` on a GPU.
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from kdpipe import distributed, machine
from kdpipe.config import RuntimeConfig
from kdpipe.errors import KdpipeError

# Forward GFLOPs per image from which CPU bf16 autocast is used under ``bf16: auto``.
# The student costs 0.0012 on 8×8 digits and 0.021 on 32×32 images; ResNet-18 0.07 and 1.1.
BF16_MIN_GFLOPS = 0.01


def cpu_supports_bf16() -> bool:
    """True when oneDNN has native bf16 kernels (AVX-512 BF16 / AMX): only then is bf16 fast."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    threads: int
    amp_dtype: torch.dtype | None  # autocast dtype, or None for plain fp32
    channels_last: bool
    compile: bool
    bf16_policy: str = "auto"  # runtime.bf16 as configured: "auto" is refined per model by for_model

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def precision(self) -> contextlib.AbstractContextManager:
        """Like :meth:`autocast`, but also *disables* an enclosing autocast when this runtime
        runs in float32: a model's precision does not depend on who calls it."""
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def for_model(self, model: nn.Module, input_shape: Sequence[int]) -> "Runtime":
        """This runtime with the autocast dtype decided for ``model`` on C×H×W inputs.

        Only ``bf16: auto`` on the CPU depends on the model (see the module docstring); the
        decision is a pure function of the architecture and the input size, so it is the same
        on every run and in every stage (the teacher_targets stage and online distillation
        run the teacher with the same precision).
        """
        if self.amp_dtype is None or self.device.type != "cpu" or self.bf16_policy != "auto":
            return self
        heavy = forward_gflops(model, input_shape) >= BF16_MIN_GFLOPS
        return self if heavy else replace(self, amp_dtype=None)

    def describe(self) -> dict:
        return {
            "device": str(self.device),
            "threads": self.threads,
            "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "off",
            "channels_last": self.channels_last,
            "compile": self.compile,
        }


def forward_gflops(model: nn.Module, input_shape: Sequence[int]) -> float:
    """GFLOPs of one forward pass of ``model`` on one C×H×W image (counted on the meta
    device: no computation, no change to ``model``)."""
    from torch.utils.flop_counter import FlopCounterMode

    probe = copy.deepcopy(model).to("meta").eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        probe(torch.empty((1, *input_shape), device="meta"))
    return counter.get_total_flops() / 1e9


def setup_runtime(cfg: RuntimeConfig, seed: int) -> Runtime:
    """Seed every RNG, set the thread count once and pick device, precision and layout."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise KdpipeError("runtime.device=cuda but no CUDA device is available; use runtime.device=auto or cpu.")
    group = distributed.from_env()  # under torchrun: this process's share of the machine
    device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and group.active:
        device = torch.device("cuda", group.local_rank)
        torch.cuda.set_device(device)
    # 0 (all cores) shares them among the processes on this machine: more threads than cores
    # make processes wait on each other (2 processes × 2 threads on 2 cores run 4-10× slower)
    threads = cfg.threads or max(1, machine.available_cores() // group.local_world)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if device.type == "cuda":
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        amp_dtype = None if cfg.bf16 == "off" else amp
        # auto: off under torch.compile, whose generated backward failed on an H200 (torch 2.11)
        # with channels-last convolutions (a stride assertion in convolution_backward)
        channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and not cfg.compile)
    else:
        # auto: bf16 is possible here; Runtime.for_model keeps it only for models worth it
        amp_dtype = torch.bfloat16 if cfg.bf16 == "on" or (cfg.bf16 == "auto" and cpu_supports_bf16()) else None
        channels_last = cfg.channels_last != "off"
    return Runtime(device, threads, amp_dtype, channels_last, cfg.compile, cfg.bf16)
