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
    HypervisorUnsupported,
    NetworkNotFound,
    NoSpace,
)
from vmdr.hypervisor import connect
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
        (fl.VIR_ERR_NO_NETWORK, NetworkNotFound),
        (fl.VIR_ERR_NO_SUPPORT, HypervisorUnsupported),
        (fl.VIR_ERR_OPERATION_UNSUPPORTED, HypervisorUnsupported),
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



# -- every handle call translates: nothing raw leaves the libvirt driver -------------------
HANDLE_CALLS: list[tuple[str, str, Any]] = [
    ("isActive", "is_active", lambda d: d.is_active()),
    ("isPersistent", "is_persistent", lambda d: d.is_persistent()),
    ("XMLDesc", "xml", lambda d: d.xml(inactive=True, secure=True)),
    ("state", "state", lambda d: d.state()),
    ("state", "paused_on_io_error", lambda d: d.paused_on_io_error()),
    ("create", "start", lambda d: d.start()),
    ("destroy", "destroy", lambda d: d.destroy()),
    ("undefineFlags", "undefine", lambda d: d.undefine()),
    ("suspend", "suspend", lambda d: d.suspend()),
    ("resume", "resume", lambda d: d.resume()),
    ("blockCopy", "block_copy", lambda d: d.block_copy("vda", "/x.qcow2")),
    ("blockJobInfo", "block_job.status", lambda d: d.block_job("vda").status()),
    ("blockJobAbort", "block_job.pivot", lambda d: d.block_job("vda").pivot()),
    ("screenshot", "console.screenshot", lambda d: d.console().screenshot()),
    ("info", "info", lambda d: d.info()),
]
CODES = [(fl.VIR_ERR_INTERNAL_ERROR, HypervisorError), (fl.VIR_ERR_NO_DOMAIN, DomainNotFound),
         (fl.VIR_ERR_OPERATION_UNSUPPORTED, HypervisorUnsupported),
         (fl.VIR_ERR_RPC, HypervisorUnavailable)]


@pytest.mark.parametrize(("method", "_op", "call"), HANDLE_CALLS, ids=[c[1] for c in HANDLE_CALLS])
@pytest.mark.parametrize(("code", "cls"), CODES, ids=["internal", "no-domain", "unsupported",
                                                      "rpc"])
def test_domain_handle_translates(method: str, _op: str, call: Any, code: int,
                                  cls: type[HypervisorError]) -> None:
    dom = fl.add_domain(fl.domain_xml("vm", fl.disk_xml("vda", "/d/vda.qcow2")))
    if method == "resume":
        dom.paused = fl.VIR_DOMAIN_PAUSED_USER  # so resume() reaches libvirt
    handle = connect().lookup("vm")
    dom.fail[method] = fl.libvirtError(f"{method} broke", code)
    if method == "destroy" and cls is DomainNotFound:
        call(handle)  # a domain that is gone is destroyed: no error
        return
    with pytest.raises(cls) as ei:
        call(handle)
    assert type(ei.value) is cls and f"{method} broke" in ei.value.message
    assert isinstance(ei.value.__cause__, fl.libvirtError)


@pytest.mark.parametrize(("method", "call"), [
    ("listAllDomains", lambda hv: hv.list_domains()),
    ("lookupByName", lambda hv: hv.lookup("vm")),
    ("defineXML", lambda hv: hv.define(fl.domain_xml("x", ""))),
    ("createXML", lambda hv: hv.create_transient(fl.domain_xml("x", ""))),
    ("networkLookupByName", lambda hv: hv.network("iso")),
    ("newStream", lambda hv: hv.lookup("vm").console().screenshot()),
])
def test_connection_calls_translate(method: str, call: Any) -> None:
    fl.add_domain(fl.domain_xml("vm", "")).screen = ("image/png", b"x")
    fl.add_network("iso")
    hv = connect()
    fl.host().fail[method] = fl.libvirtError(f"{method} broke", fl.VIR_ERR_INTERNAL_ERROR)
    with pytest.raises(HypervisorError, match=f"{method} broke"):
        call(hv)


def test_missing_network_and_unsupported_by_name() -> None:
    fl.host()
    with pytest.raises(NetworkNotFound, match="network iso"):
        connect().network("iso")
    err = translate(fl.libvirtError("nope", fl.VIR_ERR_ARGUMENT_UNSUPPORTED))
    assert type(err) is HypervisorUnsupported and err.exit_code == 10


def test_no_libvirt_object_in_the_public_surface() -> None:
    """Handles keep their virDomain private; the connection is not an attribute."""
    fl.add_domain(fl.domain_xml("vm", ""))
    hv = connect()
    assert not hasattr(hv, "conn")
    dom = hv.lookup("vm")
    public = {k: v for k, v in vars(dom).items() if not k.startswith("_")}
    assert not any(isinstance(v, fl.virDomain | fl.virConnect) for v in public.values())
