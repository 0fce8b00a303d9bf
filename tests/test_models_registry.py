"""kdpipe.models.registry: one registry for teachers and students, the builder arguments a
section's settings give, and self-describing model files."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdpipe import models
from kdpipe.config import parse_params
from kdpipe.errors import ConfigError, KdpipeError
from kdpipe.models import FeatureTap
from kdpipe.models.fast_cnn import FastCnnSettings
from kdpipe.models.mobilenet import MobileNetSettings
from kdpipe.models.resnet import ResNetSettings
from kdpipe.models.student import StudentCnnSettings

SHAPES = [(1, 8), (3, 32), (3, 100)]
SMALL = {"resnet18": {"width": 16}, "vea_resnet18": {"width": 16}, "mobilenet_v2": {"input_size": 32},
         "student_cnn": {"widths": [16, 32, 64]}, "fast_cnn": {"widths": [16, 32, 64], "stem_width": 8}}  # cheap variants: the tests stay fast
META = {"class_names": ["zero", "one", "two"], "channels": 1, "image_size": 8, "mean": [0.25], "std": [0.5]}


def test_architectures_are_registered_for_their_roles_with_their_settings():
    assert set(models.MODELS.names(roles="teacher")) == {"resnet18", "vea_resnet18", "mobilenet_v2", "fast_cnn"}
    assert set(models.MODELS.names(roles="student")) == {"student_cnn"}
    assert set(models.MODELS.names()) == set(SMALL)
    settings = {name: models.MODELS.get(name).settings for name in models.MODELS.names()}
    assert settings == {"resnet18": ResNetSettings, "vea_resnet18": ResNetSettings,
                        "mobilenet_v2": MobileNetSettings, "student_cnn": StudentCnnSettings,
                        "fast_cnn": FastCnnSettings}
    with pytest.raises(ConfigError, match="arch='student_cnn' is not allowed; expected one of"):
        models.MODELS.get("student_cnn", roles="teacher")


@pytest.mark.parametrize("channels,size", SHAPES)
@pytest.mark.parametrize("arch", sorted(SMALL))
def test_every_architecture_builds_for_any_input_with_its_feature_taps(arch, channels, size):
    model = models.build(arch, channels, 10, size, **SMALL[arch]).eval()
    x = torch.randn(2, channels, size, size)
    with torch.no_grad(), FeatureTap(model, model.feature_names) as tap:
        logits = model(x)
    assert logits.shape == (2, 10)
    feats = tap.features
    assert len(feats) == len(model.feature_names) >= 3
    assert all(f.dim() == 4 and f.shape[0] == 2 for f in feats)


def test_unknown_architecture():
    with pytest.raises(KdpipeError, match="unknown architecture 'vgg'"):
        models.build("vgg", 3, 10, 32)


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_arch_params_of_a_section_build_its_architecture(role):
    """What the workflow does: the selected architecture's section → builder keywords → model."""
    for arch in models.MODELS.names(roles=role):
        cfg = getattr(parse_params({role: {"arch": arch}}), role)
        kwargs = models.arch_params(arch, cfg.arch_settings, META)
        model = models.build(arch, 1, 3, 8, **kwargs)
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_arch_params_are_the_settings_fields_by_default():
    assert models.arch_params("student_cnn", StudentCnnSettings(widths=[8, 16], dropout=0.1)) == {
        "widths": [8, 16], "convs_per_block": 1, "dropout": 0.1}
    assert models.arch_params("resnet18", ResNetSettings(width=32), META) == {"width": 32}
    settings = parse_params({"student": {"student_cnn": {"widths": [48, 96, 256], "convs_per_block": 2}}})
    assert models.arch_params("student_cnn", settings.student.arch_settings) == {
        "widths": [48, 96, 256], "convs_per_block": 2, "dropout": 0.2}


@pytest.mark.parametrize(("arch", "arch_params"), [
    ("student_cnn", {"widths": [8, 16], "dropout": 0.1}),
    ("resnet18", {}),
    ("resnet18", {"width": 8}),  # a narrow teacher rebuilds with its width
    ("fast_cnn", {"widths": [8, 16], "stem_width": 4}),
    ("mobilenet_v2", {"input_size": 32, "data_mean": [0.25], "data_std": [0.5], "freeze_backbone": False}),
])
def test_save_load_round_trip(tmp_path, arch, arch_params):
    torch.manual_seed(0)
    model = models.build(arch, 1, 3, 8, **arch_params)
    # make BatchNorm statistics non-trivial so the buffers must round-trip too
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 1, 8, 8) * 3 + 1)
    model.eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        before = model(x)
    path = tmp_path / "m.pt"
    models.save(path, model, arch, arch_params, META, extra={"best_epoch": 3})

    loaded, meta = models.load(path)  # offline: nothing is downloaded
    assert not loaded.training and all(not m.training for m in loaded.modules())
    with torch.no_grad():
        assert torch.equal(loaded(x), before)
    assert meta["arch"] == arch and meta["arch_params"] == arch_params
    assert meta["class_names"] == ["zero", "one", "two"]
    pre = meta["preprocessing"]
    assert (pre["channels"], pre["image_size"], pre["mean"], pre["std"]) == (1, 8, [0.25], [0.5])
    assert meta["extra"] == {"best_epoch": 3}
    assert "state_dict" not in meta
    # the file is plain tensors and containers: the safe loader reads it
    blob = torch.load(path, map_location="cpu", weights_only=True)
    assert set(blob["state_dict"]) == set(model.state_dict())


def test_load_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "kdpipe-model/1", "payload": nn.Linear(2, 2)}, path)  # a pickled module
    with pytest.raises(KdpipeError) as info:
        models.load(path)
    message = str(info.value)
    assert "holds objects other than tensors" in message and str(path) in message
    assert "weights_only" not in message  # never torch's advice to turn the safe loader off


def test_load_refuses_a_plain_state_dict_a_truncated_file_and_a_model_for_other_data(tmp_path):
    model = models.build("student_cnn", 1, 3, 8, widths=[4], dropout=0.0)
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    with pytest.raises(KdpipeError, match=r"plain.pt is not a kdpipe model file \(a plain state_dict"):
        models.load(plain)
    good = tmp_path / "good.pt"
    meta = {"class_names": ["a", "b", "c"], "channels": 1, "image_size": 8, "mean": [0.5], "std": [0.25]}
    models.save(good, model, "student_cnn", {"widths": [4], "dropout": 0.0}, meta)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(KdpipeError, match=r"truncated.pt is truncated or corrupt .*dvc checkout --force"):
        models.load(truncated)
    models.load(good, meta)  # the data it was trained for
    with pytest.raises(KdpipeError, match=r"good.pt was trained on other data \(image size 8 in the model vs 16"):
        models.load(good, {**meta, "image_size": 16})
    with pytest.raises(KdpipeError, match=r"channels 1 in the model vs 3 in data/prepared"):
        models.load(good, {**meta, "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3})


def test_load_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(KdpipeError, match="dvc repro"):
        models.load(tmp_path / "nope.pt")


def test_count_params():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    assert models.count_params(model) == 3 * 4 + 4 + 4 + 4  # buffers are not parameters


def test_size_mb_counts_parameters_and_buffers():
    model = models.build("student_cnn", 3, 10, 32, widths=[32, 64, 128], dropout=0.2)
    params = models.count_params(model)
    bn_channels = 32 + 64 + 128
    # float32 params; BatchNorm running mean and var (float32) and num_batches_tracked (int64) per layer
    expected_bytes = 4 * params + 4 * 2 * bn_channels + 8 * 3
    assert models.size_mb(model) == pytest.approx(expected_bytes / 2**20, rel=1e-12)
    # and it tracks the dtype
    assert models.size_mb(model.half()) < models.size_mb(models.build("student_cnn", 3, 10, 32))
