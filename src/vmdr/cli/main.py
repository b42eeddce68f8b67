"""The ``vmdr`` command: parse, dispatch, and turn every error into one line and an exit code."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import logging
import signal
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from vmdr import __version__
from vmdr.cli.common import Globals, common_parser
from vmdr.errors import EXIT_CODES, EXIT_INTERRUPTED, VmdrError
from vmdr.events import Event, EventSink, JobEvents, JobWarning, Outcome, new_job_id
from vmdr.storage.registry import redact_text
from vmdr.ui import make_sink

# Command modules, in --help order, and which module registers each command word. Only the
# module of the command being run is imported, so `vmdr backup` does not pay for the
# plan renderers, the NBD server or the file-level tools (tests/unit/test_cli_modules.py
# keeps this table honest).
MODULES = ["repo_cmds", "vm_cmds", "image_cmds", "snapshot_cmds", "copy_cmds", "plan_cmds",
           "verify_cmds", "instant_cmds", "files_cmds", "ha_cmds",
           "watchdog_cmds", "replicate_cmds", "recovery_cmds", "tape_cmds", "agent_cmds",
           "jobs_cmds"]
COMMANDS = {
    "repo": "repo_cmds", "key": "repo_cmds", "backup": "vm_cmds", "restore": "vm_cmds",
    "image": "image_cmds", "snapshots": "snapshot_cmds", "forget": "snapshot_cmds",
    "prune": "snapshot_cmds", "check": "snapshot_cmds", "protect": "snapshot_cmds",
    "unprotect": "snapshot_cmds", "copy": "copy_cmds", "plan": "plan_cmds",
    "serve": "verify_cmds", "verify": "verify_cmds", "instant-restore": "instant_cmds",
    "files": "files_cmds", "mount": "files_cmds", "umount": "files_cmds",
    "ha": "ha_cmds",
    "watchdog": "watchdog_cmds",
    "replicate": "replicate_cmds",
    "recovery": "recovery_cmds", "failover": "recovery_cmds", "failback": "recovery_cmds",
    "tape": "tape_cmds", "export": "tape_cmds",
    "agent": "agent_cmds", "jobs": "jobs_cmds",
}
_VALUE_OPTIONS = {"-r", "--repo", "--password-file", "--key-file", "--config", "--job-id"}


def command_word(args: Sequence[str]) -> str | None:
    """The command named in *args*, skipping global options and their values."""
    skip = False
    for a in args:
        if skip:
            skip = False
        elif a == "--":
            return None
        elif a.startswith("-"):
            skip = a in _VALUE_OPTIONS
        else:
            return a
    return None


def _epilog() -> str:
    lines = ["exit codes:"] + [f"  {code:>3}  {text}" for code, text in EXIT_CODES]
    return "\n".join(lines)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for *command* alone (a known command word), or for every command."""
    common = common_parser()
    parser = argparse.ArgumentParser(
        prog="vmdr", parents=[common],
        description="Disaster recovery and backup for libvirt/QEMU virtual machines.",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vmdr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    names = [COMMANDS[command]] if command in COMMANDS else MODULES
    for name in names:
        importlib.import_module(f"vmdr.cli.{name}").register(sub, [common])
    return parser


def _limit_malloc_arenas() -> None:
    """glibc gives every thread its own malloc arena; with a pool of chunk threads each
    holding 4 MiB buffers that costs ~15 MB per thread. Two arenas cut peak RSS by ~20 MB
    at no measurable CPU cost (MALLOC_ARENA_MAX=2)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_arena_max = -8
        libc.mallopt(m_arena_max, 2)
    except (OSError, AttributeError):
        pass


class _RedactingFilter(logging.Filter):
    """Hides URL passwords in every log line, whoever logs it (ours, botocore, paramiko)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact_text(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


def one_line(text: str) -> str:
    """*text* with every control character escaped: an error is one line, whatever a
    name, path or URL in it holds (a newline, an escape sequence)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


# options that are not the job's own parameters (the start event's "args")
_NOT_ARGS = {"repo", "password_file", "key_file", "config", "json", "json_events", "job_id",
             "append_only", "no_progress", "verbose", "debug", "command", "subcommand",
             "plan_command", "func"}


def job_kind(ns: argparse.Namespace) -> str:
    """The command path: ``backup``, ``image backup``, ``repo init``…"""
    words = [str(ns.command)]
    words += [str(v) for v in (getattr(ns, "subcommand", None),
                               getattr(ns, "plan_command", None)) if v]
    return " ".join(words)


def job_args(ns: argparse.Namespace) -> dict[str, Any]:
    """The command's own options for the start event, URLs without their passwords."""
    from vmdr.storage.registry import redact

    def clean(v: Any) -> Any:
        if isinstance(v, str):
            return redact(v) if "://" in v else v
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v if v is None or isinstance(v, bool | int | float) else str(v)

    return {k: clean(v) for k, v in sorted(vars(ns).items()) if k not in _NOT_ARGS}


class _EventLogHandler(logging.Handler):
    """With --json-events, log warnings become warning events (stderr holds only JSON)."""

    def __init__(self, events: JobEvents) -> None:
        super().__init__(logging.WARNING)
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.events.emit(JobWarning, message=record.getMessage(), item=None)
        except Exception:
            self.handleError(record)


def _parse_for_events(parser: argparse.ArgumentParser,
                      args: list[str]) -> argparse.Namespace | int:
    """Parse with --json-events: a usage error becomes a start and an end event (exit 2)
    instead of argparse's text on stderr."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf):
            return parser.parse_args(args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 2
        if code == 0:
            return 0  # --help, --version: printed on stdout
        lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
        message = lines[-1].split(": error: ", 1)[-1] if lines else "usage error"
        events = JobEvents(make_sink(json_events=True), job=new_job_id())
        events.start(command_word(args) or "")
        events.finish("failed", code, message)
        return code


def _job_events(ns: argparse.Namespace) -> JobEvents:
    json_events = bool(getattr(ns, "json_events", False))
    bars = not getattr(ns, "no_progress", False) and not getattr(ns, "json", False)
    job = getattr(ns, "job_id", None) or new_job_id()
    return JobEvents(_redacting(make_sink(json_events, bars)), job=job)


def _redacting(sink: EventSink) -> EventSink:
    """Every message that reaches a renderer has URL passwords hidden (README "Security")."""

    def redacted(event: Event) -> None:
        msg = getattr(event, "message", None)
        if isinstance(msg, str):
            clean = redact_text(msg)
            if clean != msg:
                event = dataclasses.replace(event, message=clean)  # type: ignore[call-arg]
        sink(event)

    return redacted


def main(argv: Sequence[str] | None = None) -> int:
    _limit_malloc_arenas()
    args = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(command_word(args))
    if "--json-events" in args:
        parsed = _parse_for_events(parser, args)
        if isinstance(parsed, int):
            return parsed
        ns = parsed
    else:
        ns = parser.parse_args(args)
    debug = bool(getattr(ns, "debug", False))
    verbose = int(getattr(ns, "verbose", 0) or 0)
    json_events = bool(getattr(ns, "json_events", False))
    events = _job_events(ns)
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    if json_events:
        logging.basicConfig(level=logging.WARNING, handlers=[_EventLogHandler(events)])
    else:
        logging.basicConfig(level=level, format="vmdr: %(levelname)s: %(message)s",
                            stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_RedactingFilter())
    if not debug:
        # paramiko logs dropped connections at ERROR; our own errors say it in one line
        logging.getLogger("paramiko").setLevel(logging.CRITICAL)
        # library deprecation notices (e.g. pyOpenSSL's about DSA) are not for the sysadmin
        warnings.simplefilter("ignore")
    # SIGTERM (systemd stop, timeouts) and SIGHUP (the terminal or ssh session went away)
    # unwind like Ctrl-C in every command, so every job cleans up: backup jobs aborted,
    # checkpoints not moved, scratch files removed, sandboxes and NBD servers stopped.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    # the job's start and end events frame everything; the end event comes whatever
    # happens (with the exit code and the error line), so a reader of --json-events
    # always learns the outcome
    events.start(job_kind(ns), **job_args(ns))
    g: Globals | None = None
    code, message = 1, None
    outcome: Outcome = "failed"
    line = ""  # the error line, printed after the end event has cleared any bars
    try:
        g = Globals.from_args(ns, events)
        code = int(ns.func(ns, g))
        outcome = "ok" if code == 0 else "failed"
        return code
    except VmdrError as exc:
        code, message = exc.exit_code, one_line(redact_text(exc.message))
        line = f"vmdr: error: {message}\n"
        return code
    except KeyboardInterrupt:
        code, message, outcome = EXIT_INTERRUPTED, "interrupted", "interrupted"
        line = "vmdr: interrupted\n"
        return code
    except BrokenPipeError:
        code, message = 1, "broken pipe"
        return code
    except Exception as exc:
        message = f"internal error: {type(exc).__name__}: {one_line(redact_text(str(exc)))}"
        if debug:
            raise
        line = f"vmdr: {message} (run with --debug for a traceback and report it)\n"
        return 1
    finally:
        if g is not None and g.outcome is not None and outcome != "interrupted":
            outcome = g.outcome
        events.finish(outcome, code, message, g.result_doc if g is not None else None)
        if line and not json_events:
            sys.stderr.write(line)

if __name__ == "__main__":
    sys.exit(main())
