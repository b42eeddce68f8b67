"""The storage backend contract.

A backend stores opaque, immutable-by-convention objects under slash-separated names
(``data/ab/ab12…``, ``snapshots/…``, ``locks/…``). It knows nothing of encryption,
chunks or snapshots. Every method documents what it guarantees; every implementation
(file, SFTP, S3, and the wrappers) passes the same conformance suite in
``tests/integration/test_backend_conformance.py``.

Errors are classified, never raw library exceptions:

* :class:`~vmdr.errors.ObjectNotFound` — the named object does not exist;
* :class:`~vmdr.errors.TransientStorageError` — may succeed if retried (timeouts, 5xx,
  dropped connections); :class:`~vmdr.storage.wrappers.RetryingBackend` retries these;
* :class:`~vmdr.errors.AuthenticationFailed`, :class:`~vmdr.errors.NoSpace` and any
  other :class:`~vmdr.errors.StorageError` — permanent; retrying will not help.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

from vmdr.errors import UsageError

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


def validate_name(name: str) -> str:
    """Return *name* if it is a valid object name, else raise ``UsageError``.

    Names are relative, slash-separated, made of ``[A-Za-z0-9_.-]`` and contain no
    ``.`` or ``..`` component, so that no backend can be tricked into escaping its root.
    """
    if not _NAME_RE.match(name) or any(p in (".", "..") for p in name.split("/")):
        raise UsageError(f"invalid object name: {name!r}")
    return name


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing says of one object. ``mtime`` is seconds since the epoch (UTC)."""

    name: str
    size: int
    mtime: float


class Backend(ABC):
    """A place that stores named objects.

    Implementations are safe to call from several threads at once.
    """

    #: The location with any password stripped; safe to print and log.
    display_url: str = ""
    # The URL it was opened from, unredacted (may hold a password): never print it.
    source_url: str = ""

    @abstractmethod
    def create(self) -> None:
        """Prepare an empty location (make the directory, check the bucket exists).

        Succeeds if the location already exists and is empty or only holds
        directories; raises ``StorageError`` if it cannot be created.
        """

    @abstractmethod
    def get(self, name: str) -> bytes:
        """Return the whole object. Raises ``ObjectNotFound`` if it does not exist."""

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        """Return up to *length* bytes from *offset*. Slow default: read all and slice."""
        return self.get(name)[offset : offset + length]

    @abstractmethod
    def put(self, name: str, data: bytes) -> None:
        """Store *data* under *name* atomically: a reader sees the old object, the whole
        new object, or nothing — never a part. Replaces an existing object."""

    def put_if_absent(self, name: str, data: bytes) -> bool:
        """Store *data* unless *name* exists; return ``True`` if it was written.

        Slow default: ``exists`` then ``put`` (not atomic; content-addressed callers do
        not need it to be, since both writers store equivalent data)."""
        if self.exists(name):
            return False
        self.put(name, data)
        return True

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove *name*. Raises ``ObjectNotFound`` if it did not exist."""

    @abstractmethod
    def stat(self, name: str) -> ObjectInfo:
        """Return size and modification time. Raises ``ObjectNotFound``."""

    def exists(self, name: str) -> bool:
        """Whether *name* exists. Default: ``stat`` and catch ``ObjectNotFound``."""
        from vmdr.errors import ObjectNotFound

        try:
            self.stat(name)
        except ObjectNotFound:
            return False
        return True

    @abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Yield every object whose name starts with ``prefix + '/'`` (recursively), in
        no particular order. A prefix with no objects yields nothing (no error)."""

    def list_temporary(self, prefix: str) -> Iterator[ObjectInfo]:
        """Yield the temporary objects (``*.tmp``, full names) that writers killed before
        their rename left under ``prefix + '/'``; ``delete`` removes one. Default: none
        (a backend whose writes are a single atomic call, like S3, leaves none)."""
        return iter(())

    def close(self) -> None:
        """Release connections. The backend must not be used afterwards."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.display_url}>"
