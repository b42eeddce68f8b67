"""The safety rule for test addresses, in code.

Test addresses (10.77.x.y) exist only on a bridge inside network namespaces the harness
creates. From the root namespace, a packet to such an address must never leave through
the real uplink (it once reached a machine that was not ours). So every helper that
talks to a test address *from the root namespace* first calls :func:`require_test_route`,
which asks the kernel (``ip route get``, which sends nothing) which interface it would
use, and refuses unless that is the harness's own veth leg on the test bridge.
Clients running inside a host namespace (``Host.run``) need no guard: those namespaces
have no route to anything but the bridge.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess

__all__ = ["UnsafeTestRoute", "require_test_route", "route_dev"]


class UnsafeTestRoute(RuntimeError):
    """A test address would be reached from the root namespace some other way than
    through the harness's leg on the test bridge."""


def route_dev(addr: str, *, netns: str | None = None) -> str | None:
    """The interface the kernel would send a packet to ``addr`` through, or None when
    there is no route. Asks ``ip -j route get``; no packet is sent."""
    ipaddress.ip_address(addr)  # a name would be resolved: refuse anything but an address
    cmd = ["ip", *(["-n", netns] if netns else []), "-j", "route", "get", addr]
    p = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=10)
    if p.returncode != 0:
        return None
    try:
        routes = json.loads(p.stdout)
    except ValueError:
        return None
    if not routes:
        return None
    dev = routes[0].get("dev")
    return str(dev) if dev else None


def require_test_route(addr: str, leg: str | None, subnet: str | None = None) -> None:
    """Raise :class:`UnsafeTestRoute` unless traffic from the root namespace to ``addr``
    would leave through ``leg`` (the root namespace's veth on the test bridge).

    ``leg`` None means the harness made no leg: every such address is refused.
    ``subnet`` (e.g. "10.77.23.0/24") additionally requires ``addr`` to be in it.
    """
    if subnet is not None and ipaddress.ip_address(addr) not in ipaddress.ip_network(subnet):
        raise UnsafeTestRoute(f"{addr} is not in the test subnet {subnet}: refusing")
    if leg is None:
        raise UnsafeTestRoute(
            f"refusing to contact test address {addr} from the root namespace: the harness "
            "has no leg on the test bridge (run the client inside a host namespace)"
        )
    dev = route_dev(addr)
    if dev != leg:
        raise UnsafeTestRoute(
            f"refusing to contact test address {addr} from the root namespace: the kernel "
            f"routes it via {dev or 'no interface'}, not via the test bridge leg {leg}"
        )
