"""kdpipe.runtime: the precision decision per model (moved from tests/test_train.py) and the layout."""

from __future__ import annotations

from dataclasses import replace

import torch

from kdpipe import models
from kdpipe.runtime import Runtime


def test_bf16_auto_is_decided_per_model_and_never_overrides_an_explicit_choice():
    """``bf16: auto`` on a bf16-capable CPU: bf16 for models worth it (the 32×32 student,
    any ResNet-18), fp32 for the tiny digits student; ``on``/``off`` are kept as given."""
    auto = Runtime(torch.device("cpu"), 1, torch.bfloat16, True, False, bf16_policy="auto")
    tiny = models.build("student_cnn", 1, 10, 8)
    assert auto.for_model(tiny, (1, 8, 8)).amp_dtype is None
    assert auto.for_model(models.build("student_cnn", 3, 10, 32), (3, 32, 32)).amp_dtype == torch.bfloat16
    assert auto.for_model(models.build("resnet18", 1, 10, 8), (1, 8, 8)).amp_dtype == torch.bfloat16
    forced = replace(auto, bf16_policy="on")
    assert forced.for_model(tiny, (1, 8, 8)).amp_dtype == torch.bfloat16
    off = replace(auto, amp_dtype=None, bf16_policy="off")
    assert off.for_model(models.build("resnet18", 3, 10, 32), (3, 32, 32)).amp_dtype is None


def test_channels_last_auto_is_off_only_for_compile_on_a_gpu(monkeypatch):
    """On CUDA, inductor's compiled backward failed with channels-last convolutions (H200,
    torch 2.11), so ``auto`` leaves the layout contiguous under ``compile``; an explicit ``on``
    is kept, and the CPU keeps channels-last with or without ``compile``. The device is
    pretended (no tensor is made): only the decision is under test."""
    from kdpipe.config import RuntimeConfig
    from kdpipe.runtime import setup_runtime

    threads = torch.get_num_threads()

    def decide(device: str, channels_last: str, compile: bool) -> bool:
        cfg = RuntimeConfig(device="auto" if device == "cuda" else "cpu", threads=threads,
                            bf16="off", channels_last=channels_last, compile=compile)
        runtime = setup_runtime(cfg, 0)
        assert runtime.device.type == device
        return runtime.channels_last

    assert decide("cpu", "auto", True) and decide("cpu", "auto", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert decide("cuda", "auto", False) is True
    assert decide("cuda", "auto", True) is False
    assert decide("cuda", "on", True) is True
    assert decide("cuda", "off", False) is False
