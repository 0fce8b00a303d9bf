"""Verified downloads: stream to a temporary file, check the md5, then rename.

A URL may be ``http(s)://``, ``file://`` or a plain local path (relative paths are relative
to the project root, where every stage runs). The file only appears under its final name
once it is complete and its checksum matched, so a failed, interrupted or tampered
download never leaves anything that looks usable.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from tqdm.auto import tqdm

from kdpipe.errors import KdpipeError
from kdpipe.io import CHUNK, atomic_path
from kdpipe.redact import redact

TIMEOUT_S = 60
REMOTE_SCHEMES = ("http", "https")


class ChecksumError(KdpipeError):
    """A downloaded file's checksum is not the expected one."""


def is_local(url: str) -> bool:
    """A plain path (``data/x.tar.gz``, ``/abs/x``, ``C:\\x``) rather than a URL."""
    scheme = urllib.parse.urlsplit(url).scheme
    return scheme == "" or len(scheme) == 1  # "C:" is a Windows drive, not a scheme


def url_scheme_ok(url: str) -> bool:
    return is_local(url) or urllib.parse.urlsplit(url).scheme in (*REMOTE_SCHEMES, "file")


@contextmanager
def _open(url: str, key: str) -> Iterator[tuple[BinaryIO, int | None]]:
    """Yield (binary stream, size in bytes or None) for a URL or a local path."""
    shown = redact(url)
    if is_local(url) or urllib.parse.urlsplit(url).scheme == "file":
        path = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path)) if not is_local(url) else Path(url)
        try:
            fh = open(path, "rb")
        except FileNotFoundError:
            raise KdpipeError(f"{path} does not exist; set {key} to an existing file, a file:// URL or an http(s) URL.") from None
        except OSError as exc:
            raise KdpipeError(f"cannot read {path} ({exc.strerror}); set {key} to a readable file.") from None
        with fh:
            yield fh, os.fstat(fh.fileno()).st_size
        return
    try:
        response = urllib.request.urlopen(url, timeout=TIMEOUT_S)  # noqa: S310 (scheme checked in config)
    except urllib.error.HTTPError as exc:
        raise KdpipeError(f"the server answered {exc.code} {exc.reason} for {shown}; check {key}.") from None
    except (urllib.error.URLError, socket.timeout, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise KdpipeError(
            f"could not download {shown} ({reason}); check the network connection, or download the file "
            f"elsewhere and set {key} to its local path."
        ) from None
    with response:
        length = response.headers.get("Content-Length")
        yield response, int(length) if length and length.isdigit() else None


def download_file(url: str, dest: str | Path, md5: str, settings: str, desc: str | None = None) -> Path:
    """Fetch ``url`` to ``dest`` through a temporary file; rename only when the md5 matches.

    ``settings`` is the params section holding ``url`` and ``md5`` (named in error messages).
    """
    dest = Path(dest)
    digest = hashlib.md5(usedforsecurity=False)
    received = 0
    with atomic_path(dest, suffix=".part") as tmp:
        with open(tmp, "wb") as out, _open(url, f"{settings}.url") as (src, size):
            with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=desc or dest.name,
                      mininterval=0.5) as bar:
                while True:
                    try:
                        chunk = src.read(CHUNK)
                    except (OSError, socket.timeout, http.client.HTTPException) as exc:  # e.g. IncompleteRead
                        raise KdpipeError(
                            f"the download of {redact(url)} broke off after {received:,} bytes ({exc}); "
                            "run the download stage again."
                        ) from None
                    if not chunk:
                        break
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if size is not None and received != size:
            raise ChecksumError(
                f"the download of {redact(url)} is incomplete ({received:,} of {size:,} bytes); "
                "run the download stage again."
            )
        actual = digest.hexdigest()
        if actual != md5.lower():
            raise ChecksumError(
                f"checksum mismatch for {redact(url)}: md5 is {actual}, expected {md5.lower()} "
                f"({settings}.md5); the file is corrupted, truncated or not the "
                "expected one — get a fresh copy, or fix the url/md5 pair."
            )
    return dest
