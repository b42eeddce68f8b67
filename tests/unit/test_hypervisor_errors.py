"""libvirtError -> vmdr exception translation, matched on VIR_ERR_* names."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.unit import fakelibvirt as fl
from vmdr.errors import (
    CheckpointMissing,
    DomainNotFound,
    GuestAgentUnavailable,
    HypervisorError,
    HypervisorUnavailable,
    NoSpace,
)
from vmdr.hypervisor.errors import is_code, libvirt_errors, translate


@pytest.fixture(autouse=True)
def fake() -> Iterator[Any]:
    yield fl.install()
    fl.uninstall()


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (fl.VIR_ERR_NO_DOMAIN, DomainNotFound),
        (fl.VIR_ERR_NO_DOMAIN_CHECKPOINT, CheckpointMissing),
        (fl.VIR_ERR_CHECKPOINT_INCONSISTENT, CheckpointMissing),
        (fl.VIR_ERR_AGENT_UNRESPONSIVE, GuestAgentUnavailable),
        (fl.VIR_ERR_NO_CONNECT, HypervisorUnavailable),
        (fl.VIR_ERR_RPC, HypervisorUnavailable),
        (fl.VIR_ERR_AUTH_FAILED, HypervisorUnavailable),
        (fl.VIR_ERR_INTERNAL_ERROR, HypervisorError),
    ],
)
def test_translate(code: int, cls: type[HypervisorError]) -> None:
    err = translate(fl.libvirtError("boom", code), "doing it")
    assert type(err) is cls
    assert err.message == "doing it: boom"
    assert err.exit_code == cls.exit_code


def test_opening_means_unavailable() -> None:
    err = translate(fl.libvirtError("x", fl.VIR_ERR_INTERNAL_ERROR), opening=True)
    assert isinstance(err, HypervisorUnavailable)


def test_enospc_is_nospace() -> None:
    err = translate(fl.libvirtError("write failed: No space left on device"))
    assert isinstance(err, NoSpace)


def test_context_manager_chains_cause() -> None:
    with pytest.raises(DomainNotFound) as ei, libvirt_errors("lookup"):
        raise fl.libvirtError("gone", fl.VIR_ERR_NO_DOMAIN)
    assert isinstance(ei.value.__cause__, fl.libvirtError)
    assert is_code(ei.value.__cause__, "VIR_ERR_NO_DOMAIN")
    assert not is_code(ValueError(), "VIR_ERR_NO_DOMAIN")


def test_other_exceptions_pass_through() -> None:
    with pytest.raises(KeyError), libvirt_errors("x"):
        raise KeyError("k")

