"""The PBX's base URL: checked once, the same way for the client and for settings.

Kept free of the HTTP stack, so that reading a config file that names a PBX does not cost
the import of httpx (commands such as `callvault list` start in a fraction of a second).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

# A query string holds tokens and randoms: never shown to people.
_QUERY = re.compile(r"\?[^\s'\"]*")
_USERINFO = re.compile(r"^(\s*(?:[A-Za-z][A-Za-z0-9+.-]*:)?//)?[^/?#]*@")


def strip_query(text: str) -> str:
    """Remove query strings (they hold tokens and randoms) from text meant for humans."""
    return _QUERY.sub("", text)


def url_for_humans(text: str) -> str:
    """A URL as the user typed it, for an error message: without a query string and without
    a ``user:password@`` part (a password typed into --pbx must not be echoed)."""
    return _USERINFO.sub(lambda match: match.group(1) or "", strip_query(text))


def check_pbx_url(base_url: str) -> str:
    """The PBX's base URL as ``scheme://host[:port][/path]``, or ValueError saying why not.

    The scheme is http or https, there is a host, no user name or password (one typed in
    is never echoed), a port if any is a number; a path ending in ``/api`` or
    ``/api/<version>`` (copied from the documents) is cut there, and a query or fragment
    dropped.
    """
    text = base_url.strip()
    shown = url_for_humans(text)
    if "://" not in text:
        raise ValueError(
            f"PBX URL {shown!r} has no scheme: use https://HOST:PORT "
            "(the PBX web port, 8088 by default)"
        )
    try:
        parts = urlsplit(text)
        port = parts.port  # ValueError for a port that is not a number or out of range
    except ValueError as exc:
        raise ValueError(f"PBX URL {shown!r} is not a URL ({exc})") from None
    if parts.username is not None or parts.password is not None:
        raise ValueError("the PBX URL must not contain a user name or password")
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"PBX URL scheme {parts.scheme!r} is not http or https")
    host = parts.hostname
    if not host:
        raise ValueError(f"PBX URL {shown!r} has no host")
    path = parts.path.rstrip("/")
    if path.endswith("/api") or "/api/" in path + "/":
        path = path[: path.find("/api")]
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    return urlunsplit((scheme, netloc, path, "", ""))
