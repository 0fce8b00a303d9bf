"""kdpipe.runtime: the precision decision per model (moved from tests/test_train.py)."""

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
