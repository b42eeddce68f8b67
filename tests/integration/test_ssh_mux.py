"""The DR host's persistent ssh control master against a real OpenSSH server on loopback:
reused by the next process, a dead one replaced, libvirt's ssh carried over it, forwards
cancelled when a cycle ends, and stopped by stop_masters (the agent's exit)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.servers import HOST, SSHServer
from vmdr.hypervisor import ssh_mux
from vmdr.hypervisor.remote import RemoteHost, SshTarget


@pytest.fixture
def mux(sshd_server: SSHServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[SshTarget, str]]:
    target = SshTarget(host=HOST, user="root", port=sshd_server.port,
                       keyfile=str(sshd_server.client_key),
                       known_hosts=str(sshd_server.known_hosts))
    d = ssh_mux.mux_dir(str(tmp_path_factory.mktemp("mux")))
    assert d is not None
    try:
        yield target, d
    finally:  # nothing left behind, also when the test failed
        m = ssh_mux.SharedMaster(target, d, 60)
        pid = _master_pid(target, m.control)
        m.stop("exit")
        if pid:
            _gone(pid)


def _master_pid(target: SshTarget, control: str) -> int | None:
    argv = target.argv(control=control)
    argv[-2:-2] = ["-O", "check"]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    m = re.search(r"pid=(\d+)", p.stderr)
    return int(m.group(1)) if m else None


def _gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # our child? reap it
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    return False


def _cycle(target: SshTarget, d: str) -> tuple[ssh_mux.SharedMaster, str]:
    """What a replica cycle does with the DR host's master: open, one command, close."""
    m = ssh_mux.SharedMaster(target, d, 60)
    h = RemoteHost(target, shared=m).open()
    try:
        out = h.run('echo "$SSH_CONNECTION"').stdout.decode().strip()
    finally:
        h.close()
    return m, out


def test_master_is_reused_replaced_and_stopped(mux: tuple[SshTarget, str]) -> None:
    target, d = mux
    m1, conn1 = _cycle(target, d)
    assert not m1.reused and ssh_mux.listening(m1.control)  # it outlives the cycle
    assert os.stat(m1.control).st_mode & 0o077 == 0
    pid1 = _master_pid(target, m1.control)
    assert pid1

    m2, conn2 = _cycle(target, d)
    assert m2.reused and _master_pid(target, m2.control) == pid1
    assert conn2 == conn1  # the same TCP connection: no second login

    # the master dies (kill -9: its socket file stays): the next cycle starts another
    os.kill(pid1, signal.SIGKILL)
    assert _gone(pid1)
    assert os.path.exists(m1.control)
    m3, conn3 = _cycle(target, d)
    pid3 = _master_pid(target, m3.control)
    assert not m3.reused and pid3 and pid3 != pid1 and conn3 != conn1

    # a reused master whose commands fail is replaced on demand
    m4 = ssh_mux.SharedMaster(target, d, 60).start()
    m4.wait()
    assert m4.reused
    m4.replace()
    pid4 = _master_pid(target, m4.control)
    assert pid4 and pid4 != pid3 and _gone(pid3)

    # the agent's exit: every master of this namespace stops, none is left running
    assert ssh_mux.stop_masters(d) == 1
    assert _gone(pid4) and not os.path.exists(m4.control)


def test_libvirts_ssh_goes_over_the_master(mux: tuple[SshTarget, str]) -> None:
    """The wrapper given to libvirt (``command=``) reaches the DR host without a key of
    its own: only the master can have carried it."""
    target, d = mux
    m, conn = _cycle(target, d)
    w = m.wrapper()
    p = subprocess.run([w, "-T", "-p", str(target.port), "-l", "root", "-o", "BatchMode=yes",
                        "-o", "IdentityFile=/nonexistent", "-o", "IdentitiesOnly=yes",
                        "-o", "UserKnownHostsFile=/dev/null", "--", HOST,
                        'echo "$SSH_CONNECTION"'],
                       capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == conn


def test_forwards_end_with_the_cycle(mux: tuple[SshTarget, str], tmp_path: Path) -> None:
    """A forward made over the shared master is cancelled when the cycle closes: the next
    cycle's master does not keep serving the last one's sockets."""
    target, d = mux
    remote = str(tmp_path / "remote.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(remote)
    srv.listen(4)
    try:
        m = ssh_mux.SharedMaster(target, d, 60)
        h = RemoteHost(target, shared=m).open()
        local = h.forward("w1.sock", remote)
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(30)
        c.connect(local)
        srv.settimeout(30)
        conn, _ = srv.accept()
        c.sendall(b"hi")
        assert conn.recv(2) == b"hi"
        conn.close()
        c.close()
        h.close()
        assert not os.path.exists(local)
        argv = target.argv(control=m.control)
        argv[-2:-2] = ["-O", "cancel", "-L", f"{local}:{remote}"]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        assert "not forwarded" in p.stderr  # nothing left to cancel: the close did it
    finally:
        srv.close()


def test_libvirt_over_a_forward_of_the_dr_hosts_socket(
        mux: tuple[SshTarget, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The first cycle's *begin* finds the DR host's libvirt socket; the next cycles
    connect libvirt through a forward of it over the reused master (no remote shell)."""
    from vmdr.hypervisor import connect
    from vmdr.jobs.replicate_site import Site

    if not os.path.exists("/run/libvirt/libvirt-sock"):
        pytest.skip("no system libvirtd here")
    target, d = mux
    monkeypatch.setattr(ssh_mux, "_default_dir", lambda: d)
    uri = (f"qemu+ssh://root@{HOST}:{target.port}/system?keyfile={target.keyfile}"
           f"&known_hosts={target.known_hosts}")
    work = Path(d).parent / "dr"
    first = Site(uri, shared=True).start()
    try:
        assert first.libvirt_forward() is None  # nothing known yet (and a fresh master)
        first.open()
        first.begin(str(work), ["replica.json"])
    finally:
        first.close()
    nxt = Site(uri, shared=True).start()
    try:
        nxt.open()
        assert nxt.reused
        local = nxt.libvirt_forward()
        assert local is not None and local.startswith(str(nxt._host.dir if nxt._host else ""))
        hv = connect(f"qemu+unix:///system?socket={local}")
        try:
            direct = connect("qemu:///system")
            try:  # the same daemon (its domains change under other tests: not those)
                for ask in ("getHostname", "getLibVersion", "getType"):
                    assert getattr(hv._conn, ask)() == getattr(direct._conn, ask)()  # type: ignore[attr-defined]
                hv.list_domains()
            finally:
                direct.close()
        finally:
            hv.close()
    finally:
        nxt.close()
    assert not os.path.exists(local)  # the forward ended with the cycle
    # a URI asking for something else than the plain system instance keeps the wrapper
    other = Site(uri.replace("/system?", "/session?"), shared=True).start()
    try:
        other.open()
        assert other.libvirt_forward() is None
    finally:
        other.close()
