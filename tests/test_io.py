"""File helpers (kdpipe.io): streamed file hashing."""

from __future__ import annotations

import hashlib

from kdpipe.io import file_digest
from tests.data_fixtures import md5


def test_file_digest_streams_md5_and_sha256(tmp_path):
    path = tmp_path / "f.bin"
    data = bytes(range(256)) * 9000  # > 2 MiB: several 1 MiB chunks
    path.write_bytes(data)
    assert file_digest(path, "md5") == hashlib.md5(data).hexdigest() == md5(path)
    assert file_digest(path) == hashlib.sha256(data).hexdigest()


def test_save_torch_writes_the_same_bytes_for_the_same_object(tmp_path):
    """DVC hashes outputs: re-saving an unchanged model or split must not change its bytes
    (torch names a zip archive's root folder after the file it is given: the temporary name)."""
    import time

    import torch

    from kdpipe.io import load_torch, save_torch

    obj = {"weights": torch.arange(12.0).reshape(3, 4), "names": ["a", "b"]}
    save_torch(tmp_path / "one.pt", obj)
    time.sleep(1.1)  # zip entries carry no time that could differ
    save_torch(tmp_path / "two.pt", obj)
    assert (tmp_path / "one.pt").read_bytes() == (tmp_path / "two.pt").read_bytes()
    loaded = load_torch(tmp_path / "two.pt")
    assert torch.equal(loaded["weights"], obj["weights"]) and loaded["names"] == ["a", "b"]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
