"""Safe extraction (kdpipe.data.archives): an archive with one escaping member is refused whole."""

from __future__ import annotations

import stat
import tarfile
import zipfile

import pytest

from kdpipe.data.archives import UnsafeArchiveError, extract
from tests.data_fixtures import write_tar, write_zip

GOOD = {"pkg/a.txt": b"a", "pkg/sub/b.txt": b"b"}


def _nothing_extracted(tmp_path, dest):
    assert not dest.exists()
    assert not list(tmp_path.glob(".*extracting*"))
    assert not (tmp_path.parent / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_a_safe_archive_is_extracted(tmp_path, kind):
    archive = (write_tar if kind == "tar" else write_zip)(tmp_path / f"ok.{kind}", GOOD)
    dest = extract(archive, tmp_path / "out")
    assert (dest / "pkg/a.txt").read_bytes() == b"a"
    assert (dest / "pkg/sub/b.txt").read_bytes() == b"b"
    assert not list(tmp_path.glob(".*extracting*"))


def test_include_selects_members(tmp_path):
    archive = write_zip(tmp_path / "ok.zip", {**GOOD, "other/c.txt": b"c"})
    dest = extract(archive, tmp_path / "out", include=lambda name: name.startswith("pkg/"))
    assert (dest / "pkg/a.txt").exists() and not (dest / "other").exists()


@pytest.mark.parametrize("kind", ["tar", "zip"])
@pytest.mark.parametrize("evil", ["../evil.txt", "pkg/../../evil.txt", "/tmp/evil.txt", "C:/evil.txt"])
def test_escaping_paths_are_refused_and_nothing_is_extracted(tmp_path, kind, evil):
    # the escaping member comes last: the good ones before it must not be written either
    members = {**GOOD, evil: b"pwned"}
    archive = (write_tar if kind == "tar" else write_zip)(tmp_path / f"evil.{kind}", members)
    with pytest.raises(UnsafeArchiveError, match="refusing to extract"):
        extract(archive, tmp_path / "out")
    _nothing_extracted(tmp_path, tmp_path / "out")


@pytest.mark.parametrize(
    "links",
    [
        {"pkg/link": (tarfile.SYMTYPE, "../../etc")},  # symlink out of the folder
        {"pkg/link": (tarfile.SYMTYPE, "/etc/passwd")},  # absolute symlink
        {"pkg/hard": (tarfile.LNKTYPE, "../outside.txt")},  # hard link out of the folder
        {"pkg/dir": (tarfile.SYMTYPE, "."), "pkg/dir/up": (tarfile.SYMTYPE, "..")},  # chained links
        {"pkg/alias.txt": (tarfile.SYMTYPE, "a.txt")},  # inside: swaps one file for another
        {"pkg/copy.txt": (tarfile.LNKTYPE, "pkg/a.txt")},  # a hard link inside
    ],
    ids=["symlink-escape", "symlink-absolute", "hardlink-escape", "chained-symlinks", "symlink-inside",
         "hardlink-inside"],
)
def test_links_are_refused_wherever_they_point(tmp_path, links):
    archive = write_tar(tmp_path / "links.tar.gz", GOOD, links=links)
    with pytest.raises(UnsafeArchiveError, match=r"is a link \(to "):
        extract(archive, tmp_path / "out")
    _nothing_extracted(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("target", ["../../etc", "a.txt"])
def test_zip_symlinks_are_refused(tmp_path, target):
    archive = tmp_path / "links.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("pkg/a.txt", b"a")
        info = zipfile.ZipInfo("pkg/link")
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, target)
    with pytest.raises(UnsafeArchiveError, match="is a link"):
        extract(archive, tmp_path / "out")
    _nothing_extracted(tmp_path, tmp_path / "out")


def test_device_files_are_refused(tmp_path):
    archive = write_tar(tmp_path / "dev.tar.gz", GOOD, links={"pkg/fifo": (tarfile.FIFOTYPE, "")})
    with pytest.raises(UnsafeArchiveError, match="device file or FIFO"):
        extract(archive, tmp_path / "out")


def test_not_an_archive(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(Exception, match="neither a tar nor a zip"):
        extract(junk, tmp_path / "out")
