"""Host hook scripts around a backup: ``pre-backup``, ``pre-freeze``, ``post-thaw``,
``post-backup``. Each runs with ``VMDR_VM``, ``VMDR_PHASE``, ``VMDR_SNAPSHOT`` (when known)
and ``VMDR_STATUS`` (post-backup) in its environment, under a timeout. A failure either
aborts the backup (``on_failure = "abort"``) or is recorded as a warning (``"continue"``).
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass, field

from vmdr.config import HookConfig
from vmdr.errors import HookFailed

log = logging.getLogger(__name__)


@dataclass
class HookRunner:
    config: HookConfig
    vm: str
    warnings: list[str] = field(default_factory=list)

    def run(self, phase: str, snapshot: str = "", status: str = "") -> None:
        script = self.config.scripts.get(phase)
        if not script:
            return
        env = dict(os.environ, VMDR_VM=self.vm, VMDR_PHASE=phase, VMDR_SNAPSHOT=snapshot,
                   VMDR_STATUS=status)
        problem = None
        try:
            p = subprocess.run([script], env=env, capture_output=True, text=True,
                               timeout=self.config.timeout, stdin=subprocess.DEVNULL)
            if p.returncode != 0:
                last = (p.stderr or p.stdout).strip().splitlines()[-1:] or [""]
                problem = f"exited with status {p.returncode}" + (f": {last[0]}" if last[0] else "")
        except subprocess.TimeoutExpired:
            problem = f"timed out after {self.config.timeout:g}s"
        except OSError as exc:
            problem = f"cannot run: {exc.strerror}"
        if problem is None:
            return
        msg = f"{phase} hook {script} {problem}"
        if self.config.on_failure == "abort" and phase != "post-backup":
            raise HookFailed(f"{self.vm}: {msg}")
        log.warning("%s: %s", self.vm, msg)
        self.warnings.append(msg)
