"""``mobilenet_v2``: torchvision's MobileNetV2 as a teacher, optionally ImageNet-pretrained.

Input handling (inside the model, so a saved file is self-describing and every caller —
training, distillation, evaluation — feeds it exactly like the other models):

* **Channels.** 1-channel images (digits) are repeated to RGB, which keeps the pretrained first
  convolution intact; 3-channel images pass through; any other count gets a first
  convolution built from the pretrained one (RGB kernels summed and spread over the channels).
* **Normalisation.** The pipeline feeds ``(x - mean_data) / std_data`` with the data set's own
  statistics. The ImageNet weights expect ``(x - mean_imagenet) / std_imagenet``. The model
  receives the data statistics as architecture parameters and applies the exact per-channel
  affine map from one to the other (no approximation, no second normalisation pass).
* **Resolution.** Images are resized (bilinear; antialiased when shrinking) to ``input_size``
  (default 224, the resolution the weights were trained at). The whole image is resized, not
  centre-cropped, because small images (8×8 digits, 32×32 CIFAR) have no border to spare.
  Cost grows with ``input_size²``: at 224 one forward pass is ~0.3 GFLOP per image, so on a CPU
  a smaller ``teacher.mobilenet_v2.input_size`` (96–128) trades a little accuracy for a large speed-up.

Weights are never fetched when a model is *built* (``registry.load`` rebuilds saved teachers
offline); :func:`load_pretrained` is called once by the teacher stage.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.errors import KdpipeError
from kdpipe.models.adapt import InputAdapter, renormalize_affine
from kdpipe.models.registry import register
from kdpipe.validation import Settings, fail, under

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_INPUT_SIZE = 224
PRETRAINED_DIR = "teachers/pretrained"  # the folder train_teacher declares as a DVC dependency


@dataclass(frozen=True)
class MobileNetSettings(Settings):
    pretrained: Optional[Literal["imagenet"]] = None  # needs network, else use weights_path
    freeze_backbone: bool = False  # train only the classifier of a pretrained teacher
    weights_path: Optional[str] = None  # a local torchvision state_dict under teachers/pretrained/
    input_size: Optional[int] = None  # images resized to this inside the model (null: 224)

    def check(self, key: str) -> None:
        if self.input_size is not None and not 32 <= self.input_size <= 512:
            fail(f"{key}.input_size", self.input_size, "null (224) or an integer between 32 and 512")
        if self.weights_path is not None and not under(self.weights_path, PRETRAINED_DIR):
            fail(f"{key}.weights_path", self.weights_path,
                 f"a file under {PRETRAINED_DIR}/, the folder train_teacher declares as a DVC dependency")
        if self.freeze_backbone and self.pretrained is None and self.weights_path is None:
            fail(f"{key}.freeze_backbone", self.freeze_backbone,
                 f"false unless {key}.pretrained or {key}.weights_path gives pretrained weights to freeze")


def _arch_params(settings: MobileNetSettings, meta: dict[str, Any] | None) -> dict[str, Any]:
    """The data set's statistics let the model map its inputs to what ImageNet weights expect."""
    return {"input_size": settings.input_size or DEFAULT_INPUT_SIZE, "freeze_backbone": settings.freeze_backbone,
            "data_mean": list(meta["mean"]) if meta else None, "data_std": list(meta["std"]) if meta else None}


class MobileNetV2Teacher(nn.Module):
    # Ends of the resolution groups: strides 4, 8, 16 and 32 (24, 32, 96 and 1280 channels).
    feature_names = ("features.3", "features.6", "features.13", "features.18")

    def __init__(self, in_channels: int, num_classes: int, input_size: int = DEFAULT_INPUT_SIZE,
                 data_mean: Sequence[float] | None = None, data_std: Sequence[float] | None = None,
                 freeze_backbone: bool = False, dropout: float = 0.2) -> None:
        super().__init__()
        from torchvision.models import mobilenet_v2 as tv_mobilenet_v2  # lazily: see models/resnet.py

        net = tv_mobilenet_v2(weights=None)
        self.in_channels, self.input_size, self.frozen = in_channels, input_size, freeze_backbone
        if in_channels not in (1, 3):
            old = net.features[0][0]
            net.features[0][0] = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                                           bias=False)
        self.features = net.features
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(net.last_channel, num_classes))
        scale, shift = _input_affine(in_channels, data_mean, data_std)
        self.adapter = InputAdapter(scale, shift, input_size, repeat_to=3 if in_channels == 1 else None)
        if freeze_backbone:
            for p in self.features.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "MobileNetV2Teacher":
        super().train(mode)
        if self.frozen:  # a frozen backbone keeps its BatchNorm statistics too
            self.features.eval()
        return self

    def adapt_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.adapt_input(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _input_affine(in_channels: int, data_mean: Sequence[float] | None,
                  data_std: Sequence[float] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) mapping data-normalised inputs to ImageNet-normalised ones."""
    channels = 3 if in_channels in (1, 3) else in_channels
    if data_mean is None or data_std is None or in_channels not in (1, 3):
        # No statistics, or channels that are not RGB: the data set's normalisation is kept.
        return torch.ones(channels), torch.zeros(channels)
    mean_d = torch.tensor(list(data_mean), dtype=torch.float32).expand(3)
    std_d = torch.tensor(list(data_std), dtype=torch.float32).expand(3)
    return renormalize_affine(mean_d, std_d, IMAGENET_MEAN, IMAGENET_STD)


@register("mobilenet_v2", MobileNetSettings, roles=("teacher",), arch_params=_arch_params,
          initialize=lambda model, settings: load_pretrained(model, settings.pretrained, settings.weights_path))
def mobilenet_v2(in_channels: int, num_classes: int, image_size: int, input_size: int = DEFAULT_INPUT_SIZE,
                 data_mean: Sequence[float] | None = None, data_std: Sequence[float] | None = None,
                 freeze_backbone: bool = False) -> nn.Module:
    return MobileNetV2Teacher(in_channels, num_classes, input_size, data_mean, data_std, freeze_backbone)


def imagenet_state_dict() -> dict[str, torch.Tensor]:
    """torchvision's ``MobileNet_V2_Weights.IMAGENET1K_V1`` (from the torch hub cache or the network)."""
    from torchvision.models import MobileNet_V2_Weights

    try:
        return MobileNet_V2_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
    except Exception as exc:  # URLError, OSError, hash mismatch...: all mean "could not get the weights"
        raise KdpipeError(
            f"teacher.mobilenet_v2.pretrained=imagenet must download {MobileNet_V2_Weights.IMAGENET1K_V1.url} and could not "
            f"(no network: {type(exc).__name__}); copy that file under teachers/pretrained/ on this machine and "
            "set teacher.mobilenet_v2.weights_path to it instead."
        ) from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A torchvision-format state_dict file (``torch.save(model.state_dict())``), loaded safely."""
    path = Path(path)
    if not path.is_file():
        raise KdpipeError(f"teacher.mobilenet_v2.weights_path={str(path)!r} does not exist; put the weights file there.")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise KdpipeError(
            f"teacher.mobilenet_v2.weights_path={str(path)!r} is not a readable torch state_dict file ({exc})."
        ) from None
    if isinstance(blob, Mapping) and isinstance(blob.get("state_dict"), Mapping):
        blob = blob["state_dict"]
    if not isinstance(blob, Mapping) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise KdpipeError(f"teacher.mobilenet_v2.weights_path={str(path)!r} does not hold a state_dict (a mapping of tensors).")
    return dict(blob)


def load_backbone(model: MobileNetV2Teacher, state: Mapping[str, torch.Tensor], source: str) -> dict[str, Any]:
    """Copy torchvision MobileNetV2 weights into ``model``: the whole backbone (``features.*``),
    the first convolution adapted to the channel count, and the classifier only when it has
    this data set's number of classes (an ImageNet head has 1000 and is left freshly initialised)."""
    backbone = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    first = "0.0.weight"
    if first in backbone and model.in_channels not in (1, 3):
        w = backbone[first]
        backbone[first] = w.sum(1, keepdim=True).repeat(1, model.in_channels, 1, 1) / model.in_channels
    expected = model.features.state_dict()
    missing = sorted(set(expected) - set(backbone))
    wrong = sorted(k for k in set(expected) & set(backbone) if expected[k].shape != backbone[k].shape)
    if missing or wrong:
        example = (missing or wrong)[0]
        raise KdpipeError(f"{source} is not a torchvision MobileNetV2 state_dict ({len(missing)} backbone tensors "
                          f"missing, {len(wrong)} of the wrong shape, e.g. features.{example}).")
    model.features.load_state_dict({k: backbone[k] for k in expected})
    head = model.classifier[1]
    head_weight = state.get("classifier.1.weight")
    loaded_head = head_weight is not None and head_weight.shape == head.weight.shape
    if loaded_head:
        head.load_state_dict({"weight": state["classifier.1.weight"], "bias": state["classifier.1.bias"]})
    return {"weights": source, "classifier_loaded": bool(loaded_head)}


def load_pretrained(model: nn.Module, pretrained: str | None, weights_path: str | None) -> dict[str, Any] | None:
    """Initialise a freshly built teacher from ``weights_path`` (a local copy, preferred: no
    network) or from torchvision's ImageNet weights; ``None`` when neither is asked for."""
    if pretrained is None and weights_path is None:
        return None
    if not isinstance(model, MobileNetV2Teacher):
        raise KdpipeError(f"pretrained weights are only available for teacher.arch=mobilenet_v2, not "
                          f"{type(model).__name__}.")
    if weights_path is not None:
        return load_backbone(model, read_state_dict(weights_path), f"teacher.mobilenet_v2.weights_path={weights_path!r}")
    return load_backbone(model, imagenet_state_dict(), "torchvision MobileNet_V2_Weights.IMAGENET1K_V1")
