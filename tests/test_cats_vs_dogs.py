"""Cats vs Dogs through TensorFlow Datasets, with ``tfds.testing.mock_data`` (no download)."""

from __future__ import annotations

import sys

import pytest

from kdpipe.config import parse_params
from kdpipe.data import cats_vs_dogs, pipeline
from kdpipe.errors import KdpipeError

tfds = pytest.importorskip("tensorflow_datasets", reason="needs the tfds extra (pip install -e '.[tfds]')")


def _params(**settings):
    return parse_params({"data": {"name": "cats_vs_dogs", "image_size": 12, "cats_vs_dogs": settings}})


def test_download_and_prepare_with_mock_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = _params()
    with tfds.testing.mock_data(num_examples=40):
        pipeline.download(params)
        summary = pipeline.prepare(params)
    assert summary["classes"] == 2 and summary["image_shape"] == [3, 12, 12]
    assert sum(summary[f"{s}_images"] for s in ("train", "val", "test")) == 40
    assert set(summary["per_class"]["train"]) == {"cat", "dog"}
    assert summary["test_images"] > 0  # no official test split: prepare holds one out


def test_load_resizes_and_caps_per_class(tmp_path):
    cfg = _params(max_per_class=5).data
    with tfds.testing.mock_data(num_examples=60):
        raw = cats_vs_dogs.load(tmp_path, cfg)  # mock examples have random sizes
    assert raw.train_images.shape[1:] == (3, 12, 12) and raw.train_images.dtype.is_floating_point is False
    assert raw.train_labels.bincount().tolist() == [5, 5]
    assert raw.class_names == ["cat", "dog"] and raw.flip and raw.test_images is None


def test_missing_extra_is_one_sentence(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails as if not installed
    with pytest.raises(KdpipeError, match=r"pip install -e '\.\[tfds\]'") as err:
        cats_vs_dogs.download(None, _params().data)
    assert str(err.value).count(". ") == 0


def test_nothing_prepared_says_run_download(tmp_path):
    with pytest.raises(KdpipeError, match="holds no prepared cats_vs_dogs data set"):
        cats_vs_dogs.load(tmp_path, _params().data)
