"""kdpipe.redact: credentials out of URLs, for messages and logs (moved from tests/test_tracking.py)."""

from __future__ import annotations

import pytest

from kdpipe.redact import redact


@pytest.mark.parametrize("value,logged", [
    ("https://user:pw@host/x", "https://***@host/x"),  # the whole userinfo, user name included
    ("https://user:pa:ss@host.example/x.tar.gz", "https://***@host.example/x.tar.gz"),
    ("ftp://token@host/x", "ftp://***@host/x"),
    ("https://host.example/a@b.tar.gz", "https://host.example/a@b.tar.gz"),  # an @ in the path is no credential
    ("https://host.example/x?to=a@b#c@d", "https://host.example/x?to=a@b#c@d"),  # nor in a query or fragment
    ("file:///data/c.tar.gz", "file:///data/c.tar.gz"),
    ("see https://u:p@a.example/x and http://v@b.example:8080/y", "see https://***@a.example/x and http://***@b.example:8080/y"),
    ("alice@example.com", "alice@example.com"),  # not a URL: passed through
    (0.5, "0.5"),
])
def test_redact_hides_url_credentials_only(value, logged):
    assert redact(value) == logged
