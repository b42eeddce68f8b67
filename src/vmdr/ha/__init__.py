"""High availability: decisions as pure functions of (inventory, cluster state, now).

* :mod:`~vmdr.ha.settings` — the ``[ha]`` table, its defaults and the fencing timing
  argument;
* :mod:`~vmdr.ha.model` — the HA policy from the one inventory, and the cluster state;
* :mod:`~vmdr.ha.placement` — where restarted VMs go (capacity, anti-affinity, affinity);
* :mod:`~vmdr.ha.boot` — restart order: priority groups, dependencies, readiness;
* :mod:`~vmdr.ha.admission` — N+k admission control;
* :mod:`~vmdr.ha.failover` — a host failure decided, and the fencing timeline;
* :mod:`~vmdr.ha.wdsettings`, :mod:`~vmdr.ha.watchdog`, :mod:`~vmdr.ha.appcheck`,
  :mod:`~vmdr.ha.monitor` — the application and VM watchdogs of one host: settings,
  decisions, checks, and the loop the agent hosts (it reaches the host only through the
  structural types of :mod:`~vmdr.ha.ports`, which the hypervisor driver satisfies).
* :mod:`~vmdr.ha.records`, :mod:`~vmdr.ha.fleet`, :mod:`~vmdr.ha.maintenance`,
  :mod:`~vmdr.ha.hatest`, :mod:`~vmdr.ha.escalate`, :mod:`~vmdr.ha.planfacts` — the
  operator's side: the HA keys in etcd and the live fleet, host maintenance by live
  migration, the non-disruptive failover test, the watchdog's restart on another host,
  and the HA facts of the DR plan (also through structural types: a ``connect(host)``
  and a key-value client are handed in).

This package sits at the level of ``plan``: it reads the inventory and knows nothing of
libvirt, etcd or repositories. The agent executes its decisions.
"""
