"""Append-only client mode as a backend wrapper.

``AppendOnlyBackend`` lets a client add objects but never remove or replace one, except
its own lock files under ``locks/``. ``forget``, ``prune``, ``key passwd``/``remove`` and
anything else that deletes therefore fail with :class:`~vmdr.errors.AppendOnlyViolation`
(exit 8) before changing anything they would have deleted.

Content-addressed objects (``data/``, ``snapshots/``, ``attachments/``) are named by the
ID of their plaintext, so an honest writer storing an existing name stores the same
content: that ``put`` is skipped quietly instead of overwriting. Any other existing name
(``vmdr-repo``, ``keys/…``, ``state/…``) is refused.

This protects against mistakes and against a compromised host *using vmdr*; it cannot
stop an attacker holding the storage credential from using another client. Real
immutability is enforced server-side (S3 Object Lock, SFTP server restrictions, file
attributes): see docs/operations.md, "Append-only and immutable repositories".
"""

from __future__ import annotations

import logging

from vmdr.errors import AppendOnlyViolation
from vmdr.storage.wrappers import DelegatingBackend

log = logging.getLogger(__name__)
MUTABLE_PREFIXES = ("locks/",)
CONTENT_ADDRESSED = ("data/", "snapshots/", "attachments/")


def _mutable(name: str) -> bool:
    return name.startswith(MUTABLE_PREFIXES)


class AppendOnlyBackend(DelegatingBackend):
    """Refuse ``delete`` and replacing ``put`` on *inner*, except under ``locks/``."""

    def _refuse(self, what: str, name: str) -> AppendOnlyViolation:
        return AppendOnlyViolation(
            f"append-only mode: refusing to {what} {name} in {self.display_url}"
        )

    def put(self, name: str, data: bytes) -> None:
        if _mutable(name):
            self.inner.put(name, data)
            return
        if self.inner.put_if_absent(name, data):
            return
        if name.startswith(CONTENT_ADDRESSED):
            log.debug("append-only: %s exists already; not replaced", name)
            return
        raise self._refuse("replace", name)

    def delete(self, name: str) -> None:
        if not _mutable(name):
            raise self._refuse("delete", name)
        self.inner.delete(name)
