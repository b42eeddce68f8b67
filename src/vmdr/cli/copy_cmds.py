"""``vmdr copy --to REPO2 [NAME...]``: offsite copies between any two repositories.

Also the helper ``vmdr repo init --from-repo`` uses to open its source repository.
"""

from __future__ import annotations

import argparse
import contextlib
import os

from vmdr.cli.common import Globals, out
from vmdr.jobs.copy import CopyOptions, copy_snapshots
from vmdr.repository.opening import OpenOptions, Passphrase, open_repository
from vmdr.repository.repo import Repository
from vmdr.storage.registry import redact
from vmdr.storage.throttle import bucket_for
from vmdr.ui.progress import human_bytes


def open_from_repo(ns: argparse.Namespace, g: Globals) -> Repository:
    """The ``--from-repo`` source of ``repo init`` (its passphrase: ``VMDR_FROM_PASSWORD``,
    ``--from-password-file`` or ``VMDR_FROM_PASSWORD_FILE``, else the same as the new
    one's)."""
    asked = Passphrase(env=None, prompt="Passphrase of the --from-repo repository: ")
    pw = Passphrase(env="VMDR_FROM_PASSWORD",
                    file=ns.from_password_file or os.environ.get("VMDR_FROM_PASSWORD_FILE"),
                    fallback=g.passphrase if g.passphrase.configured() else asked)
    return open_repository(OpenOptions(ns.from_repo, pw, ns.from_key_file), None)


def cmd_copy(ns: argparse.Namespace, g: Globals) -> int:
    dst_pw = Passphrase(env="VMDR_TO_PASSWORD",
                        file=ns.to_password_file or os.environ.get("VMDR_TO_PASSWORD_FILE"),
                        fallback=g.passphrase)
    dst_key = ns.to_key_file or os.environ.get("VMDR_TO_KEY_FILE")
    bucket = bucket_for(ns.bwlimit) if ns.bwlimit else None
    opts = CopyOptions(names=ns.names, latest=ns.latest, workers=ns.workers)
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(open_repository(
            g.open_options(bandwidth=bucket), "shared", "copy"))
        dst = stack.enter_context(open_repository(
            OpenOptions(ns.to, dst_pw, dst_key, append_only=g.append_only, bandwidth=bucket),
            "shared", "copy"))
        res = copy_snapshots(src, dst, opts, g.events)
    g.result(res.as_dict())
    if g.json:
        return 0
    for s in res.snapshots:
        verb = "copied " if s.status == "copied" else "present"
        out(f"{verb} {s.name}@{s.source_id[:8]} {s.time[:19]}"
            + (f" -> {s.id[:8]}" if s.id != s.source_id else ""))
    out(f"{len(res.copied)} of {len(res.snapshots)} snapshots copied to "
        f"{redact(res.destination)} ({res.mode}): {res.chunks_sent} chunks, "
        f"{human_bytes(res.bytes_sent)} sent, {res.chunks_present} already there, "
        f"{res.attachments_copied} attachments, in {res.duration_s:.1f}s")
    return 0


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "copy", parents=parents, help="copy snapshots to another repository (offsite)",
        description="Copy snapshots, and only the chunks the destination lacks, from --repo "
                    "to --to (directory, SFTP or S3 in any combination). Interrupted copies "
                    "resume; snapshots already at the destination are skipped.")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="VM or image names (globs) or NAME@ID; default: every snapshot")
    p.add_argument("--to", required=True, metavar="URL",
                   help="destination repository (a password in the URL is never printed)")
    p.add_argument("--latest", type=_positive, metavar="N",
                   help="only the latest N snapshots of each name")
    p.add_argument("--bwlimit", metavar="RATE",
                   help="limit network bytes/s, e.g. 10M (remote reads and writes share "
                        "it), or windows by the local time: 'mon..fri 08:00..18:00 20M; * 100M'")
    p.add_argument("--to-password-file", metavar="FILE",
                   help="destination passphrase file (env VMDR_TO_PASSWORD_FILE or "
                        "VMDR_TO_PASSWORD; default: the source passphrase)")
    p.add_argument("--to-key-file", metavar="FILE",
                   help="open the destination with a key file (env VMDR_TO_KEY_FILE)")
    p.add_argument("--workers", type=_positive, default=4,
                   help="chunks transferred in parallel (default 4)")
    p.set_defaults(func=cmd_copy)
