"""The commands a replica cycle runs at the DR host (``sh -c`` scripts, the same here for a
local target or over ssh) and the pure helpers that build their arguments and read their
answers; :mod:`vmdr.jobs.replicate_site` runs them."""

from __future__ import annotations

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
for s in /run/libvirt/libvirt-sock /run/libvirt/virtqemud-sock; do  # for the next cycles:
  [ -S "$s" ] && { printf 'libvirt %s\n' "$s"; break; }  # libvirt over a forward
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
