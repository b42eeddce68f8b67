"""A policy's bandwidth window, end to end: the agent's copy job command (``--bwlimit`` with
the policy's windows) run for real from a directory repository to an SFTP one (OpenSSH on
loopback). Inside the window the copy keeps to the rate; outside it, it does not."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.servers import SSHServer
from tests.integration.test_copy import init
from tests.unit.repofixtures import PASS
from vmdr import config
from vmdr.agent.history import Job
from vmdr.agent.runner import job_command
from vmdr.jobs.image import backup_image
from vmdr.timeutil import utcnow

pytestmark = pytest.mark.sftp
RATE = 256 << 10
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def copy_job(tmp_path: Path, sshd: SSHServer, name: str, windows: list[str]
             ) -> tuple[float, int]:
    """Run the agent's copy job of vm7 to a fresh SFTP repository under *windows*:
    (seconds, bytes sent)."""
    dst = sshd.url(str(sshd.data_dir / f"bw-{name}-{time.monotonic_ns()}"))
    init(dst).close()
    pw = tmp_path / "pw"
    cfg_file = tmp_path / f"{name}.toml"
    cfg_file.write_text(f"""
[repositories.local]
url = "{tmp_path / 'src'}"
password_file = "{pw}"
[repositories.offsite]
url = "{dst}"
password_file = "{pw}"
[agent]
state = "{tmp_path / 'agent.db'}"
[policies.office]
schedule = "daily 02:00"
repository = "local"
copy = ["offsite"]
bandwidth = {json.dumps(windows)}
""")
    cfg = config.load(str(cfg_file))
    argv = job_command(cfg, Job("j1", "copy", "vm7", "running", 0.0, policy="office",
                                repository="local", args={"to": "offsite"}))
    assert argv[argv.index("--bwlimit") + 1] == "; ".join(windows)
    t0 = time.monotonic()
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL)
    elapsed = time.monotonic() - t0
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout)
    return elapsed, int(res["bytes_sent"])


def test_a_copy_keeps_to_its_window(tmp_path: Path, sshd_server: SSHServer,
                                    sftp_env: None) -> None:
    (tmp_path / "pw").write_text(PASS + "\n")
    (tmp_path / "pw").chmod(0o600)
    with init(str(tmp_path / "src")) as src:
        (tmp_path / "vm7.raw").write_bytes(os.urandom(1 << 20))  # incompressible
        backup_image(src, str(tmp_path / "vm7.raw"), "vm7", workers=2)
    today = DAYS[utcnow().astimezone().weekday()]
    other = DAYS[(DAYS.index(today) + 3) % 7]
    # the window covers all of today: 256 KiB/s
    slow, sent = copy_job(tmp_path, sshd_server, "in", [f"{today} 00:00..24:00 256K",
                                                         "* unlimited"])
    floor = (sent - (64 << 10)) / RATE  # less the bucket's first burst
    assert sent >= 1 << 20
    assert floor * 0.9 <= slow < floor + 15, (slow, sent)
    # outside its window (another day) the same copy runs at full speed
    fast, sent2 = copy_job(tmp_path, sshd_server, "out", [f"{other} 256K", "* unlimited"])
    assert sent2 == sent
    assert fast < slow - floor * 0.5, (fast, slow)
    print(f"{sent >> 10} KiB: {slow:.1f}s inside the 256 KiB/s window (floor {floor:.1f}s), "
          f"{fast:.1f}s outside it; day {dt.date.today()}")
