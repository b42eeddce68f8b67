"""The route guard refuses test addresses the root namespace would send via the uplink.

No root needed and nothing is sent: ``ip route get`` only asks the kernel.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.multihost.netguard import UnsafeTestRoute, require_test_route, route_dev

pytestmark = pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 missing")

ADDR = "10.77.250.1"  # a test address with no harness leg for it


def _uplink() -> str | None:
    out = subprocess.run(["ip", "-j", "route", "show", "default"], capture_output=True,
                         text=True, check=False).stdout
    routes = json.loads(out or "[]")
    return str(routes[0]["dev"]) if routes else None


def test_refuses_address_routed_via_uplink() -> None:
    if route_dev(ADDR) not in (None, _uplink()):
        pytest.skip(f"this machine routes {ADDR} via {route_dev(ADDR)}")
    # the kernel would use the real uplink (or nothing): refused, whatever leg is claimed
    with pytest.raises(UnsafeTestRoute, match="not via the test bridge leg vmdrmh1"):
        require_test_route(ADDR, "vmdrmh1")
    if _uplink() is not None:
        with pytest.raises(UnsafeTestRoute, match=f"via {_uplink()}"):
            require_test_route(ADDR, "vmdrmh1", "10.77.250.0/24")


def test_refuses_uplink_even_when_named_as_leg_outside_subnet() -> None:
    uplink = _uplink()
    if uplink is None:
        pytest.skip("no default route")
    with pytest.raises(UnsafeTestRoute, match="not in the test subnet"):
        require_test_route("192.0.2.77", uplink, "10.77.250.0/24")


def test_refuses_without_leg() -> None:
    with pytest.raises(UnsafeTestRoute, match="no leg on the test bridge"):
        require_test_route(ADDR, None)


def test_refuses_names() -> None:
    with pytest.raises(ValueError):
        route_dev("example.org")
