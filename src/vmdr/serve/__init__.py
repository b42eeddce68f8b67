"""Serving snapshots: read-only NBD exports straight from the repository, and boot sandboxes.

::

    with start_server(repo, snap, socket_owner="libvirt-qemu") as srv:
        srv.exports["vda"]   # "nbd+unix:///vda?socket=/run/vmdr/serve-x1y2/vda.sock"
        srv.sockets["vda"]   # "/run/vmdr/serve-x1y2/vda.sock"
    # stopped: nbdkit processes gone, sockets and private files removed

Design
------
**Server: nbdkit with a Python plugin** (:mod:`.plugin`), one nbdkit process per disk.
nbdkit gives us a complete, well-tested NBD server — fixed newstyle negotiation,
structured replies, ``base:allocation`` block status, multi-conn, many worker threads —
and we only write the data path (~100 lines). Writing our own server would mean owning
the protocol; the Python NBD *server* libraries that exist are unmaintained toys.
nbdkit embeds the system Python 3.11, the same interpreter the venv is built on, so the
plugin imports vmdr and its cp311 wheels from the caller's ``sys.path``.

**Data path** (:mod:`.export`): each nbdkit process reopens the repository without
the local cache and decodes chunks on demand into a shared LRU of futures (24 chunks,
96 MiB at 4 MiB chunks); reads that continue a stream start read-ahead of the next 6
chunks on 4 threads (decryption and zstd release the GIL). Hole chunks are never
fetched and are reported as holes (``NBD_STATE_HOLE|ZERO``) through block status.
The plugin is read-only and advertises multi-conn.

**Secrets.** The repository location (it may hold an SFTP password) and the exported
key file go into a JSON file, mode 0600, in a private 0700 directory (/run/vmdr when
root); nbdkit gets only ``setup=<path>``, and the plugin reads and unlinks it before
serving. Nothing secret appears in argv, the environment or nbdkit's log. Storage
credentials taken from the environment (S3 keys, ``VMDR_SFTP_*``) are inherited.

**Lifetime.** nbdkit runs with ``--exit-with-parent`` (``PR_SET_PDEATHSIG``, which
follows the *thread* that forked it, so a keeper thread forks and waits for it): if
vmdr dies — even ``kill -9`` — its servers die too. ``detach=True`` leaves them
running in their own session (stop them with :meth:`NbdServer.stop` or ``kill``).

**Access.** Unix sockets (default) are 0600 root, or 0660 owned by ``socket_owner``
(``libvirt-qemu`` for QEMU). TCP (``port``) has no TLS or authentication and listens on
127.0.0.1 unless told otherwise. Callers that serve for long should hold a shared
repository lock so that prune cannot delete chunks being served.

Boot verification builds on this in :mod:`.sandbox` (transient domain over qcow2
overlays backed by these exports), :mod:`.checks` and :mod:`.png`.
"""

from __future__ import annotations

from vmdr.errors import ServeError

from .server import NbdServer, repo_url, start_server

__all__ = ["NbdServer", "ServeError", "repo_url", "start_server"]
