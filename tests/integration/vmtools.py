"""Helpers for VM integration tests: a repository env and running the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

VMDR = [sys.executable, "-m", "vmdr.cli.main"]


def repo_env(tmp: Path) -> dict[str, str]:
    pw = tmp / "pw"
    pw.write_text("vm test passphrase\n")
    pw.chmod(0o600)
    env = dict(os.environ, VMDR_REPO=str(tmp / "repo"), VMDR_PASSWORD_FILE=str(pw),
               VMDR_LOCK_DIR=str(tmp / "locks"))
    env.pop("VMDR_CONFIG", None)
    vmdr(env, "repo", "init")
    return env


def vmdr(env: dict[str, str], *args: str, code: int = 0,
         timeout: float = 600) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([*VMDR, *args], capture_output=True, text=True, env=env,
                       timeout=timeout)
    assert p.returncode == code, f"exit {p.returncode} != {code}\n{p.stdout}\n{p.stderr}"
    assert "Traceback" not in p.stderr, p.stderr
    return p


def backup(env: dict[str, str], *args: str, code: int = 0) -> dict[str, Any]:
    p = vmdr(env, "backup", "--json", *args, code=code)
    out: dict[str, Any] = json.loads(p.stdout)
    return out


def domain_disk_sources(dom: Any) -> dict[str, str]:
    import xml.etree.ElementTree as ET

    root = ET.fromstring(dom.XMLDesc(0))
    out = {}
    for d in root.findall("./devices/disk"):
        t, s = d.find("target"), d.find("source")
        if t is not None and s is not None:
            out[t.get("dev", "")] = s.get("file") or s.get("dev") or ""
    return out


def checkpoints(dom: Any) -> list[str]:
    return sorted(c.getName() for c in dom.listAllCheckpoints(0))


def leftover_files(scratch: str) -> list[str]:
    out: list[str] = []
    for root, _, files in os.walk(scratch):
        out.extend(os.path.join(root, f) for f in files)
    return out


def nbdkit_pids(needle: str) -> list[int]:
    """Live nbdkit processes whose command line mentions *needle* (a socket dir, say)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"nbdkit") and any(needle.encode() in a for a in argv):
            out.append(int(pid))
    return out
