"""cleanup_leftovers decisions against the fake libvirt."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.unit import fakelibvirt as fl
from vmdr.errors import HypervisorError, VMLocked
from vmdr.hypervisor import backup as backup_mod
from vmdr.hypervisor import cleanup_leftovers, connect
from vmdr.hypervisor import state as st
from vmdr.procutil import proc_start_time

P = "vmdr-1a2b3c4d"


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict[str, Any]]:
    fl.install()
    monkeypatch.setattr(st, "qemu_user", lambda: None)  # no chown of pytest's tmp dirs
    monkeypatch.setattr(backup_mod, "unix_export", lambda *a: _Nop())
    monkeypatch.setattr(backup_mod, "_image_reader", lambda d, lock=False: _Nop())
    dom = fl.add_domain(fl.domain_xml("web", fl.disk_xml("vda", "/img/a.qcow2")),
                        sizes={"vda": 1 << 30})
    scratch = str(tmp_path / "scratch")
    yield {"dom": dom, "hv": connect(), "scratch": scratch,
           "workdir": st.workdir_for(scratch, dom.UUIDString())}
    fl.uninstall()


class _Nop:
    size = 0

    def close(self) -> None: ...


def _crash(env: dict[str, Any], **kw: Any) -> Any:
    """Start a backup and abandon it, as if vmdr were killed."""
    hv = env["hv"]
    s = hv.backup(hv.domain("web"), checkpoint_prefix=P, scratch_dir=env["scratch"], **kw)
    s.start()
    return s


def _fake_dead_owner(workdir: str) -> None:
    path = os.path.join(workdir, "state.json")
    with open(path) as f:
        data = json.load(f)
    data["pid"] = 2**22 + 12345  # beyond pid_max defaults: not running
    with open(path, "w") as f:
        json.dump(data, f)


def test_nothing_to_do(env: dict[str, Any]) -> None:
    assert cleanup_leftovers(env["hv"], "web", P, env["scratch"]) == []


def test_leftover_job_and_checkpoint(env: dict[str, Any]) -> None:
    dom = env["dom"]
    s = _crash(env)
    _fake_dead_owner(env["workdir"])
    assert dom.job is not None and s.checkpoint in dom.checkpoints
    done = cleanup_leftovers(env["hv"], "web", P, env["scratch"])
    assert "aborted leftover backup job" in done
    assert f"deleted half-made checkpoint {s.checkpoint}" in done
    assert dom.job is None and not dom.checkpoints
    assert not os.path.exists(env["workdir"])


def test_committed_leftover_keeps_checkpoint(env: dict[str, Any]) -> None:
    dom = env["dom"]
    dom.checkpointCreateXML(
        f"<domaincheckpoint><name>{P}-20200101T000000.000Z</name></domaincheckpoint>", 0)
    s = _crash(env)
    data = st.read(env["workdir"])
    assert data is not None
    data.committed, data.pid = True, 2**22 + 12345
    st.write(env["workdir"], data)
    done = cleanup_leftovers(env["hv"], "web", P, env["scratch"])
    assert list(dom.checkpoints) == [s.checkpoint]
    assert f"deleted superseded checkpoint {P}-20200101T000000.000Z" in done


def test_live_owner_is_locked(env: dict[str, Any]) -> None:
    _crash(env)
    data = st.read(env["workdir"])
    assert data is not None
    data.pid = os.getppid()  # a live process that is not us
    data.pid_start = proc_start_time(data.pid)
    st.write(env["workdir"], data)
    with pytest.raises(VMLocked):
        cleanup_leftovers(env["hv"], "web", P, env["scratch"])


def test_foreign_backup_job_is_not_touched(env: dict[str, Any]) -> None:
    dom = env["dom"]
    dom.job = "<domainbackup mode='pull'><server transport='unix' socket='/run/other.sock'/>" \
              "<disks><disk name='vda' backup='yes'><scratch file='/tmp/x'/></disk></disks>" \
              "</domainbackup>"
    with pytest.raises(HypervisorError, match="vmdr did not start"):
        cleanup_leftovers(env["hv"], "web", P, env["scratch"])
    assert dom.job is not None


def test_leftover_overlay_is_merged(env: dict[str, Any]) -> None:
    dom = env["dom"]
    _crash(env, method="overlay")
    _fake_dead_owner(env["workdir"])
    assert "vmdr-overlay" in dom.XMLDesc(0)
    done = cleanup_leftovers(env["hv"], "web", P, env["scratch"])
    assert "merged leftover overlay of vda" in done
    assert "vmdr-overlay" not in dom.XMLDesc(0) and "/img/a.qcow2" in dom.XMLDesc(0)


def test_other_prefix_checkpoints_untouched(env: dict[str, Any]) -> None:
    dom = env["dom"]
    _crash(env)
    _fake_dead_owner(env["workdir"])
    cleanup_leftovers(env["hv"], "web", "vmdr-ffffffff", env["scratch"])
    assert len(dom.checkpoints) == 1  # the half-made one belongs to P, not to this prefix


def _other_repo_job(env: dict[str, Any], *, pid: int, with_state: bool = True,
                    committed: bool = False) -> str:
    """A job left by vmdr for another repository: files in <parent>/<other>/<uuid12>/."""
    dom = env["dom"]
    other_scratch = os.path.join(os.path.dirname(env["scratch"]), "0f0e0d0c0b0a")
    work = st.workdir_for(other_scratch, dom.UUIDString())
    os.makedirs(work)
    cp = "vmdr-0f0e0d0c0b0a-20250101T000000.000Z"
    dom.checkpointCreateXML(f"<domaincheckpoint><name>{cp}</name></domaincheckpoint>", 0)
    dom.job = (f"<domainbackup mode='pull'><server transport='unix' socket='{work}/nbd.sock'/>"
               f"<disks><disk name='vda' backup='yes'><scratch file='{work}/vda.scratch'/>"
               "</disk></disks></domainbackup>")
    if with_state:
        data = st.BackupState(domain="web", uuid=dom.UUIDString(), prefix="vmdr-0f0e0d0c0b0a",
                              method="checkpoint", checkpoint=cp, committed=committed)
        data.pid = pid
        data.pid_start = proc_start_time(pid)
        st.write(work, data)
    return work


def test_other_repository_job_of_dead_run_is_aborted(env: dict[str, Any]) -> None:
    dom = env["dom"]
    work = _other_repo_job(env, pid=2**22 + 99)
    done = cleanup_leftovers(env["hv"], "web", P, env["scratch"])
    assert any("another repository" in d for d in done), done
    assert dom.job is None
    assert "deleted half-made checkpoint vmdr-0f0e0d0c0b0a-20250101T000000.000Z" in done
    assert not dom.checkpoints and not os.path.exists(work)


def test_other_repository_job_of_live_run_is_locked(env: dict[str, Any]) -> None:
    _other_repo_job(env, pid=os.getppid())
    with pytest.raises(VMLocked, match="another repository"):
        cleanup_leftovers(env["hv"], "web", P, env["scratch"])
    assert env["dom"].job is not None


def test_other_repository_job_without_state_is_refused(env: dict[str, Any]) -> None:
    _other_repo_job(env, pid=0, with_state=False)
    with pytest.raises(HypervisorError, match="state file is missing"):
        cleanup_leftovers(env["hv"], "web", P, env["scratch"])
    assert env["dom"].job is not None


def test_other_repository_committed_checkpoint_is_kept(env: dict[str, Any]) -> None:
    _other_repo_job(env, pid=2**22 + 99, committed=True)
    cleanup_leftovers(env["hv"], "web", P, env["scratch"])
    assert list(env["dom"].checkpoints) == ["vmdr-0f0e0d0c0b0a-20250101T000000.000Z"]


def test_state_of_reused_pid_is_dead(env: dict[str, Any]) -> None:
    _crash(env)
    data = st.read(env["workdir"])
    assert data is not None
    data.pid, data.pid_start = os.getppid(), "1"  # alive, but not the process that wrote it
    st.write(env["workdir"], data)
    assert "aborted leftover backup job" in cleanup_leftovers(env["hv"], "web", P,
                                                              env["scratch"])
