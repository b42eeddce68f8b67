"""``vmdr agent``: the daemon, its API tokens and dashboard users."""

from __future__ import annotations

import argparse
import getpass
import os
import sys

from vmdr.cli.common import Globals, emit_json, out
from vmdr.errors import UsageError


def _history(g: Globals):  # type: ignore[no-untyped-def]
    from vmdr.agent.history import History

    return History.open(g.config.agent.state, g.config.agent.database)


def cmd_agent(ns: argparse.Namespace, g: Globals) -> int:
    """Check everything that can be checked here (one-line errors, exit 2), then exec the
    lean agent process (vmdr.agent.__main__) under the same PID."""
    from vmdr.agent.scheduler import schedules
    from vmdr.agent.server import listen_address

    schedules(g.config)
    listen_address(g.config)
    argv = [sys.executable, "-m", "vmdr.agent"]
    if g.config.path:
        argv += ["--config", g.config.path]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, dict(os.environ, MALLOC_ARENA_MAX="2"))  # noqa: S606


def cmd_token_create(ns: argparse.Namespace, g: Globals) -> int:
    from vmdr.agent.auth import create_token

    h = _history(g)
    token = create_token(h, ns.role, ns.name, ns.expires)
    out(f"created a {ns.role} token; it is shown once, keep it secret:")
    out(token)
    return 0


def cmd_token_list(ns: argparse.Namespace, g: Globals) -> int:
    rows = _history(g).tokens()
    if g.json:
        emit_json(rows)
        return 0
    out(f"{'ID':<10} {'ROLE':<9} NAME")
    for r in rows:
        out(f"{r['id']:<10} {r['role']:<9} {r['name']}")
    return 0


def cmd_token_revoke(ns: argparse.Namespace, g: Globals) -> int:
    if not _history(g).delete_token(ns.id):
        raise UsageError(f"no token with id {ns.id}")
    out(f"revoked token {ns.id}")
    return 0


def cmd_user_add(ns: argparse.Namespace, g: Globals) -> int:
    from vmdr.agent.auth import add_user

    if ns.password_from:
        from vmdr.credentials import read_secret

        pw = read_secret(ns.password_from)
    elif sys.stdin.isatty():
        pw = getpass.getpass(f"Password for {ns.name}: ")
        if pw != getpass.getpass("Repeat: "):
            raise UsageError("the passwords do not match")
    else:
        pw = sys.stdin.readline().rstrip("\n")
    add_user(_history(g), ns.name, ns.role, pw)
    out(f"user {ns.name} ({ns.role}) saved")
    return 0


def _duration(text: str) -> float:
    from vmdr.config import parse_duration

    d = parse_duration(text)
    if d is None or d <= 0:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90d, 12h)")
    return d


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "agent", parents=parents, help="run the agent: schedules, job history, API, dashboard",
        description="Run the vmdr agent in the foreground (logs to stderr; run it under "
                    "systemd with contrib/vmdr-agent.service). It runs the [policies.*] of the "
                    "config on their schedules, records every job, and serves the REST API, "
                    "the dashboard and /metrics on [agent] listen. SIGHUP reloads the config.")
    p.set_defaults(func=cmd_agent)
    asub = p.add_subparsers(dest="agent_command", metavar="SUBCOMMAND")
    t = asub.add_parser("token", parents=parents, help="API tokens",
                        description="Create, list and revoke API bearer tokens.")
    tsub = t.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    c = tsub.add_parser("create", parents=parents, help="create a token (printed once)",
                        description="Create a bearer token. It is printed once, alone on "
                                    "the last line; only its hash is stored.")
    c.add_argument("--role", required=True, choices=["admin", "operator", "auditor"],
                   help="auditor reads; operator also backs up, verifies, copies and "
                        "restores to new names; admin does everything")
    c.add_argument("--name", help="a label for the token")
    c.add_argument("--expires", type=_duration, metavar="DURATION",
                   help="valid for this long (e.g. 90d); default: until revoked")
    c.set_defaults(func=cmd_token_create)
    ls = tsub.add_parser("list", parents=parents, help="list tokens (never their values)")
    ls.set_defaults(func=cmd_token_list)
    rv = tsub.add_parser("revoke", parents=parents, help="revoke a token by id")
    rv.add_argument("id", help="the token id (second field of the token, or from list)")
    rv.set_defaults(func=cmd_token_revoke)
    u = asub.add_parser("user", parents=parents, help="dashboard users",
                        description="Users who log in to the dashboard with a password.")
    usub = u.add_subparsers(dest="user_command", metavar="ACTION", required=True)
    ua = usub.add_parser("add", parents=parents, help="add or change a user",
                         description="Add a user (or set a new password). The password is "
                                     "read from the terminal, from --password-from or from "
                                     "the first line of standard input; stored as Argon2id.")
    ua.add_argument("name")
    ua.add_argument("--role", required=True, choices=["admin", "operator", "auditor"])
    ua.add_argument("--password-from", dest="password_from", metavar="FILE",
                    help="read the user's password from this 0600 file")
    ua.set_defaults(func=cmd_user_add)
