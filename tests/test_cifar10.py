"""CIFAR-10 through the real download code: served over HTTP on 127.0.0.1 by the test."""

from __future__ import annotations

import pickle
import shutil
import tarfile
from pathlib import Path

import pytest

from kdpipe.config import parse_params
from kdpipe.data import cifar10, pipeline
from kdpipe.data.archives import UnsafeArchiveError
from kdpipe.data.fetch import ChecksumError, redact
from kdpipe.errors import KdpipeError
from kdpipe.io import file_digest, read_json
from tests.data_fixtures import cifar_members, http_server, make_cifar_archive, md5, write_tar, write_zip


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


def _params(url: str, md5_hex: str, size: int = 32):
    return parse_params({"data": {"name": "cifar10", "image_size": size, "cifar10": {"url": url, "md5": md5_hex}}})


def test_download_verify_extract_prepare(served, tmp_path, monkeypatch):
    root, base = served
    monkeypatch.chdir(tmp_path)
    params = _params(f"{base}/cifar-10-python.tar.gz", md5(root / "cifar-10-python.tar.gz"), size=16)
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


def test_native_size_and_pixel_layout(served, tmp_path):
    root, _ = served
    cfg = _params(str(root / "cifar-10-python.tar.gz"), md5(root / "cifar-10-python.tar.gz")).data  # a local path
    cifar10.download(tmp_path / "raw", cfg)
    raw = cifar10.load(tmp_path / "raw", cfg)
    assert raw.train_images.shape == (40, 3, 32, 32) and raw.test_images.shape == (20, 3, 32, 32)
    batch = pickle.loads((tmp_path / "raw/cifar-10-batches-py/data_batch_1").read_bytes())
    assert raw.train_images[0].flatten().tolist() == batch["data"][0].tolist()  # R plane, G plane, B plane
    assert raw.train_labels[:10].tolist() == list(range(10))


def test_file_url(served, tmp_path):
    root, _ = served
    cfg = _params((root / "cifar-10-python.tar.gz").as_uri(), md5(root / "cifar-10-python.tar.gz")).data
    cifar10.download(tmp_path / "raw", cfg)
    assert (tmp_path / "raw/cifar-10-batches-py/test_batch").exists()


@pytest.mark.parametrize("name", ["flipped.tar.gz", "truncated.tar.gz"])
def test_corrupted_download_fails_checksum_and_leaves_nothing(served, tmp_path, monkeypatch, name):
    root, base = served
    monkeypatch.chdir(tmp_path)
    params = _params(f"{base}/{name}", md5(root / "cifar-10-python.tar.gz"))  # the md5 of the good archive
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        pipeline.download(params)
    assert not (tmp_path / "data/raw/cifar10").exists()
    assert list((tmp_path / "data/raw").iterdir()) == []


@pytest.mark.parametrize("name", ["dotdot.tar.gz", "dotdot.zip", "absolute.tar.gz", "symlink.tar.gz"])
def test_malicious_archive_is_refused(served, tmp_path, monkeypatch, name):
    root, base = served
    monkeypatch.chdir(tmp_path)
    params = _params(f"{base}/{name}", md5(root / name))  # its checksum matches: the content is the problem
    with pytest.raises(UnsafeArchiveError, match="refusing to extract"):
        pipeline.download(params)
    assert list((tmp_path / "data/raw").iterdir()) == []
    assert not list(tmp_path.rglob("escape.txt")) and not Path("/tmp/kdpipe-escape.txt").exists()


@pytest.mark.parametrize("url,shown", [
    ("https://user:pw@host/x", "https://***@host/x"),  # the whole userinfo, user name included
    ("https://token@host/x", "https://***@host/x"),
    ("http://user:pw@host.example:8080/c.tar.gz", "http://***@host.example:8080/c.tar.gz"),
    ("https://host/x", "https://host/x"),
    ("data/raw/c.tar.gz", "data/raw/c.tar.gz"),
])
def test_download_messages_hide_url_credentials(url, shown):
    assert redact(url) == shown


def test_file_digest_streams_md5_and_sha256(tmp_path):
    import hashlib

    path = tmp_path / "f.bin"
    data = bytes(range(256)) * 9000  # > 2 MiB: several 1 MiB chunks
    path.write_bytes(data)
    assert file_digest(path, "md5") == hashlib.md5(data).hexdigest() == md5(path)
    assert file_digest(path) == hashlib.sha256(data).hexdigest()


def test_unreachable_server_and_missing_file(tmp_path):
    with http_server(tmp_path) as base:
        pass  # the server is gone: its port now refuses connections
    cfg = _params(f"{base}/cifar-10-python.tar.gz", "0" * 32).data
    with pytest.raises(KdpipeError, match="could not download .*set data.cifar10.url to its local path"):
        cifar10.download(tmp_path / "raw", cfg)
    cfg = _params(str(tmp_path / "nope.tar.gz"), "0" * 32).data
    with pytest.raises(KdpipeError, match="does not exist; set data.cifar10.url"):
        cifar10.download(tmp_path / "raw2", cfg)
    with http_server(tmp_path) as base:
        cfg = _params(f"{base}/missing.tar.gz", "0" * 32).data
        with pytest.raises(KdpipeError, match="answered 404"):
            cifar10.download(tmp_path / "raw3", cfg)
    assert not list(tmp_path.rglob("*.part"))


def test_connection_dropped_mid_download(tmp_path):
    import http.server
    import threading

    class Dropping(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # promises 100,000 bytes, sends 10, hangs up
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"0123456789")
            self.wfile.flush()
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Dropping)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        cfg = _params(f"http://127.0.0.1:{server.server_address[1]}/x.tar.gz", "0" * 32).data
        with pytest.raises(KdpipeError, match=r"incomplete \(10 of 100,000 bytes\)|broke off after 10 bytes"):
            cifar10.download(tmp_path / "raw", cfg)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert not list((tmp_path / "raw").iterdir())


def test_bad_url_scheme_is_a_config_error():
    with pytest.raises(KdpipeError, match=r"data.cifar10.url='ftp://x/y' is not allowed"):
        _params("ftp://x/y", "0" * 32)


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


def test_a_batch_changed_after_download_is_not_unpickled(served, tmp_path):
    root, _ = served
    cfg = _params(str(root / "cifar-10-python.tar.gz"), md5(root / "cifar-10-python.tar.gz")).data
    cifar10.download(tmp_path / "raw", cfg)
    (tmp_path / "raw/cifar-10-batches-py/data_batch_2").write_bytes(pickle.dumps(_Evil(), protocol=2))
    with pytest.raises(KdpipeError, match="not the file that was downloaded and verified"):
        cifar10.load(tmp_path / "raw", cfg)
