"""Backends chosen by URL scheme through an explicit registry.

Each backend module registers its scheme once; a second registration of the same
scheme is a programming error. ``redact`` strips passwords from URLs before anything
prints or logs them.
"""

from __future__ import annotations

import re
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

from vmdr.errors import UsageError
from vmdr.storage.base import Backend

Factory = Callable[[urllib.parse.SplitResult], Backend]


@dataclass(frozen=True)
class Scheme:
    name: str
    factory: Factory
    help: str


_SCHEMES: dict[str, Scheme] = {}


def register(name: str, factory: Factory, help: str) -> None:
    """Register *factory* for URLs of scheme *name*. A duplicate is an error."""
    if name in _SCHEMES:
        raise ValueError(f"storage scheme {name!r} registered twice")
    _SCHEMES[name] = Scheme(name, factory, help)


def schemes() -> list[Scheme]:
    _load_builtin()
    return sorted(_SCHEMES.values(), key=lambda s: s.name)


# query parameters whose value is a secret in itself (pre-signed URLs, tokens); not
# "key", which names a key *file* (sftp://…?key=/root/.ssh/id)
_SECRET_PARAMS = frozenset({
    "password", "passwd", "pass", "pw", "secret", "token", "apikey", "api_key",
    "access_key", "secret_key", "accesskey", "secretkey", "auth", "authorization",
    "signature", "sig", "credential", "x-amz-signature", "x-amz-credential",
    "x-amz-security-token", "session_token",
})
# user:password@ inside any URL in free text
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^\s/@:'\"<>]*):"
                       r"(?P<pw>[^\s/@'\"<>]*)@")


def redact(url: str) -> str:
    """Return *url* with every password replaced by ``***``: the one in its own user
    part, those of URLs in its query (``?endpoint=http://user:secret@host``) and the
    values of secret-looking query parameters (``token=``, ``X-Amz-Signature=``)."""
    try:
        parts = urllib.parse.urlsplit(url)
        password = parts.password
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<unparsable url>"
    changed = False
    if password is not None:
        changed = True
        if port:
            host = f"{host}:{port}"
        netloc = f"{parts.username}:***@{host}" if parts.username else f"***@{host}"
        parts = parts._replace(netloc=netloc)
    if parts.query:
        pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        clean = [(k, "***" if k.lower() in _SECRET_PARAMS and v else
                  redact(v) if "://" in v else v) for k, v in pairs]
        if clean != pairs:
            changed = True
            parts = parts._replace(query=urllib.parse.urlencode(clean, safe=":/*@"))
    # untouched URLs come back as given: urlunsplit would drop an empty authority
    # ("qemu:///system" -> "qemu:/system")
    return urllib.parse.urlunsplit(parts) if changed else url


def redact_text(text: str) -> str:
    """*text* (an error or log message) with the password of every URL in it replaced
    by ``***``: the last line of defence for messages from libraries (botocore,
    paramiko) that quote the URL they were given."""
    if "://" not in text:
        return text
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


def parse(url: str) -> urllib.parse.SplitResult:
    """Split a repository location; a plain path becomes ``file://``."""
    if "://" not in url:
        if not url:
            raise UsageError("empty repository location")
        return urllib.parse.urlsplit("file://" + urllib.parse.quote(_abspath(url)))
    return urllib.parse.urlsplit(url)


def _abspath(path: str) -> str:
    import os

    return os.path.abspath(os.path.expanduser(path))


_loaded = False
_load_lock = threading.Lock()


def _load_builtin() -> None:
    global _loaded
    with _load_lock:  # two threads opening backends at once must both see every scheme
        if _loaded:
            return
        # Imported for their register() side effect; each module is small and cheap to import.
        from vmdr.storage import file, s3, sftp  # noqa: F401

        _loaded = True


def open_backend(url: str) -> Backend:
    """Return a backend for *url* (``/path``, ``file:///path``, ``sftp://…``, ``s3://…``)."""
    _load_builtin()
    parts = parse(url)
    scheme = _SCHEMES.get(parts.scheme)
    if scheme is None:
        known = ", ".join(sorted(_SCHEMES))
        raise UsageError(f"unknown repository scheme {parts.scheme!r} (known: {known})")
    backend = scheme.factory(parts)
    # unredacted, absolute: lets vmdr.serve reopen it in an nbdkit process
    backend.source_url = url if "://" in url else _abspath(url)
    return backend
