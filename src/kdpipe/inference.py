"""Batched prediction over a split, shared by validation during training and evaluation."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.data.loader import Normalizer, eval_batches
from kdpipe.data.prepare import Split


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    split: Split,
    normalize: Normalizer,
    batch_size: int,
    autocast: contextlib.AbstractContextManager | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """Float32 logits for every image of ``split``, in order, with the model in eval mode."""
    was_training = model.training
    model.eval()
    outs = []
    for batch in eval_batches(split, batch_size, normalize, memory_format):
        with autocast or contextlib.nullcontext():
            outs.append(model(batch.images).float())
    model.train(was_training)
    return torch.cat(outs)


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy in percent."""
    labels = labels.to(logits.device)
    loss = F.cross_entropy(logits, labels).item()
    acc = (logits.argmax(1) == labels).float().mean().item() * 100.0
    return loss, acc
