"""Values from outside (a registry's answer, a URL, the environment) made fit for a message.

A registry or an environment may be hostile or just broken, and whatever of it an error
message or a log line quotes must stay one short line and hold no secret: text is cut short
(`MAX_MESSAGE_VALUE`) with its control characters escaped, and a URL loses its user info and
its query (a signed object-storage URL carries a credential there). Nothing here raises on a
value it cannot parse.
"""

from __future__ import annotations

import re
from typing import Final

import httpx

MAX_MESSAGE_VALUE: Final = 200
"""Characters of a value from outside (a URL, a platform, an error text) an error message
quotes before it is cut short."""


def clip(value: object, limit: int = MAX_MESSAGE_VALUE) -> str:
    """`value` as text fit for a one-line message: control characters escaped, cut to
    `limit` characters (a hostile registry or environment must not fill a terminal)."""
    text = str(value)
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[: limit + 1])
    return text if len(text) <= limit else text[:limit] + "..."


_USER_INFO: Final = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]*@")
_QUERY: Final = re.compile(r"\?[^\s'\"]*")


def without_credentials(text: str) -> str:
    """`text` whose URLs have lost their user info and query (where credentials travel)."""
    return _QUERY.sub("?...", _USER_INFO.sub(r"\1", text))


def error_text(error: BaseException) -> str:
    """An exception's text for a message: URLs in it lose their user info and query (httpx
    quotes a bad ``Location``, which may be a signed storage URL), then `clip`."""
    return clip(without_credentials(str(error)))


def safe_url(url: httpx.URL | str) -> str:
    """A URL fit for a log line or an error: no user info, no query (signed storage URLs
    carry secrets), cut short; never raises (a hostile URL may not even parse)."""
    try:
        parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
        host = parsed.host
        if ":" in host:
            host = f"[{host}]"
        if parsed.port is not None:
            host = f"{host}:{parsed.port}"
        text = f"{parsed.scheme}://{host}{parsed.path}"
    except (httpx.InvalidURL, ValueError, TypeError, UnicodeError):
        text = str(url).split("?", 1)[0].rsplit("@", 1)[-1]
    return clip(text)


def safe_host(url: httpx.URL | str) -> str:
    """``host[:port]`` of `url` for a message (never its user info); never raises."""
    try:
        parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
        host = f"[{parsed.host}]" if ":" in parsed.host else parsed.host
        return clip(f"{host}:{parsed.port}" if parsed.port is not None else host)
    except (httpx.InvalidURL, ValueError, TypeError, UnicodeError):
        return "an unparseable URL"


def failed_host(error: httpx.RequestError, host: str) -> str:
    """The host a failed request was talking to: `host`, or where it had been redirected."""
    try:
        failed = safe_host(error.request.url)
    except RuntimeError:  # httpx raised it without a request
        return host
    return host if failed == host else f"{failed} (redirected from {host})"


def duration(value: float | None) -> str:
    """Seconds for a message: ``30``, ``2.5``, ``100000``; ``unlimited`` for None or inf."""
    if value is None or value == float("inf"):
        return "unlimited"
    if value >= 1e12:
        return "more than 10^12"
    return f"{value:.1f}".removesuffix(".0") if value < 100 else f"{value:.0f}"


__all__ = [
    "MAX_MESSAGE_VALUE",
    "clip",
    "duration",
    "error_text",
    "failed_host",
    "safe_host",
    "safe_url",
    "without_credentials",
]
