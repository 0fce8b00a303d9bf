"""Credentials out of URLs, for messages and logs."""

from __future__ import annotations

import re
from typing import Any

# scheme://userinfo@ — the userinfo stops at the end of the authority (/ ? #), so an @ in a
# path, query or fragment is not taken for a credential
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#@\s]+@")


def redact(value: Any) -> str:
    """``str(value)`` with every URL's whole ``user:password@`` part replaced by ``***@``
    (wherever in the text the URL stands); text without such a URL is returned unchanged."""
    return _URL_USERINFO.sub(r"\g<scheme>***@", str(value))
