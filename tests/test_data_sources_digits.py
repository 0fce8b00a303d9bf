"""The digits source (kdpipe.data.sources.digits): scikit-learn's bundled digits as uint8 images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdpipe.data.sources import digits
from kdpipe.plugins import NoSettings
from tests.data_fixtures import sklearn_digits


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
    raw_dir = tmp_path_factory.mktemp("raw") / "digits"
    info = digits.download(raw_dir, NoSettings())
    assert info["images"] == 1797
    return raw_dir


def test_download_writes_the_raw_digits(raw_dir):
    raw = np.load(raw_dir / "digits.npz", allow_pickle=False)
    images, labels = sklearn_digits()
    assert raw["images"].dtype == np.uint8 and raw["images"].shape == (1797, 1, 8, 8)
    # 0..16 pixel values stretched to 0..255
    np.testing.assert_array_equal(raw["images"][:, 0], np.rint(images * 255.0 / 16.0).astype(np.uint8))
    np.testing.assert_array_equal(raw["labels"], labels)
    assert list(raw["class_names"]) == [str(i) for i in range(10)]


def test_load_at_the_native_and_a_larger_size(raw_dir):
    native = digits.load(raw_dir, NoSettings(), 8)
    images, labels = sklearn_digits()
    assert native.train_images.dtype == torch.uint8 and native.train_images.shape == (1797, 1, 8, 8)
    np.testing.assert_array_equal(native.train_images[:, 0].numpy(), np.rint(images * 255.0 / 16.0).astype(np.uint8))
    np.testing.assert_array_equal(native.train_labels.numpy(), labels)
    assert native.class_names == [str(i) for i in range(10)]
    assert native.flip is False and native.test_images is None  # no official test split; a mirrored 2 is no 2
    larger = digits.load(raw_dir, NoSettings(), 16)
    assert larger.train_images.shape == (1797, 1, 16, 16) and larger.train_images.dtype == torch.uint8
