"""qemu+ssh:// support: URI parsing, ssh argv, and remote sessions/cleanup with the remote
host's shell scripts run locally (a fake ssh that executes ``sh -c`` here)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.unit import fakelibvirt as fl
from vmdr.errors import UsageError, VMLocked
from vmdr.hypervisor import LibvirtHypervisor, connect
from vmdr.hypervisor import backup as backup_mod
from vmdr.hypervisor import cleanup as cleanup_mod
from vmdr.hypervisor import state as st
from vmdr.hypervisor.hostfiles import RemoteFiles, lease_path
from vmdr.hypervisor.remote import RemoteHost, SshTarget, is_local_uri, parse_ssh_uri

P = "vmdr-1a2b3c4d"


# -- URI parsing -----------------------------------------------------------------------------

def test_parse_full_uri() -> None:
    t = parse_ssh_uri("qemu+ssh://admin@hv1.example.org:2222/system?keyfile=/k/id&"
                      "known_hosts=/k/kh&no_verify=1&no_tty=1&socket=/run/x.sock")
    assert t == SshTarget(host="hv1.example.org", user="admin", port=2222, keyfile="/k/id",
                          known_hosts="/k/kh", no_verify=True)
    argv = t.argv()
    assert argv[-2:] == ["--", "hv1.example.org"]
    assert argv[argv.index("-p"):argv.index("-p") + 2] == ["-p", "2222"]
    assert argv[argv.index("-l"):argv.index("-l") + 2] == ["-l", "admin"]
    assert "-i" in argv and "/k/id" in argv and "UserKnownHostsFile=/k/kh" in argv
    assert "StrictHostKeyChecking=no" in argv and "BatchMode=yes" in argv
    assert str(t) == "admin@hv1.example.org:2222"


def test_parse_minimal_uri_and_defaults() -> None:
    t = parse_ssh_uri("qemu+ssh://hv2/system")
    assert (t.user, t.port, t.keyfile, t.known_hosts, t.no_verify) == (None, None, None,
                                                                         None, False)
    argv = t.argv(control="/run/vmdr/x/ctl")
    assert "-l" not in argv and "-p" not in argv and "-i" not in argv
    assert not any(a.startswith("StrictHostKeyChecking") for a in argv)
    assert argv[argv.index("-S") + 1] == "/run/vmdr/x/ctl"


def test_no_verify_zero_and_known_hosts_verify() -> None:
    assert not parse_ssh_uri("qemu+ssh://h/system?no_verify=0").no_verify
    assert parse_ssh_uri("qemu+libssh://h/system?known_hosts_verify=ignore").no_verify
    t = parse_ssh_uri("qemu+libssh2://h/system?known_hosts_verify=auto")
    assert t.accept_new and "StrictHostKeyChecking=accept-new" in t.argv()
    with pytest.raises(UsageError, match="known_hosts_verify"):
        parse_ssh_uri("qemu+libssh://h/system?known_hosts_verify=maybe")


def test_transport_variants() -> None:
    assert parse_ssh_uri("qemu+libssh://u@h/system").transport == "libssh"
    assert parse_ssh_uri("qemu+libssh2://u@h/system").transport == "libssh2"
    assert parse_ssh_uri("qemu+ssh://h/system?command=/opt/ssh").command == "/opt/ssh"
    assert parse_ssh_uri("qemu+libssh://h/system?command=/opt/ssh").command == "ssh"
    t = parse_ssh_uri("qemu+ssh://root@[fd00::1]:22/system")
    assert t.host == "fd00::1" and str(t) == "root@[fd00::1]:22"


@pytest.mark.parametrize("uri", ["qemu+tcp://h/system", "qemu+tls://h/system",
                                 "qemu://h/system", "qemu+ext://h/system?command=/x",
                                 "qemu:///system", "qemu+unix:///system"])
def test_other_transports_rejected(uri: str) -> None:
    with pytest.raises(UsageError, match=r"qemu\+ssh://"):
        parse_ssh_uri(uri)


@pytest.mark.parametrize("uri", ["qemu+ssh://-oProxyCommand=x/system",
                                 "qemu+ssh://-l@h/system", "qemu+ssh://h:99999/system",
                                 "qemu+ssh:///system"])
def test_unsafe_or_bad_uris_rejected(uri: str) -> None:
    with pytest.raises(UsageError):
        parse_ssh_uri(uri)


def test_password_never_in_argv() -> None:
    t = parse_ssh_uri("qemu+ssh://root:s3cret@h/system?keyfile=/k")
    assert not any("s3cret" in a for a in t.argv()) and "s3cret" not in str(t)


def test_is_local_uri() -> None:
    assert is_local_uri("qemu:///system") and is_local_uri("qemu+unix:///session")
    assert is_local_uri("qemu+tcp://localhost/system")
    assert not is_local_uri("qemu+ssh://127.0.0.1:2222/system")  # may be a tunnel
    assert not is_local_uri("qemu+ssh://localhost/system")
    assert not is_local_uri("qemu+tcp://far/system")


# -- remote sessions with a local stand-in for ssh ---------------------------------------------

class LocalSsh(RemoteHost):
    """Runs the remote scripts here: ``sh -c`` instead of ``ssh host sh -c``."""

    forwards: list[tuple[str, str]]

    def open(self, timeout: float = 0) -> RemoteHost:
        if self.dir is None:
            import tempfile

            self.dir = tempfile.mkdtemp(prefix="vmdr-ssh-")
            self.forwards = []
        return self

    def _argv(self, script: str, args: tuple[str, ...]) -> list[str]:
        self.open()
        return ["sh", "-c", script, "vmdr", *args]

    def forward(self, name: str, remote_path: str) -> str:
        self.open()
        assert self.dir is not None
        self.forwards.append((name, remote_path))
        return os.path.join(self.dir, name)


def _remote_files() -> RemoteFiles:
    fs = RemoteFiles(SshTarget(host="hv"))
    fs.host = LocalSsh(fs.target)
    return fs


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict[str, Any]]:
    fl.install()
    socks: list[str] = []

    class Stub:
        size = 1 << 20

        def extents(self) -> Iterator[Any]:
            return iter(())

        def close(self) -> None: ...

    def unix_export(sock: str, export: str, ctx: str) -> Stub:
        socks.append(sock)
        return Stub()

    monkeypatch.setattr(backup_mod, "unix_export", unix_export)
    monkeypatch.setattr(LibvirtHypervisor, "files", lambda self, what="": _remote_files())
    dom = fl.add_domain(fl.domain_xml("web", fl.disk_xml("vda", "/img/a.qcow2")),
                        uri="qemu+ssh://hv/session", sizes={"vda": 1 << 30})
    hv = connect("qemu+ssh://hv/session")
    scratch = str(tmp_path / "scratch")
    yield {"dom": dom, "hv": hv, "scratch": scratch, "socks": socks,
           "workdir": st.workdir_for(scratch, dom.UUIDString())}
    fl.uninstall()


def _lease_free(workdir: str) -> bool:
    return subprocess.run(["flock", "-n", lease_path(workdir), "true"]).returncode == 0


def test_remote_session_uses_forwarded_socket_and_lease(env: dict[str, Any]) -> None:
    hv = env["hv"]
    assert not hv.local
    with hv.backup(hv.domain("web"), checkpoint_prefix=P, scratch_dir=env["scratch"]) as s:
        files = s._files
        assert isinstance(files, RemoteFiles)
        remote_sock = os.path.join(env["workdir"], "nbd.sock")
        assert files.host.forwards == [("nbd.sock", remote_sock)]  # type: ignore[attr-defined]
        assert env["socks"] == [os.path.join(files.local_dir or "", "nbd.sock")]
        data = json.loads(Path(env["workdir"], "state.json").read_text())
        assert data["remote"] == "hv" and data["local_dir"] == files.local_dir
        assert data["socket"] == remote_sock and data["boot_id"] == st.boot_id()
        assert not _lease_free(env["workdir"])  # held for the whole session
        local_dir = files.local_dir
        s.commit()
    assert _lease_free(env["workdir"])
    assert not os.path.exists(env["workdir"]) and not os.path.exists(local_dir or "/x")
    assert env["dom"].job is None and len(env["dom"].checkpoints) == 1


def _crash(env: dict[str, Any]) -> Any:
    hv = env["hv"]
    s = hv.backup(hv.domain("web"), checkpoint_prefix=P, scratch_dir=env["scratch"])
    s.start()
    return s


def test_remote_crash_cleanup(env: dict[str, Any]) -> None:
    s = _crash(env)
    with pytest.raises(VMLocked, match="another vmdr run holds"):  # lease still held
        env["hv"].cleanup_leftovers("web", P, env["scratch"])
    data = st.read(env["workdir"])
    assert data is not None
    data.pid = 2**22 + 7  # a dead owner on this machine
    st.write(env["workdir"], data)
    s._files.close()  # what kill -9 does to the ssh connection: the lease is released
    done = env["hv"].cleanup_leftovers("web", P, env["scratch"])
    assert "aborted leftover backup job" in done
    assert any("half-made checkpoint" in d for d in done)
    assert env["dom"].job is None and not env["dom"].checkpoints
    assert not os.path.exists(env["workdir"])


def test_remote_state_of_other_machine(env: dict[str, Any]) -> None:
    s = _crash(env)
    data = st.read(env["workdir"])
    assert data is not None
    data.host, data.boot_id, data.pid = "elsewhere", "0000", os.getppid()  # pid means nothing
    st.write(env["workdir"], data)
    s._files.close()
    other = subprocess.Popen(["flock", "-o", lease_path(env["workdir"]), "sleep", "30"])
    try:
        for _ in range(100):
            if not _lease_free(env["workdir"]):
                break
            import time

            time.sleep(0.02)
        with pytest.raises(VMLocked):  # its lease is held: that run is alive
            env["hv"].cleanup_leftovers("web", P, env["scratch"])
    finally:
        other.kill()
        other.wait()
    assert "aborted leftover backup job" in env["hv"].cleanup_leftovers("web", P,
                                                                        env["scratch"])


def test_tcp_uri_refused_for_live_backup() -> None:
    fl.install()
    try:
        fl.add_domain(fl.domain_xml("web", fl.disk_xml("vda", "/img/a.qcow2")),
                      uri="qemu+tcp://far/system", sizes={"vda": 1 << 30})
        hv = connect("qemu+tcp://far/system")
        with pytest.raises(UsageError, match=r"^backup: .*use a qemu\+ssh:// URI, not tcp$"):
            hv.backup(hv.domain("web"), checkpoint_prefix=P, scratch_dir="/nonexistent")
    finally:
        fl.uninstall()


def test_overlay_refused_over_ssh(env: dict[str, Any]) -> None:
    hv = env["hv"]
    s = hv.backup(hv.domain("web"), checkpoint_prefix=P, scratch_dir=env["scratch"],
                  method="overlay")
    with pytest.raises(UsageError, match="overlay"), s:
        pass


def test_remote_scripts_prepare_and_remove(tmp_path: Path) -> None:
    fs = _remote_files().open()
    try:
        work = fs.make_workdir(str(tmp_path / "s"), "0123456789ab-x", None)
        assert os.path.isdir(work) and oct(os.stat(work).st_mode & 0o777) == "0o770"
        assert fs.read_state(work) is None
        fs.write_state(work, st.BackupState(domain="d", uuid="u", prefix=P, method="m"))
        got = fs.read_state(work)
        assert got is not None and got.domain == "d" and got.remote == "hv"
        Path(work, "vda.scratch").write_bytes(b"x")
        assert sorted(os.path.basename(p) for p in fs.remove_workdir(work)) == [
            "state.json", "vda.scratch"]
        assert not os.path.exists(work)
        assert fs.read_file(str(tmp_path / "none")) is None
        assert fs.command(["sh", "-c", "echo hi; exit 3"]) == (3, "hi\n", "")
    finally:
        fs.close()


def test_vmdr_job_workdir_matching() -> None:
    xml = ("<domainbackup mode='pull'><server transport='unix' socket='/s/other/0123456789ab/"
           "nbd.sock'/><disks><disk name='vda'><scratch file='/s/other/0123456789ab/"
           "vda.scratch'/></disk></disks></domainbackup>")
    uuid = "01234567-89ab-cdef-0000-000000000000"
    ident = os.path.normpath
    assert cleanup_mod.vmdr_job_workdir(xml, "/s/mine", uuid, ident) == "/s/other/0123456789ab"
    assert cleanup_mod.vmdr_job_workdir(xml, "/t/mine", uuid, ident) is None
    assert cleanup_mod.vmdr_job_workdir(xml, "/s/mine", "ffffffff-" + uuid[9:], ident) is None
    bad = xml.replace("nbd.sock", "other.sock")
    assert cleanup_mod.vmdr_job_workdir(bad, "/s/mine", uuid, ident) is None


def test_reap_only_kills_marked_processes(tmp_path: Path) -> None:
    from vmdr.hypervisor.remote import reap

    marker = str(tmp_path / "vmdr-ssh-abc")
    ours = subprocess.Popen(["sh", "-c", "sleep 30", marker])
    other = subprocess.Popen(["sleep", "30"])
    try:
        assert reap([ours.pid, other.pid, 2**22 + 5], marker) == [ours.pid]
        assert ours.wait(5) != 0 and other.poll() is None
    finally:
        for p in (ours, other):
            p.kill()
            p.wait()


def test_session_refused_by_live_lease_leaves_its_files(env: dict[str, Any]) -> None:
    """Another machine's live session holds the lease: we stop before touching anything."""
    os.makedirs(env["workdir"])
    Path(env["workdir"], "state.json").write_text("{}")
    other = subprocess.Popen(["flock", "-o", lease_path(env["workdir"]), "sleep", "30"])
    try:
        import time

        while _lease_free(env["workdir"]):
            time.sleep(0.02)
        hv = env["hv"]
        s = hv.backup(hv.domain("web"), checkpoint_prefix=P, scratch_dir=env["scratch"])
        with pytest.raises(VMLocked), s:
            pass
        assert Path(env["workdir"], "state.json").exists()
        assert env["dom"].job is None
    finally:
        other.kill()
        other.wait()
