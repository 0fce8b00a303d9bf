"""The Intel Image Classification source (kdpipe.data.sources.intel): Kaggle's zip layout,
made by the test; only the call to the Kaggle service is replaced.

The download and prepare stages on it (through the authenticated Kaggle client) are in
test_data_pipeline.py.
"""

from __future__ import annotations

import pytest

from kdpipe.data.sources import intel
from kdpipe.data.sources.intel import IntelSettings
from kdpipe.errors import KdpipeError
from tests.data_fixtures import INTEL_CLASSES, make_intel_zip, no_credentials  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def kaggle_zip(tmp_path_factory):
    return make_intel_zip(tmp_path_factory.mktemp("kaggle") / "intel-image-classification.zip")


def test_offline_zip_path_and_max_per_class(tmp_path, kaggle_zip):
    settings = IntelSettings(zip_path=str(kaggle_zip), max_per_class=3)
    intel.download(tmp_path / "raw", settings)
    raw = intel.load(tmp_path / "raw", settings, 16)
    assert raw.train_images.shape == (18, 3, 16, 16)  # 3 per class; the corrupt file sorts after them
    assert raw.test_images.shape == (12, 3, 16, 16) and raw.skipped == 0
    assert raw.class_names == INTEL_CLASSES and raw.flip


def test_missing_zip_path(tmp_path):
    with pytest.raises(KdpipeError, match="data.intel.zip_path='nope.zip' does not exist"):
        intel.download(tmp_path / "raw", IntelSettings(zip_path="nope.zip"))


def test_missing_credentials_one_sentence(tmp_path, no_credentials):
    with pytest.raises(KdpipeError) as err:
        intel.download(tmp_path / "raw", IntelSettings())
    message = str(err.value)
    assert message == intel.MISSING_CREDENTIALS
    for option in ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY", "~/.kaggle/", "data.intel.zip_path"):
        assert option in message
    assert message.count(". ") == 0 and message.endswith(".")  # one sentence


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
        intel.download(tmp_path / "raw", IntelSettings())
    assert "secret" not in str(err.value) and "Kaggle download of" in str(err.value)


def test_credential_files_are_found(no_credentials):
    assert intel.credentials_source() is None
    (no_credentials / ".kaggle").mkdir()
    (no_credentials / ".kaggle/kaggle.json").write_text("{}")  # no username/key in it: not credentials
    assert intel.credentials_source() is None
    (no_credentials / ".kaggle/kaggle.json").write_text('{"username": "u", "key": "k"}')
    assert intel.credentials_source().endswith("kaggle.json")
