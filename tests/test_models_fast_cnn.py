"""kdpipe.models.fast_cnn: the few-wide-layers CPU teacher (airbench's shape)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdpipe import models
from kdpipe.config import parse_params
from kdpipe.errors import ConfigError
from kdpipe.models import FeatureTap


def test_each_group_halves_the_map_after_a_two_by_two_stem():
    model = models.build("fast_cnn", 3, 10, 32).eval()
    with torch.no_grad(), FeatureTap(model, ["stem", *model.feature_names]) as tap:
        logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert [tuple(f.shape[1:]) for f in tap.features] == [(24, 31, 31), (64, 15, 15), (128, 7, 7), (256, 3, 3)]


def test_parameter_count_is_the_sum_of_its_layers():
    model = models.build("fast_cnn", 3, 10, 32)
    stem = 3 * 24 * 4 + 24  # 2×2 conv with bias
    groups = sum(9 * i * o + 9 * o * o + 2 * 2 * o for i, o in ((24, 64), (64, 128), (128, 256)))  # 2 convs, 2 BNs
    assert models.count_params(model) == stem + groups + 256 * 10 == 1_161_272


def test_a_tiny_image_stops_pooling_instead_of_vanishing():
    model = models.build("fast_cnn", 1, 10, 8, widths=[8, 16, 16, 16], stem_width=4).eval()
    with torch.no_grad(), FeatureTap(model, model.feature_names) as tap:
        model(torch.randn(1, 1, 8, 8))
    assert [f.shape[-1] for f in tap.features] == [3, 1, 1, 1]  # 8 → 7 (stem) → 3 → 1, then no pool
    assert [type(g.pool) for g in model.groups] == [nn.MaxPool2d, nn.MaxPool2d, nn.Identity, nn.Identity]


@pytest.mark.parametrize(("section", "key"), [({"widths": []}, "teacher.fast_cnn.widths"),
                                              ({"widths": [64, 0]}, "teacher.fast_cnn.widths"),
                                              ({"stem_width": 0}, "teacher.fast_cnn.stem_width")])
def test_bad_settings_name_their_key(section, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_params({"teacher": {"arch": "fast_cnn", "fast_cnn": section}})
