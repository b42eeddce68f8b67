"""The DR host's persistent ssh control master (vmdr.hypervisor.ssh_mux): where it lives,
who shares it, how a dead one is noticed, and libvirt's connection over it. The real
master against a real sshd is tests/integration/test_ssh_mux.py."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path
from typing import Any, cast

import pytest

from vmdr.errors import HypervisorUnavailable
from vmdr.hypervisor import ssh_mux
from vmdr.hypervisor.remote import RemoteHost, SshTarget, parse_ssh_uri
from vmdr.jobs.replicate_site import Site

URI = "qemu+ssh://root@dr1:2222/system?keyfile=/k/id&known_hosts=/k/kh"


def test_persist_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ssh_mux.PERSIST_ENV, raising=False)
    assert ssh_mux.persist_seconds() == ssh_mux.DEFAULT_PERSIST
    for raw, want in (("0", 0), ("90", 90), ("-5", 0), ("soon", ssh_mux.DEFAULT_PERSIST)):
        monkeypatch.setenv(ssh_mux.PERSIST_ENV, raw)
        assert ssh_mux.persist_seconds() == want


def test_mux_dir_is_made_private_and_never_trusted_when_open(tmp_path: Path) -> None:
    d = tmp_path / "mux"
    assert ssh_mux.mux_dir(str(d)) == str(d)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    d.chmod(0o755)  # readable by others: a control socket is as good as a login
    assert ssh_mux.mux_dir(str(d)) is None
    d.chmod(0o700)
    link = tmp_path / "link"
    link.symlink_to(d)
    assert ssh_mux.mux_dir(str(link)) is None
    f = tmp_path / "file"
    f.write_text("")
    assert ssh_mux.mux_dir(str(f)) is None


def test_master_key_separates_logins() -> None:
    base = parse_ssh_uri(URI)
    k = ssh_mux.master_key(base)
    assert k == ssh_mux.master_key(parse_ssh_uri(URI))
    assert k.startswith(ssh_mux._ns_tag())
    for other in ("qemu+ssh://root@dr1:2222/system?keyfile=/k/other&known_hosts=/k/kh",
                  "qemu+ssh://root@dr1:2223/system?keyfile=/k/id&known_hosts=/k/kh",
                  "qemu+ssh://admin@dr1:2222/system?keyfile=/k/id&known_hosts=/k/kh",
                  "qemu+ssh://root@dr1:2222/system?keyfile=/k/id&no_verify=1"):
        assert ssh_mux.master_key(parse_ssh_uri(other)) != k, other


def test_listening_removes_a_dead_masters_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "m.sock")
    assert not ssh_mux.listening(path)  # none
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    assert ssh_mux.listening(path)
    srv.close()  # the master died: its socket file stays, nobody listens
    assert os.path.exists(path)
    assert not ssh_mux.listening(path)
    assert not os.path.exists(path)


def test_libvirt_uri_runs_ssh_through_the_wrapper() -> None:
    out = ssh_mux.libvirt_uri(URI + "&command=/opt/ssh", "/run/vmdr/ssh-mux/x.ssh")
    assert out.startswith("qemu+ssh://root@dr1:2222/system?")
    assert "command=/run/vmdr/ssh-mux/x.ssh" in out and "/opt/ssh" not in out
    assert "keyfile=/k/id" in out and "known_hosts=/k/kh" in out


def test_wrapper_is_private_and_uses_the_control_path(tmp_path: Path) -> None:
    target = SshTarget(host="dr1", command="/opt/my ssh")
    m = ssh_mux.SharedMaster(target, str(tmp_path), 60)
    w = m.wrapper()
    assert stat.S_IMODE(os.stat(w).st_mode) == 0o700
    text = Path(w).read_text()
    assert "exec '/opt/my ssh' -o ControlMaster=no" in text
    assert f"ControlPath={m.control}" in text and text.rstrip().endswith('"$@"')
    assert m.wrapper() == w  # unchanged: not rewritten


def test_site_shares_a_master_only_when_asked(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ssh_mux, "_default_dir", lambda: str(tmp_path / "mux"))
    monkeypatch.delenv(ssh_mux.PERSIST_ENV, raising=False)
    shared = Site(URI, shared=True)
    assert shared._shared is not None and shared._host is not None
    assert shared._host.control == shared._shared.control
    assert shared.libvirt_uri().endswith(f"command={shared._shared.wrapper()}")
    assert Site(URI)._shared is None and Site(URI).libvirt_uri() == URI  # mirror, failover
    monkeypatch.setenv(ssh_mux.PERSIST_ENV, "0")
    assert Site(URI, shared=True)._shared is None
    monkeypatch.delenv(ssh_mux.PERSIST_ENV)
    (tmp_path / "mux").chmod(0o777)  # not private: a master of its own, as before
    assert Site(URI, shared=True)._shared is None
    libssh = "qemu+libssh://root@dr1/system?known_hosts=/k/kh"
    (tmp_path / "mux").chmod(0o700)
    assert Site(libssh, shared=True).libvirt_uri() == libssh  # libvirt's own ssh library


def test_a_255_from_a_shared_master_ends_it(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """ssh's own failure (exit 255) over a shared master: it is told to exit, so the next
    cycle logs in afresh instead of reusing a master whose link is dead."""
    m = ssh_mux.SharedMaster(SshTarget(host="dr1", command="false"), str(tmp_path), 60)
    stopped: list[str] = []
    monkeypatch.setattr(m, "stop", lambda how="stop": stopped.append(how))
    h = RemoteHost(m.target, shared=m)
    h.dir = str(tmp_path)

    class P:
        returncode, stdout, stderr = 255, b"", b"Connection reset by peer"

    monkeypatch.setattr("subprocess.run", lambda *a, **k: P())
    with pytest.raises(HypervisorUnavailable, match="reset by peer"):
        h.run("true")
    assert stopped == ["exit"]


def test_open_target_replaces_a_reused_master_that_fails(monkeypatch: Any) -> None:
    from tests.unit.test_replica import _SlowSite, _spec
    from vmdr.cli import replicate_cmds as rc

    class Target:
        def close(self) -> None: ...

    class Stale(_SlowSite):
        def __init__(self, uri: str, reused: bool) -> None:
            super().__init__(uri)
            self.reused, self.replaced, self.tries = reused, 0, 0

        def prefetch(self, directory: str, names: list[str]) -> None:
            self.tries += 1
            if self.replaced == 0:
                raise HypervisorUnavailable("ssh to dr1 failed: Broken pipe")
            super().prefetch(directory, names)

        def replace_master(self) -> None:
            self.replaced += 1

    sites: list[Stale] = []

    def new_site(reused: bool) -> Any:
        def make(uri: str, **kw: Any) -> Stale:
            sites.append(Stale(uri, reused))
            return sites[-1]
        return make

    monkeypatch.setattr(rc, "connect", lambda uri: Target())
    monkeypatch.setattr(rc, "Site", new_site(True))
    _t, site = rc._open_target(_spec())
    assert site is cast(Any, sites[0]) and sites[0].replaced == 1 and sites[0].tries == 2
    assert sites[0].prefetched == ("/srv/r/web", ["replica.json"])
    # a master this cycle started itself is not retried: the error is the answer
    monkeypatch.setattr(rc, "Site", new_site(False))
    with pytest.raises(HypervisorUnavailable, match="Broken pipe"):
        rc._open_target(_spec())
    assert sites[-1].replaced == 0 and sites[-1].closed


def test_begin_reports_the_libvirt_socket_and_the_master_remembers_it(tmp_path: Path) -> None:
    from vmdr.jobs.replica_scripts import begin_libvirt_socket, parse_begin_pins

    out = b"123\nfile 2\n{}\npin rp-1\nlibvirt /run/libvirt/libvirt-sock\n"
    assert parse_begin_pins(out, 1) == (123, [b"{}"], {"rp-1"})
    assert begin_libvirt_socket(out) == "/run/libvirt/libvirt-sock"
    assert begin_libvirt_socket(b"123\nnone\n") is None
    m = ssh_mux.SharedMaster(SshTarget(host="dr1"), str(tmp_path), 60)
    assert m.libvirt_socket() is None
    m.remember_libvirt_socket("/run/libvirt/virtqemud-sock")
    assert m.libvirt_socket() == "/run/libvirt/virtqemud-sock"
    assert stat.S_IMODE(os.stat(m._libvirt).st_mode) == 0o600
    m.remember_libvirt_socket(None)
    assert m.libvirt_socket() is None


def test_open_target_uses_the_forwarded_libvirt_socket(monkeypatch: Any) -> None:
    from tests.unit.test_replica import _SlowSite, _spec
    from vmdr.cli import replicate_cmds as rc
    from vmdr.errors import HypervisorError

    opened: list[str] = []

    class Target:
        uri, local = "", True

        def close(self) -> None:
            opened.append("closed")

    def fake_connect(uri: str) -> Target:
        opened.append(uri)
        if "socket=/broken" in uri:
            raise HypervisorError("cannot connect")
        return Target()

    class Fwd(_SlowSite):
        def __init__(self, uri: str, local: str) -> None:
            super().__init__(uri)
            self.local, self.forgot = local, False

        def libvirt_forward(self) -> str | None:
            return self.local

        def forget_libvirt_socket(self) -> None:
            self.forgot = True

    sites: list[Fwd] = []

    def new_site(local: str) -> Any:
        def make(uri: str, **kw: Any) -> Fwd:
            sites.append(Fwd(uri, local))
            return sites[-1]
        return make

    monkeypatch.setattr(rc, "connect", fake_connect)
    monkeypatch.setattr(rc, "Site", new_site("/p/lv.sock"))
    target, _s = rc._open_target(_spec())
    assert opened == ["qemu+unix:///system?socket=/p/lv.sock"]
    assert target.uri == "qemu+ssh://root@dr1/system" and target.local is False
    # a forward that does not work: forgotten, libvirt's own ssh (over the master) instead
    opened.clear()
    monkeypatch.setattr(rc, "Site", new_site("/broken"))
    rc._open_target(_spec())
    assert opened == ["qemu+unix:///system?socket=/broken", "qemu+ssh://root@dr1/system"]
    assert sites[-1].forgot
