"""Who may read the status page: a bearer token, HTTP Basic with the token as password, the
token in the query string (``?token=``, for tools that cannot send headers, such as a headless
browser's screenshot mode), or the cookie the server sets after one of those succeeded.

Every comparison is constant-time (:func:`hmac.compare_digest`) so response timing does not
leak how much of a guessed token was right.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
from http.cookies import CookieError, SimpleCookie

COOKIE_NAME = "msfn_status"
#: Host names a loopback-bound page without a token answers to (see :func:`host_allowed`).
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def cookie_value(token: str) -> str:
    """The session cookie is derived from the token, never the token itself, so a cookie that
    leaks (a proxy log, a browser profile) does not reveal the token for ``/metrics`` scrapes;
    it stays valid across node restarts until the token changes."""
    return hmac.new(token.encode("utf-8"), b"msfn-status-cookie", hashlib.sha256).hexdigest()


def authorized(
    token: str | None,
    authorization: str | None,
    cookie_header: str | None,
    query_token: str | None,
) -> bool:
    """True when no token is configured or one of the accepted credentials matches it."""
    if token is None:
        return True
    if authorization:
        scheme, _, credentials = authorization.strip().partition(" ")
        credentials = credentials.strip()
        if scheme.lower() == "bearer" and _same(credentials, token):
            return True
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                decoded = ""
            _, _, password = decoded.partition(":")  # any user name: the password is the token
            if _same(password, token):
                return True
    if query_token is not None and _same(query_token, token):
        return True
    if cookie_header:
        try:
            jar = SimpleCookie(cookie_header)
        except CookieError:
            return False
        morsel = jar.get(COOKIE_NAME)
        if morsel is not None and _same(morsel.value, cookie_value(token)):
            return True
    return False


def is_loopback(address: str) -> bool:
    if address in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def host_allowed(host_header: str | None, bind_address: str, token: str | None) -> bool:
    """Refuse foreign ``Host`` names on a token-less loopback page: a web site the operator
    visits could otherwise point its own DNS name at 127.0.0.1 (DNS rebinding) and read the
    page from the operator's browser. With a token, or bound to a real interface (where the
    operator chose the exposure), any host name is served."""
    if token is not None or not is_loopback(bind_address):
        return True
    if not host_header:
        return True  # HTTP/1.0 clients (curl -0, probes) send none; they are local processes
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:8080
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host in LOOPBACK_NAMES or is_loopback(host)
