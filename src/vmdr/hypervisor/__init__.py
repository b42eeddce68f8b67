"""Everything vmdr needs from a hypervisor host, behind one driver interface.

This layer knows nothing about chunks or repositories; ``vmdr.jobs`` orchestrates it.
:mod:`.driver` is the interface (``Hypervisor`` and the handles it hands out: ``Domain``,
``BlockCopyJob``, ``Console``, ``Sandbox``); :func:`connect` gives the libvirt driver and
:mod:`.fake` an in-memory one. Nothing outside this package imports ``libvirt`` or sees a
libvirt object: every ``libvirt.libvirtError`` leaves as a :mod:`vmdr.errors` exception,
matched on its ``VIR_ERR_*`` name (``DomainNotFound``, ``NetworkNotFound``,
``HypervisorUnavailable``, ``HypervisorUnsupported``, ``CheckpointMissing``,
``HypervisorError``...).

Backup::

    hv = connect("qemu:///system")      # or qemu+ssh://root@host:22/system?keyfile=/k
    hv.cleanup_leftovers(name, prefix, scratch_dir)      # under the VM lock, every time
    info = hv.domain(name)                               # DomainInfo (DomainNotFound)
    with hv.backup(info, checkpoint_prefix="vmdr-1a2b3c4d", scratch_dir=scratch,
                   disks=None, incremental_from=last_checkpoint, quiesce=True) as s:
        s.method          # "checkpoint" (pull-mode job) | "overlay" | "offline" (stopped VM)
        s.consistency     # "quiesced" | "crash"
        s.checkpoint      # checkpoint this backup creates, or None
        s.checkpoint_xml  # its full XML: save it with the snapshot (see redefine_checkpoint)
        s.warnings, s.skipped
        for d in s.disks:                     # DiskSource
            d.info, d.incremental, d.size, d.full_reason
            for off, length, is_data in d.extents():
                ...   # full: is_data=False reads as zeros; incremental: is_data=False unchanged
                d.read(off, length)           # thread-safe; one NBD connection per thread
        s.commit()        # only once the snapshot is safely stored
    # leaving without commit: job aborted, new checkpoint deleted, scratch removed, VM thawed

Method "auto" picks "checkpoint" for a running domain (raw/block disks are exported as
full in the same job, so all disks share one point in time) and "offline" for a stopped
one; it falls back to "overlay" when libvirt lacks pull-mode backup. "overlay" can be
forced. Incrementals are only used for disks whose bitmap libvirt confirms (see
:mod:`.checkpoints`); any doubt gives that disk ``incremental=False`` and a
``full_reason``. Offline reads lock the images like QEMU does (the VM cannot start
meanwhile) and ``commit()`` refuses if the domain was started anyway.

Each session keeps its NBD socket, scratch files, overlays and a ``state.json`` in
``<scratch_dir>/<12 hex of the domain UUID>/`` on the hypervisor host;
``cleanup_leftovers`` reads that state after a crash. Call it (and ``backup``) under the
VM lock. ``cleanup_leftovers`` also aborts a job left by a dead run for *another*
repository (a sibling directory of ``scratch_dir``); jobs of other tools are refused.

Remote hosts (``qemu+ssh://``, ``+libssh``, ``+libssh2``): the same calls work. vmdr logs
in with OpenSSH using the URI's user, host, port, ``keyfile``, ``known_hosts`` and
``no_verify`` (:mod:`.remote`); the work directory and state file are made, read and
removed there over ssh, the NBD socket is forwarded to a private 0700 directory here
(``ssh -O forward -L``), a stopped VM's images are served by a remote read-only
``qemu-nbd``, NVRAM/TPM state is read with ``cat``/``tar``. A remote session holds a lease
(``flock`` over its ssh connection) that tells any machine's cleanup whether it is still
alive (:mod:`.hostfiles`). Method "overlay" is refused over ssh. Other remote transports
(tcp, tls) raise UsageError for backups: an NBD export over TCP would need TLS and a PKI.

After a full backup, this prefix's bitmaps whose libvirt checkpoint was lost are removed
(:mod:`.bitmaps`; running domains via QMP, stopped ones with ``qemu-img bitmap``).

Modules: driver (the interface and its handles), connection (connect, LibvirtHypervisor),
handles (the libvirt handles), fake (FakeFleet, FakeHypervisor), domain (DomainInfo,
DiskInfo), backup (BackupSession), session (DiskSource, BackupOptions, job XML),
checkpoints, bitmaps, nbd (readers), overlay, agent, cleanup, state, hostfiles (local/ssh
file access), remote (URI parsing, ssh master and forwarding), mirror and console (domain
XML for block copy and console logs), xml (rewrite_domain_xml), errors (libvirtError
translation), _compat (the lazily imported bindings; private).

Restore::

    xml = rewrite_domain_xml(saved_xml, new_name="web-restored",
                             disk_paths={"vda": ("/var/lib/libvirt/images/web.qcow2", "qcow2")})
    name = hv.define(xml); hv.start(name)
    seconds = hv.wait_heartbeat(name, agent=True, timeout=300)

Instant recovery and boot verification::

    dom = hv.lookup(name)                                # Domain (DomainNotFound)
    job = dom.block_copy("vda", "/images/web-vda.qcow2", bandwidth=None)
    while not job.status().ready: ...
    job.pivot()                                          # False: not in sync yet
    with hv.start_sandbox(xml, network="isolated") as sb:   # transient, auto-destroyed
        sb.domain.wait_heartbeat(agent=True, timeout=60)
        png = sb.domain.console().screenshot()
"""

from __future__ import annotations

from .backup import BackupSession, DiskSource, Method
from .checkpoints import checkpoint_name, is_ours
from .connection import DEFAULT_URI, LibvirtHypervisor, cleanup_leftovers, connect
from .domain import DiskInfo, DomainInfo, parse_disks
from .driver import (
    BackupJob,
    BlockCopyJob,
    Console,
    CopyStatus,
    Domain,
    Hypervisor,
    NetworkInfo,
    Sandbox,
    Screenshot,
)
from .nbd import Extent
from .remote import SshTarget, is_local_uri, parse_ssh_uri
from .xml import (
    domain_name,
    domain_uuid,
    interface_networks,
    map_networks,
    parse_xml,
    random_mac,
    rewrite_domain_xml,
    set_uuid,
)

__all__ = [
    "DEFAULT_URI",
    "BackupJob",
    "BackupSession",
    "BlockCopyJob",
    "Console",
    "CopyStatus",
    "DiskInfo",
    "DiskSource",
    "Domain",
    "DomainInfo",
    "Extent",
    "Hypervisor",
    "LibvirtHypervisor",
    "Method",
    "NetworkInfo",
    "Sandbox",
    "Screenshot",
    "SshTarget",
    "checkpoint_name",
    "cleanup_leftovers",
    "connect",
    "domain_name",
    "domain_uuid",
    "interface_networks",
    "is_local_uri",
    "is_ours",
    "map_networks",
    "parse_disks",
    "parse_ssh_uri",
    "parse_xml",
    "random_mac",
    "rewrite_domain_xml",
    "set_uuid",
]
