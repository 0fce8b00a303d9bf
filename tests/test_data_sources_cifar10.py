"""The CIFAR-10 source (kdpipe.data.sources.cifar10): its settings, the verified download and
the restricted reading of the pickled batches, on a tiny archive in the real format.

The download and prepare stages on CIFAR-10 served over HTTP are in test_data_pipeline.py;
the verified download itself (errors, interrupted transfers) in test_data_fetch.py.
"""

from __future__ import annotations

import pickle
import shutil

import pytest

from kdpipe.config import parse_params
from kdpipe.data.sources import cifar10
from kdpipe.data.sources.cifar10 import Cifar10Settings
from kdpipe.errors import KdpipeError
from tests.data_fixtures import make_cifar_archive, md5


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A CIFAR-10 python archive in the real format: 2 training batches and a test batch of 20 images."""
    return make_cifar_archive(tmp_path_factory.mktemp("cifar") / "cifar-10-python.tar.gz")


def test_native_size_and_pixel_layout(archive, tmp_path):
    settings = Cifar10Settings(url=str(archive), md5=md5(archive))  # a local path
    cifar10.download(tmp_path / "raw", settings)
    raw = cifar10.load(tmp_path / "raw", settings, 32)
    assert raw.train_images.shape == (40, 3, 32, 32) and raw.test_images.shape == (20, 3, 32, 32)
    batch = pickle.loads((tmp_path / "raw/cifar-10-batches-py/data_batch_1").read_bytes())
    assert raw.train_images[0].flatten().tolist() == batch["data"][0].tolist()  # R plane, G plane, B plane
    assert raw.train_labels[:10].tolist() == list(range(10))


def test_file_url(archive, tmp_path):
    settings = Cifar10Settings(url=archive.as_uri(), md5=md5(archive))
    cifar10.download(tmp_path / "raw", settings)
    assert (tmp_path / "raw/cifar-10-batches-py/test_batch").exists()


def test_bad_url_scheme_is_a_config_error():
    with pytest.raises(KdpipeError, match=r"data.cifar10.url='ftp://x/y' is not allowed"):
        parse_params({"data": {"name": "cifar10", "cifar10": {"url": "ftp://x/y", "md5": "0" * 32}}})


class _Evil:
    def __reduce__(self):
        return (shutil.rmtree, ("/definitely/not/here",))


def test_restricted_unpickler_refuses_code():
    payload = pickle.dumps({"data": _Evil()}, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="shutil.rmtree' is not allowed"):
        cifar10.restricted_loads(payload)


def test_restricted_unpickler_reads_python2_era_batches():
    # the official archive was pickled by Python 2 + old numpy: numpy.core.multiarray._reconstruct
    payload = pickle.dumps({"data": __import__("numpy").arange(6, dtype="uint8")}, protocol=2)
    old_style = payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in old_style
    assert cifar10.restricted_loads(old_style)["data"].tolist() == list(range(6))


def test_a_batch_changed_after_download_is_not_unpickled(archive, tmp_path):
    settings = Cifar10Settings(url=str(archive), md5=md5(archive))
    cifar10.download(tmp_path / "raw", settings)
    (tmp_path / "raw/cifar-10-batches-py/data_batch_2").write_bytes(pickle.dumps(_Evil(), protocol=2))
    with pytest.raises(KdpipeError, match="not the file that was downloaded and verified"):
        cifar10.load(tmp_path / "raw", settings, 32)
