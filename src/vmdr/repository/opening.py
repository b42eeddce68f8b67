"""One way to open a repository: typed options, one storage stack, a declared lock.

Every command, job and (coming) daemon opens a repository with :func:`open_repository`;
nothing else builds the backend stack or looks up a passphrase. The caller states what it
needs, as borg's ``with_repository(exclusive=…)`` and kopia's reader/writer actions do:

* ``lock="shared"``: reads and adds (backup, restore, check, copy, serve…);
* ``lock="exclusive"``: deletes or rewrites (forget, prune, key changes);
* ``lock=None``: no lock (``repo unlock``, key export, the plan's read-only survey, the
  nbdkit plugin whose parent process holds the lock).

The lock is released when the repository is closed.

The storage stack, outermost first (docs/architecture.md, "Opening a repository")::

    AppendOnlyBackend        when OpenOptions.append_only
    RetryingBackend          transient errors, backoff with jitter
    LimitingBackend          at most OpenOptions.connections calls in flight
    ThrottlingBackend        when OpenOptions.bandwidth (not for local directories)
    ObjectLockBackend        when the repository's config asks for S3 Object Lock
    the backend of the URL   file, sftp, s3

Passphrases come from a :class:`Passphrase`: the environment variable, then the file, then
a fallback, then (only in a terminal, and only if the caller allows it) a prompt.
"""

from __future__ import annotations

import getpass
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from vmdr.credentials import read_secret, read_secret_bytes
from vmdr.errors import NoSpace, UsageError, WrongPassword
from vmdr.repository.repo import Repository
from vmdr.storage.appendonly import AppendOnlyBackend
from vmdr.storage.base import Backend
from vmdr.storage.file import FileBackend
from vmdr.storage.objectlock import with_object_lock
from vmdr.storage.registry import open_backend
from vmdr.storage.throttle import ThrottlingBackend, TokenBucket
from vmdr.storage.wrappers import wrap

log = logging.getLogger(__name__)

LockMode = Literal["shared", "exclusive"] | None

__all__ = ["LockMode", "OpenOptions", "Passphrase", "open_backend_stack", "open_repository",
           "prompt_new_passphrase"]


class Passphrase:
    """Where one repository's passphrase comes from, looked up once and remembered.

    Order: the environment variable *env* (if set, even empty), the file *file* (0600),
    *fallback* (e.g. another repository's passphrase), then a prompt on the terminal when
    *prompt* is not None and stdin is a terminal. Otherwise :class:`WrongPassword` names
    *sources* (what the user could have set).
    """

    def __init__(
        self, *, env: str | None = "VMDR_PASSWORD", file: str | None = None,
        fallback: Callable[[], str] | None = None,
        prompt: str | None = "Repository passphrase: ",
        sources: str = "VMDR_PASSWORD_FILE (a 0600 file) or VMDR_PASSWORD",
    ) -> None:
        self.env = env
        self.file = file
        self.fallback = fallback
        self.prompt = prompt
        self.sources = sources
        self._value: str | None = None

    def configured(self) -> bool:
        """Whether a passphrase is set without asking anyone (environment or file)."""
        return bool(self.env and self.env in os.environ) or bool(self.file)

    def __call__(self) -> str:
        if self._value is None:
            self._value = self._lookup()
        return self._value

    def _lookup(self) -> str:
        if self.env and self.env in os.environ:
            return os.environ[self.env]
        if self.file:
            return read_secret(self.file)
        if self.fallback is not None:
            return self.fallback()
        if self.prompt is not None and sys.stdin.isatty():
            return getpass.getpass(self.prompt)
        how = ", or run in a terminal" if self.prompt is not None else ""
        raise WrongPassword(f"no passphrase: set {self.sources}{how}")

    def for_new_repository(self, prompt: str = "New repository passphrase: ") -> str:
        """The passphrase of a repository being created: the configured one whenever one
        is set; otherwise asked twice on the terminal."""
        if self.configured() or self.fallback is not None or not sys.stdin.isatty():
            return self()
        self._value = prompt_new_passphrase(prompt)
        return self._value


def prompt_new_passphrase(prompt: str = "New passphrase: ") -> str:
    """Ask for a new passphrase twice on the terminal (for ``key add``/``key passwd``)."""
    if not sys.stdin.isatty():
        raise UsageError("no terminal to ask for the new passphrase: give "
                         "--new-password-file FILE")
    pw = getpass.getpass(prompt)
    if pw != getpass.getpass("Repeat: "):
        raise UsageError("the passphrases do not match")
    if not pw:
        raise UsageError("an empty passphrase is not allowed")
    return pw


@dataclass(frozen=True)
class OpenOptions:
    """How to reach and unlock one repository (typed; never an argparse Namespace)."""

    url: str
    passphrase: Callable[[], str] | None = None
    key_file: str | None = None          # path of an exported key file (0600)
    key_data: bytes | None = None        # or its contents, already read
    append_only: bool = False
    bandwidth: TokenBucket | None = None  # shared by every repository given the same bucket
    connections: int = 8
    use_cache: bool = True


def open_backend_stack(
    opts: OpenOptions, object_lock: Callable[[Backend], Backend] = with_object_lock,
) -> Backend:
    """The storage stack of the module docstring over the backend of ``opts.url``.

    *object_lock* wraps the raw backend; ``repo init --object-lock-days`` passes one that
    prepares the bucket for a new repository instead of reading the existing config.
    """
    raw: Backend = open_backend(opts.url)
    try:
        inner = object_lock(raw)
        if opts.bandwidth is not None and not isinstance(raw, FileBackend):
            inner = ThrottlingBackend(inner, opts.bandwidth)
        backend = wrap(inner, opts.connections)
        return AppendOnlyBackend(backend) if opts.append_only else backend
    except BaseException:
        raw.close()
        raise


def open_repository(
    opts: OpenOptions, lock: LockMode, command: str = "", wait: float = 0.0,
) -> Repository:
    """Open the repository at ``opts.url`` through the standard stack and take *lock*
    (held until the repository is closed)."""
    backend = open_backend_stack(opts)
    try:
        key = opts.key_data
        if key is None and opts.key_file:
            key = read_secret_bytes(opts.key_file)
        repo = Repository.open(backend, passphrase=opts.passphrase, keyfile=key,
                               use_cache=opts.use_cache)
    except BaseException:
        backend.close()
        raise
    if lock is not None:
        try:
            held = repo.lock(exclusive=(lock == "exclusive"), command=command, wait=wait)
        except NoSpace as exc:
            if lock != "shared":
                repo.close()
                raise
            # A repository full to the last byte must still restore. Without room for a
            # lock nothing can take the exclusive one either, so no prune runs meanwhile;
            # a write this command attempts fails with NoSpace as it would have anyway.
            log.warning("%s: working without a repository lock", exc.message)
            return repo
        except BaseException:
            repo.close()
            raise
        repo.release_on_close(held.release)
    return repo
