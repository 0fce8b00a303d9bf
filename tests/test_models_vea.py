"""kdpipe.models.vea: the small-image ResNet-18 with spatial attention after each stage."""

from __future__ import annotations

import torch

from kdpipe import models
from kdpipe.models import FeatureTap


def test_attends_after_each_stage():
    model = models.build("vea_resnet18", 3, 10, 32).eval()
    with torch.no_grad(), FeatureTap(model, ["layer1.stage", "layer1"]) as tap:
        model(torch.randn(2, 3, 32, 32))
    raw, attended = tap.features
    a = model.layer1.attention.attention_map(raw)
    assert a.shape == (2, 1, 32, 32) and (a > 0).all() and (a < 1).all()
    assert torch.allclose(attended, raw * a)


def test_same_stages_as_resnet18_at_any_width_plus_the_attention_modules():
    vea = models.build("vea_resnet18", 3, 10, 32, width=16).eval()
    plain = models.build("resnet18", 3, 10, 32, width=16).eval()
    assert vea.feature_names == plain.feature_names
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), FeatureTap(vea, vea.feature_names) as tv, FeatureTap(plain, plain.feature_names) as tp:
        vea(x), plain(x)
    assert [f.shape for f in tv.features] == [f.shape for f in tp.features]
    extra = models.count_params(vea) - models.count_params(plain)
    # per stage: depthwise 3×3 (9·C), BatchNorm (2·C), 1×1 projection to one map (C + 1)
    assert extra == sum(9 * c + 2 * c + c + 1 for c in (16, 32, 64, 128))
