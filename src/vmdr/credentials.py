"""Credential files: read only when private (0600 or stricter), written 0600."""

from __future__ import annotations

import errno
import os
import stat

from vmdr.errors import ConfigError, NoSpace, UsageError


def check_private(path: str) -> None:
    """Refuse a credential file that group or others may read or write."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: credential file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read credential file: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{path}: credential file is accessible by group/others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
        )


def read_secret(path: str) -> str:
    """Return the first line of a private credential file."""
    line = read_secret_bytes(path).split(b"\n", 1)[0]
    try:
        return line.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: credential file is not UTF-8 text") from None


def read_secret_bytes(path: str) -> bytes:
    check_private(path)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read credential file: {exc.strerror}") from None


def write_private(path: str, data: bytes, overwrite: bool = False) -> None:
    """Write *data* to a new 0600 file (refusing to replace one unless *overwrite*)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise UsageError(f"{path} exists; refusing to overwrite it") from None
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        os.unlink(path)  # never a truncated key file
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(f"no space left on device writing {path}") from None
        raise UsageError(f"{path}: {exc.strerror}") from None
