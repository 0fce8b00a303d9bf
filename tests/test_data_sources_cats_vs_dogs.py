"""The Cats vs Dogs source (kdpipe.data.sources.cats_vs_dogs) through TensorFlow Datasets, with
``tfds.testing.mock_data`` (no download).

The download and prepare stages on it are in test_data_pipeline.py.
"""

from __future__ import annotations

import sys

import pytest

from kdpipe.data.sources import cats_vs_dogs
from kdpipe.data.sources.cats_vs_dogs import CatsVsDogsSettings
from kdpipe.errors import KdpipeError

tfds = pytest.importorskip("tensorflow_datasets", reason="needs the tfds extra (pip install -e '.[tfds]')")


def test_load_resizes_and_caps_per_class(tmp_path):
    with tfds.testing.mock_data(num_examples=60):
        raw = cats_vs_dogs.load(tmp_path, CatsVsDogsSettings(max_per_class=5), 12)  # mock examples have random sizes
    assert raw.train_images.shape[1:] == (3, 12, 12) and raw.train_images.dtype.is_floating_point is False
    assert raw.train_labels.bincount().tolist() == [5, 5]
    assert raw.class_names == ["cat", "dog"] and raw.flip and raw.test_images is None


def test_missing_extra_is_one_sentence(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails as if not installed
    with pytest.raises(KdpipeError, match=r"pip install -e '\.\[tfds\]'") as err:
        cats_vs_dogs.download(None, CatsVsDogsSettings())
    assert str(err.value).count(". ") == 0


def test_nothing_prepared_says_run_download(tmp_path):
    with pytest.raises(KdpipeError, match="holds no prepared cats_vs_dogs data set"):
        cats_vs_dogs.load(tmp_path, CatsVsDogsSettings(), 12)


def test_a_data_dir_that_does_not_exist_is_an_error_not_a_download_target(tmp_path):
    typo = tmp_path / "tfds_dta"
    with pytest.raises(KdpipeError, match=r"data.cats_vs_dogs.data_dir='.*tfds_dta' is not a folder"):
        cats_vs_dogs.download(tmp_path / "raw", CatsVsDogsSettings(data_dir=str(typo)))
    assert not typo.exists() and not (tmp_path / "raw").exists()  # nothing created, nothing downloaded
