#!/usr/bin/env python3
"""`make demo`: vmdr's main job, for real, on this host.

1. Creates a small demo VM (Debian kernel + busybox, guest agent, a data disk with a
   record writer) if the host has none, and starts it.
2. Creates an encrypted repository under /var/lib/vmdr-demo.
3. Backs the running VM up (full), lets it write, backs it up again (incremental).
4. Restores the latest snapshot under a new name, defines it and boots it from the
   restored disks, waiting for the guest agent's heartbeat.
5. Checks the restored data disk holds a consistent prefix of the writer's records.
6. Proves the latest snapshot boots: `vmdr verify --boot` in an isolated sandbox,
   straight from the repository, with a screenshot as evidence.
7. Tape drill with the file-backed virtual library (a demo back end, not hardware): the
   snapshot to a tape, the tape to the vault, the repository and the tape catalog lost
   (the repository is moved out of reach for the drill), the catalog rebuilt from the tape
   with the exported key alone, the repository restored from tape, the VM booted from it.
8. Writes the DR plan for this one-host estate (Markdown and HTML) and shows coverage.
   Then starts the agent for a minute: a minutely policy backs the VM up by itself and the
   dashboard (URL and a login token printed) shows it.
9. Cleans the restored copy away and stops the demo VM (it stays defined for next time).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.guest.domxml import make_domain_xml  # noqa: E402
from tests.guest.estate import ensure_built  # noqa: E402
from tests.guest.records import check_records  # noqa: E402

VM = "vmdr-demo"
RESTORED = "vmdr-demo-restored"
HOME = Path("/var/lib/vmdr-demo")
IMAGES = Path("/var/lib/libvirt/images/vmdr-demo")
VMDR = [str(ROOT / ".venv/bin/vmdr")]


def say(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def sh(*args: str, env: dict[str, str] | None = None, check: bool = True) -> str:
    print("$ " + " ".join(args), flush=True)
    p = subprocess.run(list(args), env=env, text=True, capture_output=True)
    if p.stdout:
        print(p.stdout.rstrip(), flush=True)
    if p.returncode and check:
        print(p.stderr.rstrip(), file=sys.stderr)
        raise SystemExit(f"demo failed: {' '.join(args)} exited {p.returncode}")
    return p.stdout


def virsh(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-q", "-c", "qemu:///system", *args], text=True,
                          capture_output=True, check=check)


def ensure_demo_vm() -> None:
    if virsh("dominfo", VM).returncode == 0:
        print(f"using the existing demo VM {VM}")
    else:
        say(f"building the test estate guest and defining {VM}")
        images = ensure_built()
        IMAGES.mkdir(parents=True, exist_ok=True)
        boot, data = IMAGES / "vda.qcow2", IMAGES / "vdb.qcow2"
        shutil.copyfile(images.boot_disk, boot)
        shutil.copyfile(images.data_disk, data)
        xml = make_domain_xml(VM, boot, data, console_log=IMAGES / "console.log",
                              writer_rate=25)
        (IMAGES / f"{VM}.xml").write_text(xml)
        sh("virsh", "-q", "define", str(IMAGES / f"{VM}.xml"))
    if "running" not in virsh("domstate", VM).stdout:
        sh("virsh", "-q", "start", VM)
    say("waiting for the demo VM's guest agent")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if virsh("qemu-agent-command", VM, '{"execute":"guest-ping"}').returncode == 0:
            print("guest agent answers")
            return
        time.sleep(1)
    raise SystemExit("demo failed: the demo VM did not answer within 180 s")


def main() -> int:
    if os.geteuid() != 0:
        raise SystemExit("make demo must run as root (it defines and boots VMs)")
    ensure_demo_vm()
    HOME.mkdir(parents=True, exist_ok=True)
    pw = HOME / "passphrase"
    if not pw.exists():
        pw.write_text(os.urandom(18).hex() + "\n")
    pw.chmod(0o600)
    env = dict(os.environ, VMDR_REPO=str(HOME / "repo"), VMDR_PASSWORD_FILE=str(pw))
    if not (HOME / "repo" / "vmdr-repo").exists():
        say("creating an encrypted repository")
        sh(*VMDR, "repo", "init", env=env)
    say("backup 1: the running VM (incremental if an earlier demo left a checkpoint)")
    sh(*VMDR, "backup", VM, "--no-progress", env=env)
    time.sleep(5)
    say("backup 2: only what the guest wrote since (dirty bitmap)")
    sh(*VMDR, "backup", VM, "--no-progress", env=env)
    sh(*VMDR, "snapshots", VM, env=env)
    sh(*VMDR, "repo", "stats", env=env)
    say("restore under a new name, define, boot from the restored disks")
    virsh("destroy", RESTORED)
    virsh("undefine", RESTORED)
    target = IMAGES / "restored"
    shutil.rmtree(target, ignore_errors=True)
    sh(*VMDR, "restore", VM, "--name", RESTORED, "--target-dir", str(target), "--define",
       "--start", "--timeout", "240", "--no-progress", env=env)
    say("is the restored data disk a consistent prefix of the writer's records?")
    virsh("destroy", RESTORED)
    rc = check_records(target / f"{RESTORED}-vdb.qcow2", "qcow2")
    print(f"records: {rc.count} valid, last seq {rc.last_seq}, consistent={rc.consistent}")
    if not rc.consistent:
        raise SystemExit(f"demo failed: {rc.problems}")
    virsh("undefine", RESTORED)
    shutil.rmtree(target, ignore_errors=True)
    say("integrity check of the repository (every chunk's MAC)")
    sh(*VMDR, "check", "--read-data", env=env)
    say("proof of recovery: boot the latest snapshot in a sandbox, from the repository")
    sh(*VMDR, "verify", VM, "--boot", "--timeout", "240", "--evidence-dir", str(HOME),
       env=env)
    tape_drill(env)
    say("the written DR plan for this estate")
    cfg = HOME / "estate.toml"
    cfg.write_text(ESTATE.format(repo=HOME / "repo", pw=pw, vm=VM))
    penv = dict(env, VMDR_CONFIG=str(cfg))
    sh(*VMDR, "plan", "coverage", env=penv)
    sh(*VMDR, "plan", "write", "-o", str(HOME / "dr-plan.md"), env=penv)
    sh(*VMDR, "plan", "write", "-o", str(HOME / "dr-plan.html"), env=penv)
    run_agent(penv)
    virsh("shutdown", VM)
    virsh("destroy", VM)
    say(f"done: backed up live, restored, booted, verified; plan in {HOME}/dr-plan.html")
    return 0


def tape_drill(env: dict[str, str]) -> None:
    """Snapshot → tape → vault; lose the catalog; rebuild from the tape; restore; boot."""
    say("tape drill: a virtual tape library (demo back end), a pool, a labelled tape")
    for d in ("vtl", "tape", "from-tape"):
        shutil.rmtree(HOME / d, ignore_errors=True)
    tenv = dict(env, VMDR_TAPE_DIR=str(HOME / "tape"),
                VMDR_TAPE_LIBRARY=f"virtual:{HOME / 'vtl'}")
    sh(*VMDR, "tape", "virtual-create", str(HOME / "vtl"), "--tapes", "2", "--capacity", "4G",
       env=tenv)
    sh(*VMDR, "tape", "pool", "add", "weekly", "--vault", "bunker", "--retention", "8w",
       env=tenv)
    sh(*VMDR, "tape", "label", "--pool", "weekly", "--slot", "1", env=tenv)
    sh(*VMDR, "tape", "backup", "--pool", "weekly", VM, "--no-progress", env=tenv)
    key = HOME / "exported.key"
    if not key.exists():
        sh(*VMDR, "key", "export", str(key), env=tenv)
    sh(*VMDR, "tape", "export", "VMD001L8", "--vault", "bunker", env=tenv)
    sh(*VMDR, "tape", "vault", env=tenv)
    say("disaster: the repository and the tape catalog are gone; the tape comes back from "
        "the vault")
    lost = HOME / "repo.lost-in-tape-drill"
    shutil.rmtree(HOME / "tape")
    shutil.rmtree(lost, ignore_errors=True)
    (HOME / "repo").rename(lost)  # out of reach: nothing below can read it
    try:
        sh(*VMDR, "tape", "import", "VMD001L8", env=tenv)
        sh(*VMDR, "tape", "catalog", "--rebuild", "--key-file", str(key), env=tenv)
        renv = dict(tenv, VMDR_REPO=str(HOME / "from-tape"))
        sh(*VMDR, "tape", "restore", VM, "--key-file", str(key), "--no-progress", env=renv)
        say("restore the VM from the repository rebuilt from tape, and boot it")
        name = f"{VM}-tape"
        virsh("destroy", name)
        virsh("undefine", name)
        sh(*VMDR, "restore", VM, "--name", name, "--target-dir", str(IMAGES / "tape"),
           "--define", "--start", "--force", "--timeout", "180", "--key-file", str(key),
           "--no-progress", env=renv)
        virsh("destroy", name)
        virsh("undefine", name)
        shutil.rmtree(IMAGES / "tape", ignore_errors=True)
    finally:
        lost.rename(HOME / "repo")  # the demo goes on with the plan and the agent


def run_agent(env: dict[str, str], seconds: float = 60) -> None:
    """The agent with a minutely policy on the demo VM, for a minute (or until it ran)."""
    say("the agent: a minutely policy backs the VM up by itself; the dashboard is live")
    token = sh(*VMDR, "agent", "token", "create", "--role", "admin", "--name", "demo",
               env=env).splitlines()[-1]
    agent = subprocess.Popen([*VMDR, "agent"], env=env)
    print(f"\n    dashboard: http://127.0.0.1:8780/   (log in with the token {token})\n",
          flush=True)
    start = time.monotonic()
    try:
        while time.monotonic() - start < 150:  # a minute, and until the first run is done
            time.sleep(5)
            out = subprocess.run([*VMDR, "jobs", "--json", "--state", "ok"], env=env,
                                 capture_output=True, text=True).stdout
            done = f'"vm": "{VM}"' in out
            if done and time.monotonic() - start >= seconds:
                break
        sh(*VMDR, "jobs", env=env)
    finally:
        agent.terminate()
        agent.wait(60)


ESTATE = """# The demo estate: one host in one rack; the repository on the same host.
# `vmdr plan coverage` shows honestly what that survives (a VM failure) and what not.
[plan]
title = "vmdr demo DR plan"
verify_max_age = "7d"

[plan.tiers.demo]
rpo = "24h"
rto = "1h"
must_survive = ["vm", "host"]

[locations.lab]
kind = "building"
name = "Lab"

[locations.rack1]
kind = "rack"
parent = "lab"
name = "Rack 1"

[hosts.localhost]
location = "rack1"
uri = "qemu:///system"
vcpus = 2
memory = "24GiB"

[repositories.local]
url = "{repo}"
host = "localhost"
password_file = "{pw}"

[roles.admin]
title = "Administrator"
person = "root"
contact = "root@localhost"
declares = true
restores = ["*"]

[vm.{vm}]
host = "localhost"
owner = "root"
tier = "demo"
boot_group = 1

[agent]
listen = "127.0.0.1:8780"
state = "/var/lib/vmdr-demo/agent.db"

[policies.demo]
vms = ["{vm}"]
schedule = "minutely"
repository = "local"
"""


if __name__ == "__main__":
    sys.exit(main())
