"""Use the hardware: device, thread count, bf16/AMP autocast and memory format, decided once."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from kdpipe.config import RuntimeConfig
from kdpipe.errors import KdpipeError


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

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def describe(self) -> dict:
        return {
            "device": str(self.device),
            "threads": self.threads,
            "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "off",
            "channels_last": self.channels_last,
            "compile": self.compile,
        }


def setup_runtime(cfg: RuntimeConfig, seed: int) -> Runtime:
    """Seed every RNG, set the thread count once and pick device, precision and layout."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise KdpipeError("runtime.device=cuda but no CUDA device is available; use runtime.device=auto or cpu.")
    device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    threads = cfg.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if device.type == "cuda":
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        amp_dtype = None if cfg.bf16 == "off" else amp
        channels_last = cfg.channels_last != "off"
    else:
        amp_dtype = torch.bfloat16 if cfg.bf16 == "on" or (cfg.bf16 == "auto" and cpu_supports_bf16()) else None
        channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and amp_dtype is not None)
    return Runtime(device, threads, amp_dtype, channels_last, cfg.compile)
