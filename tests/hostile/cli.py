"""Running the real ``vmdr`` command the way a sysadmin (or an outside tester) does.

Every run is a fresh process: the installed console script when there is one (else
``python -m vmdr.cli.main``), stdin not a terminal, and an environment cleaned of the
caller's ``VMDR_*`` settings so that only what the test gives counts.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

_SCRIPT = Path(sys.executable).parent / "vmdr"
VMDR: list[str] = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m",
                                                           "vmdr.cli.main"]
# kept from the caller's environment; every other VMDR_* variable is dropped
_KEEP = {"VMDR_INSECURE_TEST_KDF"}
ARGPARSE_ERROR = re.compile(r"^vmdr( [\w-]+)*: error: ")
DOCUMENTED_CODES = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 44, 130}


@dataclass
class Result:
    argv: list[str]
    code: int
    stdout: str
    stderr: str
    timed_out: bool = False

    def describe(self) -> str:
        return (f"$ vmdr {' '.join(self.argv)}\nexit {self.code}"
                f"{' (TIMED OUT)' if self.timed_out else ''}\n"
                f"--- stdout\n{self.stdout[-2000:]}\n--- stderr\n{self.stderr[-2000:]}")

    @property
    def error_lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.startswith("vmdr: error:")]


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VMDR_", "AWS_")) or k in _KEEP}
    env["VMDR_INSECURE_TEST_KDF"] = "1"
    # boto3 must never look for credentials on the network (instance metadata service)
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    env.update(extra or {})
    return env


def run_vmdr(argv: list[str], env: dict[str, str], cwd: str | None = None,
             timeout: float = 60.0) -> Result:
    """Run vmdr with exactly *env*; on timeout kill its whole process group."""
    p = subprocess.Popen([*VMDR, *argv], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env, cwd=cwd, start_new_session=True,
                         text=True, errors="replace")
    try:
        out, err = p.communicate(timeout=timeout)
        return Result(argv, p.returncode, out, err)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        return Result(argv, -9, out, err, timed_out=True)


def assert_clean_failure(res: Result, code: int, strict_one_line: bool = True) -> None:
    """*res* failed with *code*, said why in one line, and showed no traceback.

    A vmdr error is exactly one line ``vmdr: error: …`` (with *strict_one_line* False,
    ``vmdr: warning:`` lines may precede it); an argparse error (exit 2) is its usage
    text followed by one ``vmdr …: error: …`` line.
    """
    info = res.describe()
    assert not res.timed_out, info
    assert res.code == code, f"expected exit {code}\n{info}"
    assert "Traceback" not in res.stderr + res.stdout, info
    assert "internal error" not in res.stderr, info
    lines = res.stderr.splitlines()
    if code == 2 and lines and lines[0].startswith("usage:"):
        assert ARGPARSE_ERROR.match(lines[-1]), info
        return
    assert len(res.error_lines) == 1, info
    if strict_one_line:
        assert lines == res.error_lines, info
    else:
        others = [ln for ln in lines if ln not in res.error_lines]
        assert all(ln.lower().startswith("vmdr: warning:") for ln in others), info
