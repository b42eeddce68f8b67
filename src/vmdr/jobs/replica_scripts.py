"""The commands a replica cycle runs at the DR host (``sh -c`` scripts, the same here for a
local target or over ssh) and the pure helpers that build their arguments and read their
answers; :mod:`vmdr.jobs.replicate_site` runs them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

_FREE = r"""mkdir -p -- "$1" || exit 3
df -P -B1 -- "$1" | awk 'NR==2 {print $4}'
"""
_READ = r"""[ -e "$1" ] || exit 3
cat -- "$1"
"""
_WRITE = r"""set -e
umask 077
cat > "$1.tmp"
sync "$1.tmp" 2>/dev/null || true
mv -f -- "$1.tmp" "$1"
"""
_CREATE = r"""[ -e "$1" ] && exit 0
qemu-img create -q -f qcow2 -o lazy_refcounts=off -- "$1" "$2"
"""
_SNAP_LIST = r"""qemu-img snapshot -l -U -- "$1" | awk 'NR>2 {print $2}'
"""
_SNAP = r"""img=$1; op=$2; shift 2
for tag in "$@"; do qemu-img snapshot "$op" "$tag" -- "$img" || exit 4; done
"""
_PINNED = r"""for f in "$1"/test-*/pin; do
  [ -e "$f" ] || continue
  flock -n -x "$f" true 2>/dev/null && continue
  cat -- "$f"; echo
done
exit 0
"""
_LIST_STATES = r"""for f in "$1"/*/replica.json; do [ -e "$f" ] && printf '%s\n' "$f"; done; exit 0
"""
_NBD = r"""img=$1 fmt=${2:-qcow2}
d=$(mktemp -d "${TMPDIR:-/tmp}/vmdr-rep.XXXXXX") || exit 3
sock=$d/nbd.sock
qemu-nbd --persistent --shared=2 --format="$fmt" --cache=writeback --aio=threads \
  --discard=unmap --socket="$sock" -- "$img" 2>"$d/err" &
p=$!
n=0
while [ ! -S "$sock" ]; do
  if ! kill -0 "$p" 2>/dev/null; then cat "$d/err" >&2; rm -rf -- "$d"; exit 4; fi
  n=$((n + 1)); [ "$n" -lt 600 ] || { kill "$p"; rm -rf -- "$d"; exit 5; }
  sleep 0.05
done
echo "ready $sock"
cat >/dev/null
kill "$p" 2>/dev/null
wait "$p"
rm -rf -- "$d"
"""


# what runs over the standby's disks (see :mod:`.replica_guard`): the HA marker, a
# failover's record, and each overlay over the standby's disks, ``busy`` when a process
# (QEMU) holds it open: ``qemu-img info`` without ``-U`` then fails on QEMU's image lock.
# Expects the replica directory in ``$dir``.
_GUARD = r"""if [ -f "$dir/ha-inuse.json" ]; then
  printf 'inuse %s\n' "$(tr '\n' ' ' < "$dir/ha-inuse.json")"
  # older than 10 minutes (the DR host's clock): an HA start takes seconds
  [ -n "$(find "$dir/ha-inuse.json" -mmin +10 2>/dev/null)" ] && echo inuse-aged
fi
[ -f "$dir/failover.json" ] && echo failedover
for f in "$dir"/ha/*.qcow2 "$dir"/failover/*.qcow2; do
  [ -e "$f" ] || continue
  if qemu-img info -- "$f" >/dev/null 2>&1; then printf 'overlay %s\n' "$f"
  else printf 'busy %s\n' "$f"; fi
done
"""
_PROBE = 'dir=$1\n' + _GUARD + "exit 0\n"
# the HA copy's marker, written before the standby's disks are touched (refused while a
# cycle's marker-less write is under way is QEMU's image lock's job). Arguments: DIR; the
# marker on stdin
_MARK = r"""set -e
umask 022
cat > "$1/ha-inuse.json.tmp"
sync "$1/ha-inuse.json.tmp" 2>/dev/null || true
mv -f -- "$1/ha-inuse.json.tmp" "$1/ha-inuse.json"
"""


# -- the three remote steps of one cycle (each ONE command over the control master) -------
#
# A command over the control master costs one ssh session (a channel, a login shell,
# ``sh``): about 0.1 s on a LAN. A cycle used to run ten or more of them, one per small
# step and per disk; it now runs at most three: :meth:`Site.begin`, :meth:`Site.serve`
# (only when something is written) and :meth:`Site.commit`.

_BEGIN = r"""dir=$1; shift
mkdir -p -m 0755 -- "$dir" || exit 3
df -P -B1 -- "$dir" | awk 'NR==2 {print $4}'
for f in "$@"; do
  if [ -f "$dir/$f" ]; then echo "file $(wc -c < "$dir/$f")"; cat -- "$dir/$f"
  else echo none; fi
done
for f in "$dir"/test-*/pin; do  # points a running test failover reads (see _PINNED)
  [ -e "$f" ] || continue
  flock -n -x "$f" true 2>/dev/null && continue
  printf 'pin %s\n' "$(cat -- "$f")"
done
""" + _GUARD + r"""for s in /run/libvirt/libvirt-sock /run/libvirt/virtqemud-sock; do
  [ -S "$s" ] && { printf 'libvirt %s\n' "$s"; break; }  # next cycles: libvirt, forwarded
done
exit 0
"""
# restore point TAG on every image and the tags to drop deleted where present (the images
# in parallel: nothing writes them meanwhile); only then the files, from stdin, each
# exactly LEN bytes (GNU head -c reads no further), written to a temporary name and
# renamed, the state last: a state never names a point that was not taken.
# Arguments: TAG NIMG IMG... NDROP DROP... (PATH LEN)...
_COMMIT = r"""set -u
tag=$1 n=$2; shift 2
nl='
'
imgs=
while [ "$n" -gt 0 ]; do imgs="$imgs$nl$1"; shift; n=$((n - 1)); done
n=$1; shift
drops=
while [ "$n" -gt 0 ]; do drops="$drops$nl$1"; shift; n=$((n - 1)); done
IFS=$nl
for img in $imgs; do  # an HA copy started meanwhile (see replica_guard): touch nothing
  [ -n "$img" ] || continue
  if [ -e "${img%/*}/ha-inuse.json" ]; then
    echo "replica in use: ${img%/*}/ha-inuse.json appeared during the cycle" >&2; exit 7
  fi
done
pids=
for img in $imgs; do
  [ -n "$img" ] || continue
  (
    if [ -n "$tag" ]; then qemu-img snapshot -c "$tag" -- "$img" || exit 4; fi
    [ -n "$drops" ] || exit 0
    have=$(qemu-img snapshot -l -U -- "$img" | awk 'NR>2 {print $2}') || exit 4
    for t in $drops; do
      [ -n "$t" ] || continue
      case "$nl$have$nl" in *"$nl$t$nl"*) qemu-img snapshot -d "$t" -- "$img" || exit 4;; esac
    done
  ) &
  pids="$pids $!"
done
IFS=' '
rc=0
for p in $pids; do wait "$p" || rc=4; done
[ "$rc" -eq 0 ] || exit "$rc"
while [ $# -gt 0 ]; do
  f=$1 len=$2; shift 2
  (umask 077; head -c "$len" > "$f.tmp") || exit 3
  [ "$(wc -c < "$f.tmp")" -eq "$len" ] || { rm -f -- "$f.tmp"; echo "short write: $f" >&2; exit 3; }
  sync "$f.tmp" 2>/dev/null || true
  mv -f -- "$f.tmp" "$f" || exit 3
done
exit 0
"""
# the standby's state file first (``writing``), disks created where missing, then one
# qemu-nbd per disk to serve, all in one fresh 0700 directory. Arguments: STATE LEN FMT
# (IMG SIZE|- SERVE)...
_SERVE = r"""set -u
stream=$1 helper=$2 commit=$3 st=$4 len=$5 fmt=$6; shift 6
if [ -n "$st" ] && [ -e "${st%/*}/ha-inuse.json" ]; then  # see replica_guard
  echo "replica in use: ${st%/*}/ha-inuse.json appeared during the cycle" >&2; exit 7
fi
if [ "$len" -gt 0 ]; then
  (umask 077; head -c "$len" > "$st.tmp") || exit 3
  [ "$(wc -c < "$st.tmp")" -eq "$len" ] || { rm -f -- "$st.tmp"; exit 3; }
  sync "$st.tmp" 2>/dev/null || true
  mv -f -- "$st.tmp" "$st" || exit 3
fi
d=$(mktemp -d "${TMPDIR:-/tmp}/vmdr-rep.XXXXXX") || exit 3
pids= i=0
while [ $# -gt 0 ]; do
  img=$1 size=$2 serve=$3; shift 3
  if [ "$size" != - ] && [ ! -e "$img" ]; then
    qemu-img create -q -f qcow2 -o lazy_refcounts=off -- "$img" "$size" \
      || { kill $pids 2>/dev/null; rm -rf -- "$d"; exit 6; }
  fi
  [ "$serve" = 1 ] || continue
  i=$((i + 1))
  qemu-nbd --persistent --shared=2 --format="$fmt" --cache=writeback --aio=threads \
    --discard=unmap --socket="$d/$i.sock" -- "$img" 2>"$d/$i.err" &
  pids="$pids $!"
done
i=0
for p in $pids; do
  i=$((i + 1)) n=0
  while [ ! -S "$d/$i.sock" ]; do
    if ! kill -0 "$p" 2>/dev/null; then
      cat "$d/$i.err" >&2; kill $pids 2>/dev/null; rm -rf -- "$d"; exit 4
    fi
    n=$((n + 1)); [ "$n" -lt 1500 ] || { kill $pids; rm -rf -- "$d"; exit 5; }
    sleep 0.02
  done
done
echo "ready $d"
rc=0
if [ "$stream" = 1 ]; then
  py=${VMDR_REPLICA_PYTHON:-/usr/bin/python3}
  [ -x "$py" ] || py=$(command -v python3) || py=
  if [ -n "$py" ]; then
    "$py" -c "$helper" "$d" "$i" || rc=$?
  else
    echo forward; cat >/dev/null
  fi
else
  cat >/dev/null
fi
[ -z "$pids" ] || { kill $pids 2>/dev/null; wait; }
rm -rf -- "$d"
# the cycle's commit (_COMMIT) in this same session, not in a new one: one line of its
# arguments, shell-quoted, then the files' bytes; end of input instead when the cycle
# failed (nothing is committed) or commits in a command of its own
if [ "$rc" -eq 0 ] && [ -n "$commit" ] && IFS= read -r line; then
  eval "set -- $line"
  sh -c "$commit" vmdr "$@" || rc=$?
fi
exit "$rc"
"""


# a session started early in a cycle (its ssh channel and login shell start while the
# source side works) that then runs the cycle's next step: its script and arguments come
# on stdin as a length line and that many bytes (shell-quoted words), the step's own input
# after them; end of input first: nothing to do
_STANDBY = r"""IFS= read -r n || exit 0
case "$n" in ''|*[!0-9]*) echo "bad standby request" >&2; exit 2;; esac
args=$(head -c "$n") || exit 2
eval "set -- $args"
script=$1; shift
exec sh -c "$script" vmdr "$@"
"""


def standby_request(script: str, args: list[str]) -> bytes:
    """What :data:`_STANDBY` reads to run ``sh -c script vmdr args...``."""
    import shlex

    blob = shlex.join([script, *args]).encode()
    return f"{len(blob)}\n".encode() + blob


def parse_begin(out: bytes, n: int) -> tuple[int, list[bytes | None]]:
    """The output of :data:`_BEGIN`: free bytes, then ``n`` files (ValueError if torn)."""
    free, files, _pins = parse_begin_pins(out, n)
    return free, files


def begin_libvirt_socket(out: bytes) -> str | None:
    """The ``libvirt PATH`` line of :data:`_BEGIN`'s output: the DR host's system libvirt
    socket (None when it has none of the usual ones)."""
    for ln in reversed(out.split(b"\n")[-4:]):
        if ln.startswith(b"libvirt /"):
            return ln[len(b"libvirt "):].decode(errors="replace").strip() or None
    return None


def parse_begin_pins(out: bytes, n: int) -> tuple[int, list[bytes | None], set[str]]:
    """:func:`parse_begin` plus the ``pin NAME`` lines after the files: the restore points
    a running test failover reads."""
    head, _, rest = out.partition(b"\n")
    free = int(head.decode().strip())
    files: list[bytes | None] = []
    for _ in range(n):
        line, nl, rest = rest.partition(b"\n")
        if not nl:
            raise ValueError("truncated")
        if line == b"none":
            files.append(None)
            continue
        kind, _, size = line.partition(b" ")
        ln = int(size)
        if kind != b"file" or len(rest) < ln:
            raise ValueError("truncated")
        files.append(rest[:ln])
        rest = rest[ln:]
    pins = {ln[4:].strip() for ln in rest.decode(errors="replace").splitlines()
            if ln.startswith("pin ") and ln[4:].strip()}
    return free, files, pins


def parse_begin_probe(out: bytes, n: int) -> Probe:
    """The :class:`Probe` in the output of :data:`_BEGIN` (after its files)."""
    _free, _, rest = out.partition(b"\n")
    for _ in range(n):
        line, _nl, rest = rest.partition(b"\n")
        if line != b"none":
            rest = rest[int(line.partition(b" ")[2]):]
    return parse_probe(rest.decode(errors="replace").splitlines())


def commit_args(files: list[tuple[str, bytes]], tag: str, images: list[str],
                drop: list[str]) -> tuple[list[str], bytes]:
    """The arguments and stdin of :data:`_COMMIT` (pure, for the unit tests)."""
    args = [tag, str(len(images)), *images, str(len(drop)), *drop]
    for path, data in files:
        args += [path, str(len(data))]
    return args, b"".join(data for _p, data in files)


def serve_args(state: tuple[str, bytes] | None, fmt: str,
               disks: list[tuple[str, int | None, bool]], helper: str = "",
               commit: str = "") -> tuple[list[str], bytes]:
    """The arguments and stdin head of :data:`_SERVE`: (image, size to create it with or
    None, serve it) per disk; ``helper`` the Python source that receives the framed
    stream at the target (none: the exports are forwarded); ``commit`` the script
    (:data:`_COMMIT`) it runs after the stream when asked (one line of arguments)."""
    path, data = state if state is not None else ("", b"")
    args = ["1" if helper else "0", helper, commit, path, str(len(data)), fmt]
    for img, size, serve in disks:
        args += [img, "-" if size is None else str(size), "1" if serve else "0"]
    return args, data


@dataclass
class Probe:
    """What :data:`_GUARD` found in a replica directory."""

    marker: dict[str, Any] | None = None  # ha-inuse.json (the HA copy)
    marker_bad: bool = False  # there, but unreadable: treated as in use
    marker_aged: bool = False  # written over 10 minutes ago (never stale before that)
    failed_over: bool = False  # failover.json
    overlays: list[str] = field(default_factory=list)  # overlays over the standby's disks
    busy: list[str] = field(default_factory=list)  # ... that a process holds open

    @property
    def clear(self) -> bool:
        return not (self.marker is not None or self.marker_bad or self.failed_over
                    or self.overlays or self.busy)


def parse_probe(lines: list[str]) -> Probe:
    """The :data:`_GUARD` lines (others are ignored)."""
    p = Probe()
    for ln in lines:
        if ln.startswith("inuse "):
            try:
                m = json.loads(ln[6:])
            except ValueError:
                m = None
            if isinstance(m, dict):
                p.marker = m
            else:
                p.marker_bad = True
        elif ln.strip() == "inuse-aged":
            p.marker_aged = True
        elif ln.strip() == "failedover":
            p.failed_over = True
        elif ln.startswith("overlay "):
            p.overlays.append(ln[8:].strip())
        elif ln.startswith("busy "):
            p.busy.append(ln[5:].strip())
    return p
