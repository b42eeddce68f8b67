"""Passphrases in a real terminal (issue 14, item 7): a pseudo-terminal from ``pty.fork``,
so ``sys.stdin.isatty()`` is true and ``getpass`` reads the controlling terminal.

``repo init`` uses the configured passphrase whenever one is set and prompts (twice) only
when none is; ``key passwd``/``key add`` always ask for the *new* passphrase.
"""

from __future__ import annotations

import json
import os
import pty
import select
import sys
import time
from pathlib import Path

import pytest

from .test_cli import run


class Terminal:
    """``vmdr ARGS`` on a pseudo-terminal: wait for text, type lines, collect the exit."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: stdin/stdout/stderr are the terminal
            os.execve(sys.executable, [sys.executable, "-m", "vmdr.cli.main", *args], env)
        self.seen = ""

    def expect(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"{text!r} never appeared; the terminal shows:\n{self.seen}"
            if not self._read(left):
                raise AssertionError(f"exited before {text!r}; the terminal shows:\n{self.seen}")

    def type(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\r")

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            return False
        self.seen += data.decode(errors="replace")
        return bool(data)

    def wait(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                while self._read(0.05) and select.select([self.fd], [], [], 0)[0]:
                    pass
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            self._read(0.1)
        os.kill(self.pid, 9)
        raise AssertionError(f"still running after {timeout}s:\n{self.seen}")


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("VMDR_PASSWORD", "VMDR_PASSWORD_FILE", "VMDR_REPO")}
    return {**env, "VMDR_REPO": str(tmp_path / "repo"), **extra}


def _secret(path: Path, text: str) -> str:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return str(path)


@pytest.mark.parametrize("how", ["VMDR_PASSWORD_FILE", "--password-file", "VMDR_PASSWORD",
                                 "config"])
def test_init_in_a_terminal_uses_the_configured_passphrase(tmp_path: Path, how: str) -> None:
    pw = _secret(tmp_path / "pass", "the configured one")
    args, extra = ["repo", "init"], {}
    if how == "VMDR_PASSWORD_FILE":
        extra["VMDR_PASSWORD_FILE"] = pw
    elif how == "VMDR_PASSWORD":
        extra["VMDR_PASSWORD"] = "the configured one"
    elif how == "--password-file":
        args += ["--password-file", pw]
    else:
        cfg = tmp_path / "vmdr.toml"
        cfg.write_text(f'password_file = "{pw}"\n')
        extra["VMDR_CONFIG"] = str(cfg)
    term = Terminal(args, _env(tmp_path, **extra))
    assert term.wait() == 0, term.seen
    assert "passphrase:" not in term.seen.lower(), term.seen  # nobody was asked
    assert "created repository" in term.seen
    # made by a CLI process of the suite: a cheap key slot (tests/kdfhook)
    (slot,) = (tmp_path / "repo" / "keys").iterdir()
    assert json.loads(slot.read_text())["kdf"]["memory_kib"] == 1024
    # later commands, run by cron with the same file, open it
    run("snapshots", env={"VMDR_REPO": str(tmp_path / "repo"), "VMDR_PASSWORD_FILE": pw})


def test_init_in_a_terminal_prompts_twice_when_nothing_is_configured(tmp_path: Path) -> None:
    term = Terminal(["repo", "init"], _env(tmp_path))
    term.expect("New repository passphrase:")
    term.type("typed at the prompt")
    term.expect("Repeat:")
    term.type("typed at the prompt")
    assert term.wait() == 0, term.seen
    run("snapshots", env={"VMDR_REPO": str(tmp_path / "repo"),
                          "VMDR_PASSWORD": "typed at the prompt"})


def test_key_passwd_in_a_terminal_asks_for_the_new_passphrase(tmp_path: Path) -> None:
    pw = _secret(tmp_path / "pass", "old one")
    env = {"VMDR_REPO": str(tmp_path / "repo"), "VMDR_PASSWORD_FILE": pw}
    run("repo", "init", env=env)
    term = Terminal(["key", "passwd"], _env(tmp_path, VMDR_PASSWORD_FILE=pw))
    term.expect("New passphrase:")
    term.type("new one")
    term.expect("Repeat:")
    term.type("new one")
    assert term.wait() == 0, term.seen
    assert "passphrase changed" in term.seen
    run("snapshots", env={**env, "VMDR_PASSWORD_FILE": _secret(tmp_path / "new", "new one")})
    run("snapshots", env=env, code=4)  # the old one no longer opens it
