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
