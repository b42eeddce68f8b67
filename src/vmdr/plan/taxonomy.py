"""The disaster taxonomy as data: each level, its blast radius and the seed's recovery method.

A level's *scope* says how its blast radius is found on the inventory:

* ``vm``      — only the VM itself (its live disks); every repository copy survives.
* ``host``    — the VM's host; repositories stored on that host are lost with it.
* ``fabric``  — the storage/network fabrics (SAN, LAN) the VM's host is attached to;
  repositories reached through one of those fabrics are lost.
* a location kind (``rack`` … ``continent``) — the VM host's ancestor of that kind;
  everything located inside it is lost.
"""

from __future__ import annotations

from dataclasses import dataclass

# Location kinds from the smallest to the largest (the hierarchy of the inventory).
KINDS: tuple[str, ...] = (
    "rack", "datacenter", "building", "campus", "city", "region", "country", "continent",
)
KIND_RANK = {k: i for i, k in enumerate(KINDS)}


@dataclass(frozen=True)
class Level:
    key: str
    title: str
    scope: str  # "vm" | "host" | "fabric" | a location kind
    example: str
    recovery: str  # the recommendation (the seed's recovery method for this level)
    activation: str  # when to declare a disaster at this level


LEVELS: tuple[Level, ...] = (
    Level("application", "Application failure", "vm",
          "an application crashes or hangs (bug, DoS)",
          "Restart it with a watchdog; run several VMs behind a load balancer. Restore the "
          "VM from its newest copy only when the application's data is damaged.",
          "The application stays down after its watchdog restarted it, or its data is "
          "damaged."),
    Level("vm", "VM failure", "vm",
          "a guest OS bug, a bad patch, a full disk",
          "Reboot through a watchdog and investigate; keep a standby VM, or restore the VM "
          "from its newest copy on the same or another host.",
          "The VM does not boot or its disks are damaged; a reboot does not help."),
    Level("host", "Host failure", "host",
          "hardware fault, firmware upgrade, power cut to one server",
          "Run N+1 hosts; restart the host's VMs on the surviving hosts from copies that "
          "are not on the failed host.",
          "A libvirt host is down or cannot be repaired within the VMs' RTO."),
    Level("communication", "SAN/network failure", "fabric",
          "a Fibre Channel or Ethernet switch, card or cable fails",
          "Use redundant paths and switches; keep copies of the most important VMs on "
          "local disk (off the SAN) so they can boot without it.",
          "A storage or network fabric is down and no redundant path carries the load."),
    Level("rack", "Rack disaster", "rack",
          "a rack topples, or its power or cooling fails",
          "Spread hosts and switches over racks; restore the rack's VMs on hosts in other "
          "racks from copies outside the rack.",
          "A whole rack is without power, cooling or network, or physically damaged."),
    Level("datacenter", "Datacenter disaster", "datacenter",
          "cooling or power failure, fire, flood, a sprinkler",
          "Keep a hot site in another datacenter (same building or campus) and copies "
          "outside the datacenter, including tapes in a vault.",
          "A datacenter room is unusable: power, cooling, fire, water."),
    Level("building", "Building disaster", "building",
          "loss of power or access, massive physical damage",
          "Use a hot site and offsite copies (remote repository, tapes) in another building.",
          "The building is inaccessible or without power for longer than the RTOs."),
    Level("campus", "Campus disaster", "campus",
          "a tornado, an explosion, a campus-wide outage",
          "Like a building disaster, with the hot site and the copies off the campus.",
          "The whole campus is unusable."),
    Level("city", "Citywide disaster", "city",
          "earthquake, hurricane, a city-wide blackout",
          "Keep the hot site and the copies outside the city.",
          "The city's infrastructure (power, network, access) is down."),
    Level("region", "Regional disaster", "region",
          "a regional blackout, a hurricane along a coastline",
          "Keep the hot site and the copies outside the region.",
          "A regional outage makes every site in the region unusable."),
    Level("country", "National disaster", "country",
          "a national outage or emergency",
          "Keep the hot site and the copies in another country (far away if it is small).",
          "Sites throughout the country are unusable or unreachable."),
    Level("multinational", "Multinational disaster", "continent",
          "a tsunami, an earthquake or an attack across borders",
          "As for a national disaster: copies and a hot site on another continent.",
          "Several countries of a continent are affected."),
)
BY_KEY = {lv.key: lv for lv in LEVELS}
LEVEL_KEYS: tuple[str, ...] = tuple(lv.key for lv in LEVELS)


def level(key: str) -> Level:
    return BY_KEY[key]
