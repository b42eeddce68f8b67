"""``vmdr copy --to REPO2 [NAME...]``: offsite copies between any two repositories.

Also the helpers ``vmdr repo init --from-repo`` / ``--object-lock-days`` use to open the
source repository and prepare an Object Lock bucket.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
from collections.abc import Callable

from vmdr.cli.common import Globals, out
from vmdr.credentials import read_secret, read_secret_bytes
from vmdr.jobs.copy import CopyOptions, copy_snapshots
from vmdr.repository.repo import Repository
from vmdr.storage.appendonly import AppendOnlyBackend
from vmdr.storage.base import Backend
from vmdr.storage.file import FileBackend
from vmdr.storage.objectlock import with_object_lock
from vmdr.storage.registry import open_backend, redact
from vmdr.storage.throttle import ThrottlingBackend, TokenBucket, parse_rate
from vmdr.storage.wrappers import wrap
from vmdr.ui.progress import human_bytes


def open_with(
    url: str, passphrase: Callable[[], str], key_file: str | None,
    bucket: TokenBucket | None = None, append_only: bool = False,
) -> Repository:
    """Open the repository at *url* through the standard wrappers, plus a bandwidth
    limit (not applied to local directories) and append-only mode when asked."""
    raw: Backend = open_backend(url)
    try:
        raw = with_object_lock(raw)
        if bucket is not None and not isinstance(raw, FileBackend):
            raw = ThrottlingBackend(raw, bucket)
        backend = wrap(raw)
        if append_only:
            backend = AppendOnlyBackend(backend)
        keyfile = read_secret_bytes(key_file) if key_file else None
        return Repository.open(backend, passphrase=passphrase, keyfile=keyfile)
    except BaseException:
        raw.close()
        raise


def _env_passphrase(flag: str | None, env_pw: str, env_file: str,
                    fallback: Callable[[], str]) -> Callable[[], str]:
    def get() -> str:
        if env_pw in os.environ:
            return os.environ[env_pw]
        path = flag or os.environ.get(env_file)
        return read_secret(path) if path else fallback()

    return get


def open_from_repo(ns: argparse.Namespace, g: Globals) -> Repository:
    """The ``--from-repo`` source of ``repo init`` (its passphrase: ``--from-password-file``,
    ``VMDR_FROM_PASSWORD_FILE``, ``VMDR_FROM_PASSWORD``, else the same as the new one's)."""
    pw = _env_passphrase(ns.from_password_file, "VMDR_FROM_PASSWORD",
                         "VMDR_FROM_PASSWORD_FILE",
                         lambda: g.passphrase("Passphrase of the --from-repo repository: "))
    return open_with(ns.from_repo, pw, ns.from_key_file)


def cmd_copy(ns: argparse.Namespace, g: Globals) -> int:
    src_pw = functools.cache(g.passphrase)
    dst_pw = _env_passphrase(ns.to_password_file, "VMDR_TO_PASSWORD", "VMDR_TO_PASSWORD_FILE",
                             src_pw)
    dst_key = ns.to_key_file or os.environ.get("VMDR_TO_KEY_FILE")
    bucket = TokenBucket(parse_rate(ns.bwlimit)) if ns.bwlimit else None
    opts = CopyOptions(names=ns.names, latest=ns.latest, workers=ns.workers)
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(open_with(g.need_repo(), src_pw, g.key_file, bucket))
        dst = stack.enter_context(open_with(ns.to, dst_pw, dst_key, bucket,
                                            append_only=g.append_only))
        stack.enter_context(src.lock(exclusive=False, command="copy"))
        stack.enter_context(dst.lock(exclusive=False, command="copy"))
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
                   help="limit network bytes/s, e.g. 10M (remote reads and writes share it)")
    p.add_argument("--to-password-file", metavar="FILE",
                   help="destination passphrase file (env VMDR_TO_PASSWORD_FILE or "
                        "VMDR_TO_PASSWORD; default: the source passphrase)")
    p.add_argument("--to-key-file", metavar="FILE",
                   help="open the destination with a key file (env VMDR_TO_KEY_FILE)")
    p.add_argument("--workers", type=_positive, default=4,
                   help="chunks transferred in parallel (default 4)")
    p.set_defaults(func=cmd_copy)
