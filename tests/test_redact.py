"""Credentials out of URLs (kdpipe.redact), for download messages and logged params."""

from __future__ import annotations

import pytest

from kdpipe.redact import redact


@pytest.mark.parametrize("url,shown", [
    ("https://user:pw@host/x", "https://***@host/x"),  # the whole userinfo, user name included
    ("https://token@host/x", "https://***@host/x"),
    ("http://user:pw@host.example:8080/c.tar.gz", "http://***@host.example:8080/c.tar.gz"),
    ("https://host/x", "https://host/x"),
    ("data/raw/c.tar.gz", "data/raw/c.tar.gz"),
])
def test_download_messages_hide_url_credentials(url, shown):
    assert redact(url) == shown


# The cases of tests/test_tracking.py::test_redact_hides_url_credentials_only (the same
# function, re-exported by kdpipe.tracking), so that test can be dropped from there.
@pytest.mark.parametrize("value,logged", [
    ("https://user:pa:ss@host.example/x.tar.gz", "https://***@host.example/x.tar.gz"),
    ("ftp://token@host/x", "ftp://***@host/x"),
    ("https://host.example/a@b.tar.gz", "https://host.example/a@b.tar.gz"),  # an @ in the path is no credential
    ("https://host.example/x?to=a@b#c@d", "https://host.example/x?to=a@b#c@d"),  # nor in a query or fragment
    ("file:///data/c.tar.gz", "file:///data/c.tar.gz"),
    ("see https://u:p@a.example/x and http://v@b.example:8080/y",
     "see https://***@a.example/x and http://***@b.example:8080/y"),
    ("alice@example.com", "alice@example.com"),  # not a URL: passed through
    (0.5, "0.5"),
])
def test_redact_hides_url_credentials_only(value, logged):
    assert redact(value) == logged
