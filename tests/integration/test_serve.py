"""``vmdr serve`` with the real nbdkit: byte-exact exports, holes, lifetime (no VM needed)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.unit.repofixtures import make_image

from .vmtools import VMDR, nbdkit_pids, repo_env, vmdr

pytestmark = pytest.mark.skipif(shutil.which("nbdkit") is None or shutil.which("nbdinfo")
                                is None, reason="needs nbdkit + libnbd-bin")
SIZE = 24 << 20


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"vmdr serve exited {proc.returncode}: "
                                 f"{proc.stderr.read() if proc.stderr else ''}")
        assert time.monotonic() < deadline, "socket did not appear"
        time.sleep(0.1)




def test_serve_matches_restore_and_reports_holes(tmp_path: Path) -> None:
    env = repo_env(tmp_path)
    img = tmp_path / "disk.raw"
    make_image(str(img), SIZE, seed=11, pieces=20)
    vmdr(env, "image", "backup", str(img), "--name", "srv")
    restored = tmp_path / "restored.raw"
    vmdr(env, "image", "restore", "srv", str(restored))
    sock = tmp_path / "srv.sock"
    proc = subprocess.Popen([*VMDR, "serve", "srv", "--socket", str(sock), "--json"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(sock, proc)
        time.sleep(0.3)  # socket exists before its mode is set
        uri = f"nbd+unix:///disk.raw?socket={sock}"
        p = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(restored), uri],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        ext = json.loads(subprocess.run(["nbdinfo", "--map", "--json", uri], check=True,
                                        capture_output=True, text=True).stdout)
        holes = [e for e in ext if e["type"] & 1]
        assert holes and any(e["type"] == 0 for e in ext)
        data = img.read_bytes()
        for e in holes:
            assert data[e["offset"] : e["offset"] + e["length"]] == bytes(e["length"])
        assert sum(e["length"] for e in ext) == SIZE
        assert oct(sock.stat().st_mode & 0o777) == oct(0o600)
        assert nbdkit_pids(str(sock))
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    info = json.loads(out)
    assert info["sockets"] == {"disk.raw": str(sock)} and info["exports"]["disk.raw"] == uri
    assert not sock.exists()
    assert not nbdkit_pids(str(sock))


def test_servers_die_with_their_process(tmp_path: Path) -> None:
    """kill -9 of the process that started the servers (from a thread that has long
    ended) takes nbdkit down too; the key file never outlives start-up."""
    env = repo_env(tmp_path)
    make_image(str(tmp_path / "d.raw"), 4 << 20, seed=3)
    vmdr(env, "image", "backup", str(tmp_path / "d.raw"), "--name", "k")
    code = textwrap.dedent(f"""
        import json, os, sys, threading, time
        from vmdr.cli.common import Globals, repository
        from vmdr.config import Config
        from vmdr.serve import start_server
        g = Globals(repo={str(tmp_path / 'repo')!r}, password_file=os.environ["VMDR_PASSWORD_FILE"],
                    key_file=None, json=True, progress=False, config=Config())
        repo = repository(g, None)
        box = {{}}
        t = threading.Thread(target=lambda: box.update(s=start_server(repo, repo.resolve("k"))))
        t.start(); t.join()
        s = box["s"]
        print(json.dumps({{"pids": s.pids, "private": s.private_dir, "sockets": s.sockets}}),
              flush=True)
        time.sleep(300)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    try:
        info = json.loads(proc.stdout.readline())
        pid = info["pids"]["d.raw"]
        assert os.path.exists(f"/proc/{pid}")
        assert "d.raw.pid" in os.listdir(info["private"])
        assert "d.raw.json" not in os.listdir(info["private"])  # the key's file is gone
        subprocess.run(["nbdinfo", "--size",
                        f"nbd+unix:///?socket={info['sockets']['d.raw']}"],
                       check=True, capture_output=True, timeout=30)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}"), "nbdkit outlived its parent"
    from vmdr.serve.server import sweep_stale

    assert info["private"] in sweep_stale(os.path.dirname(info["private"]))
    assert not os.path.exists(os.path.dirname(info["sockets"]["d.raw"]))


def test_detached_server_outlives_vmdr(tmp_path: Path) -> None:
    from vmdr.serve.server import is_nbdkit

    env = repo_env(tmp_path)
    make_image(str(tmp_path / "d.raw"), 4 << 20, seed=4)
    vmdr(env, "image", "backup", str(tmp_path / "d.raw"), "--name", "det")
    p = vmdr(env, "serve", "det", "--detach", "--json", "--socket-dir", str(tmp_path / "s"))
    info = json.loads(p.stdout)
    pid = info["pids"]["d.raw"]
    try:
        time.sleep(0.5)
        assert is_nbdkit(pid), "the detached server died with vmdr"
        out = subprocess.run(["nbdinfo", "--size", info["exports"]["d.raw"]], check=True,
                             capture_output=True, text=True, timeout=30).stdout
        assert int(out) == 4 << 20
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while is_nbdkit(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not is_nbdkit(pid)
