"""Credentials out of every URL alignflow prints, logs or saves.

``MLFLOW_TRACKING_URI`` and ``PREFECT_API_URL`` may carry ``user:password@`` (basic auth, a
database URI) or a token in the query string. Anything shown to people or written down (the
summary, Prefect artifacts, logs, MLflow tags and params) goes through :func:`redact_url` (one
URL) or :func:`redact_text` (free text that may contain URLs); connecting still uses the raw value.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

MASK = "***"
SECRET_PARAMS = re.compile(r"pass|pwd|secret|token|key|auth|sig|credential", re.IGNORECASE)
"""Query parameters whose values are masked (``?password=``, ``?access_token=``, ``X-Amz-Signature``...)."""
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s'\"<>`]+")


def redact_url(url: str) -> str:
    """``url`` with the password of its user info and secret query values replaced by ``***``.

    ``https://bob:s3cret@host/api`` -> ``https://bob:***@host/api``; a user name alone (often a
    token: ``https://TOKEN@host``) is masked too. A string that is not a URL comes back unchanged."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if not parts.scheme or not parts.netloc:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, sep, _ = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{host}" if sep else f"{MASK}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(SECRET_PARAMS.search(k) for k, _ in pairs):
            query = urlencode([(k, MASK if SECRET_PARAMS.search(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """``text`` with every URL in it passed through :func:`redact_url`."""
    return _URL.sub(lambda m: redact_url(m.group(0)), text)


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """``(url without user info, user, password)`` for an http(s) URL with ``user:password@``;
    ``(url, None, None)`` for anything else (database URIs need theirs in the URL)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url, None, None
    if parts.scheme not in ("http", "https") or parts.password is None:
        return url, None, None
    host = parts.netloc.rsplit("@", 1)[1]
    clean = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return clean, unquote(parts.username or ""), unquote(parts.password)
