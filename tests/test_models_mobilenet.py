"""kdpipe.models.mobilenet: torchvision's MobileNetV2 as a teacher. Its pretrained weights load
from a local file, a failed download says what to do, and the model maps the data set's
normalisation to ImageNet's and resizes to its input size itself."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torch.nn.functional as F
from torchvision.models import mobilenet_v2 as tv_mobilenet_v2

from kdpipe import models
from kdpipe.config import parse_params
from kdpipe.errors import KdpipeError
from kdpipe.models.mobilenet import DEFAULT_INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD, MobileNetSettings, load_pretrained

META = {"class_names": [str(i) for i in range(10)], "channels": 1, "image_size": 8, "mean": [0.3], "std": [0.4]}


def _torchvision_state_dict(path):
    state = tv_mobilenet_v2(weights=None).state_dict()  # 1000-class ImageNet head, like the real file
    torch.save(state, path)
    return state


def test_loads_a_local_torchvision_state_dict(tmp_path):
    state = _torchvision_state_dict(tmp_path / "mobilenet_v2.pth")
    for channels in (1, 3, 4):
        model = models.build("mobilenet_v2", channels, 10, 8, input_size=32)
        info = load_pretrained(model, None, str(tmp_path / "mobilenet_v2.pth"))
        assert info["classifier_loaded"] is False  # 1000 ImageNet classes ≠ 10
        for key in ("features.5.conv.1.0.weight", "features.18.1.running_var"):
            assert torch.equal(model.state_dict()[key], state[key])
        first = model.state_dict()["features.0.0.weight"]
        if channels == 4:
            assert torch.allclose(first.sum(1), state["features.0.0.weight"].sum(1), atol=1e-5)
        else:
            assert torch.equal(first, state["features.0.0.weight"])
        assert model(torch.randn(2, channels, 8, 8)).shape == (2, 10)
    assert load_pretrained(models.build("mobilenet_v2", 3, 10, 8), None, None) is None  # nothing asked for


def test_a_head_with_this_data_sets_classes_is_loaded_too(tmp_path):
    state = tv_mobilenet_v2(weights=None, num_classes=10).state_dict()
    torch.save(state, tmp_path / "w.pth")
    model = models.build("mobilenet_v2", 3, 10, 8, input_size=32)
    assert load_pretrained(model, None, str(tmp_path / "w.pth"))["classifier_loaded"] is True
    assert torch.equal(model.classifier[1].weight, state["classifier.1.weight"])


def test_rejects_a_file_that_is_not_its_weights(tmp_path):
    torch.save(models.build("resnet18", 3, 10, 32).state_dict(), tmp_path / "other.pth")
    with pytest.raises(KdpipeError, match="not a torchvision MobileNetV2 state_dict"):
        load_pretrained(models.build("mobilenet_v2", 3, 10, 32), None, str(tmp_path / "other.pth"))
    with pytest.raises(KdpipeError, match="does not exist"):
        load_pretrained(models.build("mobilenet_v2", 3, 10, 32), None, str(tmp_path / "missing.pth"))
    with pytest.raises(KdpipeError, match="only available for teacher.arch=mobilenet_v2"):
        load_pretrained(models.build("resnet18", 3, 10, 32), None, str(tmp_path / "other.pth"))


def test_imagenet_download_failure_is_one_clear_sentence(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached copy

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(KdpipeError) as info:
        load_pretrained(models.build("mobilenet_v2", 3, 10, 32), "imagenet", None)
    message = str(info.value)
    assert "no network" in message and "teacher.mobilenet_v2.weights_path" in message and message.count(". ") == 0


def test_the_teacher_stage_initialises_from_the_sections_weights_path(tmp_path, monkeypatch):
    """``initialize`` (what train_teacher calls) reads teacher.mobilenet_v2.weights_path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "teachers/pretrained").mkdir(parents=True)
    state = _torchvision_state_dict(tmp_path / "teachers/pretrained/mnv2.pth")
    params = parse_params({"teacher": {"arch": "mobilenet_v2",
                                       "mobilenet_v2": {"weights_path": "teachers/pretrained/mnv2.pth"}}})
    settings = params.teacher.arch_settings
    model = models.build("mobilenet_v2", 1, 10, 8, **models.arch_params("mobilenet_v2", settings, META))
    info = models.MODELS.get("mobilenet_v2").info["initialize"](model, settings)
    assert info["weights"] == "teacher.mobilenet_v2.weights_path='teachers/pretrained/mnv2.pth'"
    assert torch.equal(model.state_dict()["features.5.conv.1.0.weight"], state["features.5.conv.1.0.weight"])


def test_arch_params_carry_the_data_statistics_and_the_input_size():
    assert models.arch_params("mobilenet_v2", MobileNetSettings(), META) == {
        "input_size": DEFAULT_INPUT_SIZE, "freeze_backbone": False, "data_mean": [0.3], "data_std": [0.4]}
    assert models.arch_params("mobilenet_v2", MobileNetSettings(input_size=96, freeze_backbone=True,
                                                                 weights_path="teachers/pretrained/w.pth"), None) == {
        "input_size": 96, "freeze_backbone": True, "data_mean": None, "data_std": None}


def test_maps_data_normalisation_to_imagenet_and_resizes():
    mean, std = [0.3], [0.4]
    model = models.build("mobilenet_v2", 1, 10, 8, input_size=64, data_mean=mean, data_std=std)
    raw = torch.rand(2, 1, 8, 8)  # pixel values in 0..1
    adapted = model.adapt_input((raw - 0.3) / 0.4)
    rgb = raw.expand(-1, 3, -1, -1)
    expected = (rgb - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected = F.interpolate(expected, size=(64, 64), mode="bilinear", align_corners=False)
    assert adapted.shape == (2, 3, 64, 64)
    assert torch.allclose(adapted, expected, atol=1e-5)


def test_without_rgb_statistics_the_data_normalisation_is_kept():
    x = torch.randn(2, 4, 32, 32)
    four = models.build("mobilenet_v2", 4, 10, 32, input_size=32, data_mean=[0.5] * 4, data_std=[0.2] * 4)
    assert torch.equal(four.adapt_input(x), x)
    rgb = models.build("mobilenet_v2", 3, 10, 32, input_size=32)  # no statistics given
    assert torch.equal(rgb.adapt_input(x[:, :3]), x[:, :3])


def test_freeze_backbone_trains_only_the_classifier():
    model = models.build("mobilenet_v2", 3, 10, 32, input_size=32, freeze_backbone=True)
    model.train()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["classifier.1.weight", "classifier.1.bias"]
    assert not model.features.training and model.classifier.training
    before = model.features[1].conv[0][1].running_mean.clone()
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert torch.equal(before, model.features[1].conv[0][1].running_mean)
