"""The download and prepare stages (kdpipe.data.pipeline) on every source, through the real
source code: digits from scikit-learn, CIFAR-10 served over HTTP on 127.0.0.1, Intel through
the authenticated Kaggle client (only the call to the service is replaced), Cats vs Dogs with
``tfds.testing.mock_data``. A failed download leaves nothing in data/raw/.

Each source's own download/load details are in test_data_sources_<name>.py; the splitting
and the prepared format's functions in test_data_prepare.py.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from kdpipe import paths
from kdpipe.config import parse_params
from kdpipe.data import pipeline
from kdpipe.data.archives import UnsafeArchiveError
from kdpipe.data.fetch import ChecksumError
from kdpipe.data.prepare import load_prepared
from kdpipe.data.sources import intel
from kdpipe.errors import KdpipeError
from kdpipe.io import read_json
from tests.data_fixtures import (INTEL_CLASSES, cifar_members, http_server, make_cifar_archive, make_intel_zip, md5,
                                 sklearn_digits, write_tar, write_zip)
from tests.data_fixtures import no_credentials  # noqa: F401 (a fixture)

# --------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits_project(tmp_path_factory):
    """Run the real download and prepare steps of the pipeline in an empty directory."""
    root = tmp_path_factory.mktemp("digits_project")
    params = parse_params({"seed": 7, "data": {"name": "digits", "val_fraction": 0.15, "test_fraction": 0.2}})
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        info = pipeline.download(params)
        summary = pipeline.prepare(params)
    return root, params, info, summary


def test_prepared_splits_are_uint8_nchw_and_partition_the_data(digits_project):
    root, _, _, _ = digits_project
    data = load_prepared(root / paths.PREPARED_DIR)
    total = 0
    seen: Counter = Counter()
    for split in (data.train, data.val, data.test):
        assert split.images.dtype == torch.uint8
        assert split.images.shape[1:] == (1, 8, 8)
        assert split.labels.dtype == torch.int64
        assert len(split.images) == len(split.labels)
        total += len(split)
        seen.update((img.numpy().tobytes(), int(y)) for img, y in zip(split.images, split.labels))
    images, labels = sklearn_digits()
    original = Counter((np.rint(img * 255.0 / 16.0).astype(np.uint8)[None].tobytes(), int(y))
                       for img, y in zip(images, labels))
    assert total == 1797
    assert seen == original  # every image exactly once, with its own label
    assert data.num_classes == 10
    assert sorted(torch.unique(data.train.labels).tolist()) == list(range(10))


def test_split_is_stratified_to_within_one_image(digits_project):
    root, params, _, summary = digits_project
    data = load_prepared(root / paths.PREPARED_DIR)
    _, labels = sklearn_digits()
    totals = np.bincount(labels, minlength=10)
    targets = {"test": params.data.test_fraction, "val": params.data.val_fraction,
               "train": 1 - params.data.test_fraction - params.data.val_fraction}
    for name, frac in targets.items():
        counts = np.bincount(getattr(data, name).labels.numpy(), minlength=10)
        assert np.all(np.abs(counts - frac * totals) <= 1), (name, counts, frac * totals)
        assert summary["per_class"][name] == {str(c): int(n) for c, n in enumerate(counts)}
        assert summary[f"{name}_images"] == int(counts.sum())


def test_meta_json_describes_the_prepared_data(digits_project):
    root, _, _, _ = digits_project
    meta = json.loads((root / paths.PREPARED_DIR / "meta.json").read_text())
    data = load_prepared(root / paths.PREPARED_DIR)
    train = data.train.images.double() / 255.0
    assert meta["dataset"] == "digits"
    assert meta["class_names"] == [str(i) for i in range(10)]
    assert meta["channels"] == 1 and meta["image_size"] == 8
    assert meta["flip"] is False  # a mirrored digit is not a digit
    assert meta["sizes"] == {"train": len(data.train), "val": len(data.val), "test": len(data.test)}
    assert meta["mean"] == pytest.approx([train.mean().item()], abs=1e-6)
    assert meta["std"] == pytest.approx([train.std().item()], abs=1e-6)
    metrics = json.loads((root / "metrics" / "data.json").read_text())
    assert metrics["classes"] == 10 and metrics["image_shape"] == [1, 8, 8]


# --------------------------------------------------------------------------- CIFAR-10


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A directory of CIFAR-format archives (good, corrupted, truncated, malicious) on HTTP."""
    root = tmp_path_factory.mktemp("www")
    good = make_cifar_archive(root / "cifar-10-python.tar.gz")
    data = good.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    (root / "flipped.tar.gz").write_bytes(bytes(flipped))
    (root / "truncated.tar.gz").write_bytes(data[: len(data) // 2])
    members = cifar_members()
    write_tar(root / "dotdot.tar.gz", {**members, "cifar-10-batches-py/../../escape.txt": b"x"})
    write_zip(root / "dotdot.zip", {**members, "../escape.txt": b"x"})
    write_tar(root / "absolute.tar.gz", {**members, "/tmp/kdpipe-escape.txt": b"x"})
    write_tar(root / "symlink.tar.gz", members, links={"cifar-10-batches-py/up": (tarfile.SYMTYPE, "../../..")})
    with http_server(root) as base:
        yield root, base


def _cifar10_params(url: str, md5_hex: str, size: int = 32):
    return parse_params({"data": {"name": "cifar10", "image_size": size, "cifar10": {"url": url, "md5": md5_hex}}})


def test_cifar10_download_verify_extract_prepare(served, tmp_path, monkeypatch):
    root, base = served
    monkeypatch.chdir(tmp_path)
    params = _cifar10_params(f"{base}/cifar-10-python.tar.gz", md5(root / "cifar-10-python.tar.gz"), size=16)
    pipeline.download(params)
    raw = tmp_path / "data/raw/cifar10"
    assert sorted(p.name for p in raw.iterdir()) == ["checksums.json", "cifar-10-batches-py"]  # archive not kept
    summary = pipeline.prepare(params)
    assert summary["classes"] == 10 and summary["image_shape"] == [3, 16, 16]
    assert summary["test_images"] == 20  # the official test batch is the test split
    assert summary["train_images"] + summary["val_images"] == 40
    assert read_json(tmp_path / "metrics/data.json")["per_class"]["test"]["airplane"] == 2
    meta = read_json(tmp_path / "data/prepared/meta.json")
    assert meta["flip"] is True and meta["class_names"][1] == "automobile"


@pytest.mark.parametrize("name", ["flipped.tar.gz", "truncated.tar.gz"])
def test_corrupted_download_fails_checksum_and_leaves_nothing(served, tmp_path, monkeypatch, name):
    root, base = served
    monkeypatch.chdir(tmp_path)
    params = _cifar10_params(f"{base}/{name}", md5(root / "cifar-10-python.tar.gz"))  # the md5 of the good archive
    with pytest.raises(ChecksumError, match=r"checksum mismatch .*\(data\.cifar10\.md5\)"):
        pipeline.download(params)
    assert not (tmp_path / "data/raw/cifar10").exists()
    assert list((tmp_path / "data/raw").iterdir()) == []


@pytest.mark.parametrize("name", ["dotdot.tar.gz", "dotdot.zip", "absolute.tar.gz", "symlink.tar.gz"])
def test_malicious_archive_is_refused(served, tmp_path, monkeypatch, name):
    root, base = served
    monkeypatch.chdir(tmp_path)
    params = _cifar10_params(f"{base}/{name}", md5(root / name))  # its checksum matches: the content is the problem
    with pytest.raises(UnsafeArchiveError, match="refusing to extract"):
        pipeline.download(params)
    assert list((tmp_path / "data/raw").iterdir()) == []
    assert not list(tmp_path.rglob("escape.txt")) and not Path("/tmp/kdpipe-escape.txt").exists()


# --------------------------------------------------------------------------- Intel


@pytest.fixture(scope="module")
def kaggle_zip(tmp_path_factory):
    return make_intel_zip(tmp_path_factory.mktemp("kaggle") / "intel-image-classification.zip")


def _intel_params(**intel_settings):
    return parse_params({"data": {"name": "intel", "image_size": 16, "intel": intel_settings}})


def test_intel_kaggle_download_then_prepare(tmp_path, monkeypatch, no_credentials, kaggle_zip):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "0123456789abcdef-secret")
    calls = []

    def fake_service(api, dataset, dest):  # drops the zip where the Kaggle client would
        calls.append((type(api).__name__, dataset))
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(kaggle_zip, dest / "intel-image-classification.zip")
        return dest / "intel-image-classification.zip"

    monkeypatch.setattr(intel, "fetch_from_kaggle", fake_service)
    params = _intel_params()
    pipeline.download(params)
    assert calls == [("KaggleApi", "puneet6060/intel-image-classification")]  # the real, authenticated client
    raw = tmp_path / "data/raw/intel"
    assert sorted(p.name for p in raw.iterdir()) == ["seg_test", "seg_train"]  # no seg_pred, no zip
    summary = pipeline.prepare(params)
    assert summary["skipped_images"] == 1  # the corrupt JPEG
    assert summary["classes"] == 6 and summary["image_shape"] == [3, 16, 16]
    assert summary["test_images"] == 12  # the official seg_test split
    assert summary["train_images"] + summary["val_images"] == 36
    metrics = read_json(tmp_path / "metrics/data.json")
    assert metrics["skipped_images"] == 1
    assert list(metrics["per_class"]["test"]) == INTEL_CLASSES


def test_intel_missing_credentials_leave_nothing(tmp_path, monkeypatch, no_credentials):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KdpipeError) as err:
        pipeline.download(_intel_params())
    assert str(err.value) == intel.MISSING_CREDENTIALS  # the source's one sentence, unchanged
    assert list((tmp_path / "data/raw").iterdir()) == []


# --------------------------------------------------------------------------- Cats vs Dogs


def test_cats_vs_dogs_download_and_prepare_with_mock_data(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets", reason="needs the tfds extra (pip install -e '.[tfds]')")
    monkeypatch.chdir(tmp_path)
    params = parse_params({"data": {"name": "cats_vs_dogs", "image_size": 12}})
    with tfds.testing.mock_data(num_examples=40):
        pipeline.download(params)
        summary = pipeline.prepare(params)
    assert summary["classes"] == 2 and summary["image_shape"] == [3, 12, 12]
    assert sum(summary[f"{s}_images"] for s in ("train", "val", "test")) == 40
    assert set(summary["per_class"]["train"]) == {"cat", "dog"}
    assert summary["test_images"] > 0  # no official test split: prepare holds one out
