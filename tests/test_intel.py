"""Intel Image Classification: Kaggle's zip layout, made by the test; only the call to the
Kaggle service is replaced."""

from __future__ import annotations

import shutil

import pytest

from kdpipe.config import parse_params
from kdpipe.data import intel, pipeline
from kdpipe.errors import KdpipeError
from kdpipe.io import read_json
from tests.data_fixtures import INTEL_CLASSES, make_intel_zip

KAGGLE_ENV = ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR", "XDG_CONFIG_HOME")


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    """An empty home and no Kaggle variables."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in KAGGLE_ENV:
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture(scope="module")
def kaggle_zip(tmp_path_factory):
    return make_intel_zip(tmp_path_factory.mktemp("kaggle") / "intel-image-classification.zip")


def _params(**intel_settings):
    return parse_params({"data": {"name": "intel", "image_size": 16, "intel": intel_settings}})


def test_kaggle_download_then_prepare(tmp_path, monkeypatch, no_credentials, kaggle_zip):
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
    params = _params()
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


def test_offline_zip_path_and_max_per_class(tmp_path, kaggle_zip):
    cfg = _params(zip_path=str(kaggle_zip), max_per_class=3).data
    intel.download(tmp_path / "raw", cfg)
    raw = intel.load(tmp_path / "raw", cfg)
    assert raw.train_images.shape == (18, 3, 16, 16)  # 3 per class; the corrupt file sorts after them
    assert raw.test_images.shape == (12, 3, 16, 16) and raw.skipped == 0
    assert raw.class_names == INTEL_CLASSES and raw.flip


def test_missing_zip_path(tmp_path):
    with pytest.raises(KdpipeError, match="data.intel.zip_path='nope.zip' does not exist"):
        intel.download(tmp_path / "raw", _params(zip_path="nope.zip").data)


def test_missing_credentials_one_sentence(tmp_path, monkeypatch, no_credentials):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KdpipeError) as err:
        pipeline.download(_params())
    message = str(err.value)
    assert message == intel.MISSING_CREDENTIALS
    for option in ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY", "~/.kaggle/", "data.intel.zip_path"):
        assert option in message
    assert message.count(". ") == 0 and message.endswith(".")  # one sentence
    assert list((tmp_path / "data/raw").iterdir()) == []


def test_kaggle_exit_is_caught(monkeypatch, no_credentials, capsys):
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "0123456789abcdef-secret")
    from kaggle.api.kaggle_api_extended import KaggleApi

    def refuse(self):
        print("Authentication required to call the Kaggle API ...")
        exit(1)

    monkeypatch.setattr(KaggleApi, "authenticate", refuse)
    with pytest.raises(KdpipeError, match="Kaggle credentials were rejected; set KAGGLE_API_TOKEN"):
        intel.kaggle_api()
    assert "Authentication required" not in capsys.readouterr().out


def test_service_errors_never_show_the_key(tmp_path, monkeypatch, no_credentials):
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "0123456789abcdef-secret")

    def boom(api, dataset, dest):
        raise ConnectionError("failed https://someone:0123456789abcdef-secret@www.kaggle.com/api")

    monkeypatch.setattr(intel, "fetch_from_kaggle", boom)
    with pytest.raises(KdpipeError) as err:
        intel.download(tmp_path / "raw", _params().data)
    assert "secret" not in str(err.value) and "Kaggle download of" in str(err.value)


def test_credential_files_are_found(no_credentials):
    assert intel.credentials_source() is None
    (no_credentials / ".kaggle").mkdir()
    (no_credentials / ".kaggle/kaggle.json").write_text("{}")  # no username/key in it: not credentials
    assert intel.credentials_source() is None
    (no_credentials / ".kaggle/kaggle.json").write_text('{"username": "u", "key": "k"}')
    assert intel.credentials_source().endswith("kaggle.json")
