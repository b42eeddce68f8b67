"""What every command shares: typed global options, opening the repository, output."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vmdr import config as configmod
from vmdr.errors import UsageError
from vmdr.events import JobEvents, Outcome
from vmdr.repository.opening import LockMode, OpenOptions, Passphrase, open_repository
from vmdr.repository.repo import Repository


@dataclass
class Globals:
    """Global options, resolved from flags, environment and config (in that order)."""

    repo: str | None
    password_file: str | None
    key_file: str | None
    json: bool
    progress: bool
    config: configmod.Config
    append_only: bool = False
    # the command's job events (vmdr.events); main() starts and ends the job
    events: JobEvents = field(default_factory=JobEvents)
    result_doc: Any = None
    outcome: Outcome | None = None  # "partial": some items failed (default: by exit code)

    @classmethod
    def from_args(cls, ns: argparse.Namespace, events: JobEvents | None = None) -> Globals:
        global _current_events
        _current_events = events
        cfg = configmod.load(getattr(ns, "config", None))
        return cls(
            repo=getattr(ns, "repo", None) or os.environ.get("VMDR_REPO") or cfg.repository,
            password_file=(getattr(ns, "password_file", None)
                           or os.environ.get("VMDR_PASSWORD_FILE") or cfg.password_file),
            key_file=(getattr(ns, "key_file", None) or os.environ.get("VMDR_KEY_FILE")
                      or cfg.key_file),
            json=bool(getattr(ns, "json", False)),
            progress=not getattr(ns, "no_progress", False),
            config=cfg,
            append_only=(bool(getattr(ns, "append_only", False))
                         or os.environ.get("VMDR_APPEND_ONLY", "") not in ("", "0")
                         or cfg.append_only),
            events=events or JobEvents(),
        )

    def need_repo(self) -> str:
        if not self.repo:
            raise UsageError("no repository given: use --repo, VMDR_REPO or 'repository' "
                             "in the config file")
        return self.repo

    @functools.cached_property
    def passphrase(self) -> Passphrase:
        """The repository passphrase (VMDR_PASSWORD, the password file, else a prompt),
        looked up at most once per command."""
        return Passphrase(file=self.password_file)

    def open_options(self, url: str | None = None, **kw: Any) -> OpenOptions:
        """Typed options for :func:`vmdr.repository.opening.open_repository`."""
        return OpenOptions(url=url or self.need_repo(), passphrase=self.passphrase,
                           key_file=self.key_file, append_only=self.append_only, **kw)

    def result(self, doc: Any) -> None:
        """The command's result document: printed on stdout with ``--json``, and carried
        by the job's ``end`` event either way."""
        self.result_doc = doc
        if self.json:
            emit_json(doc)


def repository(g: Globals, lock: LockMode = "shared", command: str = "") -> Repository:
    """Open --repo for a command that needs *lock* (``shared``, ``exclusive`` or None);
    use it in a ``with`` block: closing releases the lock."""
    return open_repository(g.open_options(), lock, command)


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


_current_events: JobEvents | None = None  # the running command's (set by Globals.from_args)


def warn(text: str) -> None:
    """A warning of the running command, as a warning event: the renderers print it as
    ``vmdr: warning: …`` (``--json-events``: a JSON line)."""
    if _current_events is not None:
        _current_events.warning(text)
    else:
        sys.stderr.write(f"vmdr: warning: {text}\n")


Handler = Callable[[argparse.Namespace, Globals], int]


def common_parser() -> argparse.ArgumentParser:
    """Options accepted by every command, before or after the command name."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("global options")
    s = argparse.SUPPRESS
    g.add_argument("-r", "--repo", default=s, metavar="URL",
                   help="repository: /path, file://, sftp://user@host/path, s3://bucket/prefix "
                        "(env VMDR_REPO)")
    g.add_argument("--password-file", default=s, metavar="FILE",
                   help="file holding the passphrase, mode 0600 (env VMDR_PASSWORD_FILE)")
    g.add_argument("--key-file", default=s, metavar="FILE",
                   help="open the repository with an exported key file (env VMDR_KEY_FILE)")
    g.add_argument("--config", default=s, metavar="FILE",
                   help="config file (env VMDR_CONFIG, default /etc/vmdr/vmdr.toml)")
    g.add_argument("--json", action="store_true", default=s,
                   help="machine-readable output: the result as one JSON document on stdout")
    g.add_argument("--json-events", action="store_true", default=s,
                   help="every job event as one JSON object per line on stderr, and nothing "
                        "else there (docs/events.md)")
    g.add_argument("--job-id", default=s, metavar="ID",
                   help="the job id the events carry (env VMDR_JOB_ID; default random)")
    g.add_argument("--append-only", action="store_true", default=s,
                   help="never delete or replace repository objects (env VMDR_APPEND_ONLY=1)")
    g.add_argument("--no-progress", action="store_true", default=s, help="no progress bar")
    g.add_argument("-v", "--verbose", action="count", default=s, help="more log output")
    g.add_argument("--debug", action="store_true", default=s,
                   help="show tracebacks of unexpected errors")
    return p
