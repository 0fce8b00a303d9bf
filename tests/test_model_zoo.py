"""Every teacher and student builds for 1×8×8, 3×32×32 and 3×100×100 inputs with the feature
taps the methods need; MobileNetV2's pretrained weights load from a local file, and a failed
download says what to do."""

from __future__ import annotations

import urllib.error

import pytest
import torch
from torchvision.models import mobilenet_v2 as tv_mobilenet_v2

from kdpipe import models
from kdpipe.config import parse_params
from kdpipe.distill.features import pair_stages, probe_channels
from kdpipe.errors import ConfigError, KdpipeError
from kdpipe.models import FeatureTap
from kdpipe.models.mobilenet import IMAGENET_MEAN, IMAGENET_STD, load_pretrained

SHAPES = [(1, 8), (3, 32), (3, 100)]
ARCHS = {
    "resnet18": {},
    "vea_resnet18": {},
    "resnet18_w16": {"width": 16},  # the CPU-sized teacher (teacher.width)
    "mobilenet_v2": {"input_size": 32},  # small input size: the test stays fast
    "student_cnn": {"widths": [16, 32, 64]},
}


@pytest.mark.parametrize("channels,size", SHAPES)
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_builds_with_feature_taps(arch, channels, size):
    model = models.build(arch.removesuffix("_w16"), channels, 10, size, **ARCHS[arch]).eval()
    x = torch.randn(2, channels, size, size)
    with torch.no_grad(), FeatureTap(model, model.feature_names) as tap:
        logits = model(x)
    assert logits.shape == (2, 10)
    feats = tap.features
    assert len(feats) == len(model.feature_names) >= 3
    assert all(f.dim() == 4 and f.shape[0] == 2 for f in feats)
    assert probe_channels(model, model.feature_names, (channels, size, size)) == [f.shape[1] for f in feats]


@pytest.mark.parametrize("widths", [[16, 32, 64], [32, 64, 128], [48, 96, 256]])
def test_seed_student_family_builds_and_pairs_with_every_teacher(widths):
    student = models.build("student_cnn", 3, 10, 32, widths=widths)
    assert student(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    for arch in ("resnet18", "vea_resnet18", "mobilenet_v2"):
        teacher = models.build(arch, 3, 10, 32)
        assert len(pair_stages(student.feature_names, teacher.feature_names)) == len(widths)
    sizes = [models.count_params(models.build("student_cnn", 3, 10, 32, widths=w))
             for w in ([16, 32, 64], [32, 64, 128], [48, 96, 256])]
    assert sizes == sorted(sizes)


def test_student_depth_knob():
    shallow = models.build("student_cnn", 1, 10, 8, widths=[16, 32])
    deep = models.build("student_cnn", 1, 10, 8, widths=[16, 32], convs_per_block=2)
    assert models.count_params(deep) > models.count_params(shallow)
    assert deep(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    # convs_per_block=1 keeps the layout of files saved before the knob existed
    assert set(shallow.state_dict()) == set(models.build("student_cnn", 1, 10, 8, widths=[16, 32]).state_dict())


def test_vea_resnet18_attends_after_each_stage():
    model = models.build("vea_resnet18", 3, 10, 32).eval()
    with torch.no_grad(), FeatureTap(model, ["layer1.stage", "layer1"]) as tap:
        model(torch.randn(2, 3, 32, 32))
    raw, attended = tap.features
    a = model.layer1.attention.attention_map(raw)
    assert a.shape == (2, 1, 32, 32) and (a > 0).all() and (a < 1).all()
    assert torch.allclose(attended, raw * a)


@pytest.mark.parametrize("arch", ["resnet18", "vea_resnet18"])
def test_resnet_width_scales_every_stage_and_keeps_torchvision_names(arch):
    from torchvision.models import resnet18 as tv_resnet18

    standard = models.build(arch, 3, 10, 32)
    narrow = models.build(arch, 3, 10, 32, width=16)
    assert probe_channels(narrow, narrow.feature_names, (3, 32, 32)) == [16, 32, 64, 128]
    assert probe_channels(standard, standard.feature_names, (3, 32, 32)) == [64, 128, 256, 512]
    # convs scale with width², so a quarter of the width is about a sixteenth of the weights
    assert 12 < models.count_params(standard) / models.count_params(narrow) < 17
    if arch == "resnet18":  # same module names and shapes as torchvision's ResNet-18 (stem aside)
        ours = {k: v.shape for k, v in standard.state_dict().items()}
        theirs = {k: v.shape for k, v in tv_resnet18(num_classes=10).state_dict().items()}
        assert ours.keys() == theirs.keys()
        assert all(ours[k] == theirs[k] for k in ours if k != "conv1.weight")
        assert models.count_params(standard) == 11_173_962


def test_saved_narrow_teacher_rebuilds_with_its_width(tmp_path):
    model = models.build("resnet18", 1, 10, 8, width=8).eval()
    meta = {"class_names": [str(i) for i in range(10)], "channels": 1, "image_size": 8, "mean": [0.5], "std": [0.2]}
    models.save(tmp_path / "t.pt", model, "resnet18", {"width": 8}, meta)
    again, info = models.load(tmp_path / "t.pt")
    assert info["arch_params"] == {"width": 8} and again.fc.in_features == 64
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def _torchvision_state_dict(path):
    state = tv_mobilenet_v2(weights=None).state_dict()  # 1000-class ImageNet head, like the real file
    torch.save(state, path)
    return state


def test_mobilenet_v2_loads_a_local_torchvision_state_dict(tmp_path):
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


def test_mobilenet_v2_rejects_a_file_that_is_not_its_weights(tmp_path):
    torch.save(models.build("resnet18", 3, 10, 32).state_dict(), tmp_path / "other.pth")
    with pytest.raises(KdpipeError, match="not a torchvision MobileNetV2 state_dict"):
        load_pretrained(models.build("mobilenet_v2", 3, 10, 32), None, str(tmp_path / "other.pth"))
    with pytest.raises(KdpipeError, match="does not exist"):
        load_pretrained(models.build("mobilenet_v2", 3, 10, 32), None, str(tmp_path / "missing.pth"))


def test_mobilenet_v2_imagenet_download_failure_is_one_clear_sentence(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached copy

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(KdpipeError) as info:
        load_pretrained(models.build("mobilenet_v2", 3, 10, 32), "imagenet", None)
    message = str(info.value)
    assert "no network" in message and "teacher.weights_path" in message and message.count(". ") == 0


def test_mobilenet_v2_maps_data_normalisation_to_imagenet_and_resizes():
    mean, std = [0.3], [0.4]
    model = models.build("mobilenet_v2", 1, 10, 8, input_size=64, data_mean=mean, data_std=std)
    raw = torch.rand(2, 1, 8, 8)  # pixel values in 0..1
    adapted = model.adapt_input((raw - 0.3) / 0.4)
    rgb = raw.expand(-1, 3, -1, -1)
    expected = (rgb - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected = torch.nn.functional.interpolate(expected, size=(64, 64), mode="bilinear", align_corners=False)
    assert adapted.shape == (2, 3, 64, 64)
    assert torch.allclose(adapted, expected, atol=1e-5)


def test_mobilenet_v2_freeze_backbone_trains_only_the_classifier():
    model = models.build("mobilenet_v2", 3, 10, 32, input_size=32, freeze_backbone=True)
    model.train()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["classifier.1.weight", "classifier.1.bias"]
    assert not model.features.training and model.classifier.training
    before = model.features[1].conv[0][1].running_mean.clone()
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert torch.equal(before, model.features[1].conv[0][1].running_mean)


def test_saved_mobilenet_teacher_rebuilds_offline(tmp_path):
    model = models.build("mobilenet_v2", 1, 10, 8, input_size=32, data_mean=[0.3], data_std=[0.3]).eval()
    meta = {"class_names": [str(i) for i in range(10)], "channels": 1, "image_size": 8, "mean": [0.3], "std": [0.3]}
    models.save(tmp_path / "t.pt", model, "mobilenet_v2",
                {"input_size": 32, "data_mean": [0.3], "data_std": [0.3], "freeze_backbone": False}, meta)
    again, _ = models.load(tmp_path / "t.pt")
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model(x), again(x), atol=1e-5)


@pytest.mark.parametrize("override,key", [
    ({"teacher": {"arch": "resnet18", "pretrained": "imagenet"}}, "teacher.pretrained"),
    ({"teacher": {"arch": "mobilenet_v2", "weights_path": "/tmp/w.pth"}}, "teacher.weights_path"),
    ({"teacher": {"arch": "mobilenet_v2", "freeze_backbone": True}}, "teacher.freeze_backbone"),
    ({"teacher": {"arch": "mobilenet_v2", "input_size": 16}}, "teacher.input_size"),
    ({"student": {"convs_per_block": 0}}, "student.convs_per_block"),
    ({"teacher": {"arch": "resnet18", "width": 4}}, "teacher.width"),
    ({"teacher": {"arch": "mobilenet_v2", "width": 32}}, "teacher.width"),
    ({"kd": {"teachers": ["models/teacher.pt"]}}, "kd.teachers"),
    ({"kd": {"methods": ["multi_teacher"]}}, "kd.teachers"),
])
def test_new_params_are_validated_with_one_sentence(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        parse_params(override)
    assert str(info.value).endswith(".") and str(info.value).count(". ") == 0


def test_new_params_accept_good_values():
    params = parse_params({
        "teacher": {"arch": "mobilenet_v2", "pretrained": "imagenet", "freeze_backbone": True, "input_size": 96,
                    "weights_path": "teachers/pretrained/mobilenet_v2-b0353104.pth"},
        "student": {"widths": [48, 96, 256], "convs_per_block": 2},
        "kd": {"methods": ["multi_teacher", "dkd"], "teachers": ["teachers/ensemble/vea.pt"]},
    })
    assert params.teacher.input_size == 96 and params.kd.teachers == ["teachers/ensemble/vea.pt"]
    assert parse_params({"teacher": {"arch": "vea_resnet18", "width": 16}}).teacher.width == 16
