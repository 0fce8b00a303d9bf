"""kdpipe.models.features: FeatureTap reads intermediate maps through hooks, without changing
the model or its output, and removes its hooks afterwards."""

from __future__ import annotations

import torch

from kdpipe import models
from kdpipe.models import FeatureTap


def test_feature_tap_returns_the_named_maps_in_order_without_changing_the_output():
    model = models.build("student_cnn", 1, 5, 8, widths=[8, 16, 32]).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        plain = model(x)
        with FeatureTap(model, ["blocks.2", "blocks.0"]) as tap:
            tapped = model(x)
            feats = tap.features
        manual = model.blocks[0](x)
    assert torch.equal(plain, tapped)
    assert [f.shape[1] for f in feats] == [32, 8]
    assert torch.equal(feats[1], manual)


def test_feature_tap_removes_its_hooks_and_keeps_the_last_pass():
    model = models.build("student_cnn", 1, 5, 8, widths=[8, 16]).eval()
    modules = dict(model.named_modules())
    tap = FeatureTap(model, ["blocks.1"])
    with torch.no_grad(), tap:
        model(torch.randn(2, 1, 8, 8))
        first = tap.features[0]
        model(torch.randn(4, 1, 8, 8))
        assert tap.features[0].shape[0] == 4 and first.shape[0] == 2
    assert all(not m._forward_hooks for m in modules.values())
    with torch.no_grad():
        model(torch.randn(5, 1, 8, 8))
    assert tap.features[0].shape[0] == 4  # nothing recorded outside the block
