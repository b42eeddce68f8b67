"""Translate ``libvirt.libvirtError`` into the vmdr exception tree at the boundary.

Matching is on ``VIR_ERR_*`` names (looked up on the loaded module), never raw numbers.
A code not in the table is a plain ``HypervisorError`` (exit 10), never a traceback.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

from vmdr.errors import (
    CheckpointMissing,
    DomainNotFound,
    GuestAgentUnavailable,
    HypervisorError,
    HypervisorUnavailable,
    HypervisorUnsupported,
    NetworkNotFound,
    NoSpace,
    VmdrError,
)

from ._compat import lv

_BY_NAME: dict[str, type[HypervisorError]] = {
    "VIR_ERR_NO_DOMAIN": DomainNotFound,
    "VIR_ERR_NO_NETWORK": NetworkNotFound,
    "VIR_ERR_NO_SUPPORT": HypervisorUnsupported,
    "VIR_ERR_OPERATION_UNSUPPORTED": HypervisorUnsupported,
    "VIR_ERR_ARGUMENT_UNSUPPORTED": HypervisorUnsupported,
    "VIR_ERR_NO_DOMAIN_CHECKPOINT": CheckpointMissing,
    "VIR_ERR_CHECKPOINT_INCONSISTENT": CheckpointMissing,
    "VIR_ERR_AGENT_UNRESPONSIVE": GuestAgentUnavailable,
    "VIR_ERR_AGENT_UNSYNCED": GuestAgentUnavailable,
    "VIR_ERR_AGENT_COMMAND_TIMEOUT": GuestAgentUnavailable,
    "VIR_ERR_NO_CONNECT": HypervisorUnavailable,
    "VIR_ERR_AUTH_FAILED": HypervisorUnavailable,
    "VIR_ERR_AUTH_CANCELLED": HypervisorUnavailable,
    "VIR_ERR_AUTH_UNAVAILABLE": HypervisorUnavailable,
    "VIR_ERR_RPC": HypervisorUnavailable,
}


def is_code(exc: BaseException, *names: str) -> bool:
    """True if ``exc`` is a libvirtError whose code is one of the ``VIR_ERR_*`` names."""
    get = getattr(exc, "get_error_code", None)
    if get is None:
        return False
    code = get()
    return any(getattr(lv(), n, object()) == code for n in names)


def translate(exc: BaseException, context: str = "", *, opening: bool = False) -> VmdrError:
    """The vmdr exception for a libvirtError (``opening``: errors mean unavailable)."""
    msg = str(exc).strip() or exc.__class__.__name__
    text = f"{context}: {msg}" if context else msg
    if opening:
        return HypervisorUnavailable(text)
    get_int1 = getattr(exc, "get_int1", None)
    if "No space left on device" in msg or (get_int1 is not None and get_int1() == errno.ENOSPC):
        return NoSpace(text)
    for name, cls in _BY_NAME.items():
        if is_code(exc, name):
            return cls(text)
    return HypervisorError(text)


@contextmanager
def libvirt_errors(context: str = "", *, opening: bool = False) -> Iterator[None]:
    """Re-raise any libvirtError inside the block as a vmdr error."""
    try:
        yield
    except lv().libvirtError as exc:
        raise translate(exc, context, opening=opening) from exc
