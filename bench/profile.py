"""Where the CPU of a restore and of an ingest goes, stage by stage (issue 13).

Backs the 4 GiB benchmark image up with the real CLI and restores it (cold page cache,
GNU time: the whole command's CPU), then replays both data paths in-process on one
thread, stage by stage, each timed in CPU seconds (``time.thread_time``): what vmdr
does per chunk, with the same calls (`O_DIRECT` reads and writes, AES-GCM into a reused
buffer, zstd into the aligned buffer, keyed BLAKE3). The difference between the CLI's
CPU and the sum of the stages is start-up (interpreter, imports), the key slot's KDF and
the thread pool's own costs. Each stage is set against what the primitive alone needs
(bench/_limits.py). Writes the ``profile`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _limits import Rates, measure
from _tools import PASSPHRASE, ROOT, WORK, clean_env, freeze_vmdr
from _util import GiB, build_image, drop_caches, machine, markdown_table, replace_section, timed


def _cli(code: str, cache: Path) -> tuple[str, dict[str, str]]:
    exe = str(Path(sys.executable).parent / "vmdr")
    return exe, clean_env(VMDR_PASSWORD=PASSPHRASE, VMDR_CACHE_DIR=str(cache), PYTHONPATH=code)


def stage_restore(repo_dir: Path, cache: Path, out: Path) -> dict[str, float]:
    import blake3
    import zstandard

    from vmdr.diskio.images import ALIGN, aligned_buffer
    from vmdr.repository.crypto import HEADER, HOLE, NONCE_LEN, TAG_LEN
    from vmdr.repository.repo import Repository
    from vmdr.storage.file import FileBackend

    os.environ["VMDR_CACHE_DIR"] = str(cache)
    T = time.thread_time
    st = dict.fromkeys(("open repository (KDF)", "read stored objects", "AES-256-GCM",
                        "zstd decompression", "BLAKE3 ID check", "write (O_DIRECT)"), 0.0)
    a = time.process_time()  # the KDF runs on argon2's own threads: count them all
    repo = Repository.open(FileBackend(str(repo_dir)), passphrase=lambda: PASSPHRASE)
    snap = repo.resolve("bench")
    st["open repository (KDF)"] = time.process_time() - a
    codec, disk = repo.codec, snap.disks[0]
    aead, key, zd = codec._aead, codec._id_key, zstandard.ZstdDecompressor()
    assert aead is not None and key is not None
    buf, scratch = aligned_buffer(repo.chunk_size), bytearray(repo.chunk_size + 1024)
    drop_caches()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    try:
        for i, oid in enumerate(disk.chunks):
            if oid == HOLE:
                continue
            n = min(repo.chunk_size, disk.size - i * repo.chunk_size)
            a = T()
            blob = repo.get_raw_chunk(oid)
            b = T()
            v = memoryview(blob)
            plen = len(blob) - HEADER.size - NONCE_LEN - TAG_LEN
            pay = memoryview(scratch)[:plen]
            aead.decrypt_into(v[4:16], v[16:], blob[:4] + oid, pay)
            c = T()
            if blob[2] == 1:
                zd.stream_reader(pay, read_size=plen).readinto(buf[:n])
            else:
                buf[:n] = pay
            d = T()
            if blake3.blake3(buf[:n], key=key).digest() != oid:
                raise SystemExit("ID mismatch")
            e = T()
            os.pwrite(fd, buf[: n - n % ALIGN], i * repo.chunk_size)
            f = T()
            for k, x in zip(list(st)[1:], (b - a, c - b, d - c, e - d, f - e), strict=True):
                st[k] += x
        a = T()
        os.fsync(fd)
        st["write (O_DIRECT)"] += T() - a
    finally:
        os.close(fd)
        os.unlink(out)
    repo.close()
    return st


def stage_ingest(image: Path) -> tuple[dict[str, float], int, int]:
    import blake3
    import zstandard
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from vmdr.diskio.images import RawSource
    from vmdr.repository.writer import chunk_ranges

    T = time.thread_time
    st = dict.fromkeys(("read image (O_DIRECT + copy)", "zero check", "BLAKE3 ID",
                        "zstd level 3", "AES-256-GCM", "write object + fsync"), 0.0)
    cs = 4 << 20
    src = RawSource(str(image))
    zc = zstandard.ZstdCompressor(level=3)
    aead, key = AESGCM(os.urandom(32)), os.urandom(32)
    zero = bytes(cs)
    objdir = WORK / "profile" / "objects"
    shutil.rmtree(objdir, ignore_errors=True)
    objdir.mkdir(parents=True)
    plain = stored = 0
    drop_caches()
    try:
        for off, length in chunk_ranges(src.extents(), cs, src.size):
            end = off + length
            while off < end:
                n = min(cs, end - off)
                a = T()
                data = src.read(off, n)
                b = T()
                isz = data == zero[:n]
                c = T()
                oid = blake3.blake3(data, key=key).digest()
                d = T()
                z = zc.compress(data) if not isz else b""
                e = T()
                nonce = os.urandom(12)
                blob = b"hdr!" + nonce + aead.encrypt(nonce, z, b"hdr!" + oid)
                f = T()
                p = objdir / oid.hex()
                wfd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                os.write(wfd, blob)
                os.fsync(wfd)
                os.close(wfd)
                g = T()
                for k, x in zip(st, (b - a, c - b, d - c, e - d, f - e, g - f), strict=True):
                    st[k] += x
                plain += n
                stored += len(blob)
                off += n
    finally:
        src.close()
        shutil.rmtree(objdir, ignore_errors=True)
    return st, plain, stored


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--no-doc", action="store_true")
    a = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/profile.py must run as root (it drops the page cache)")
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    image = build_image(WORK, 4 * GiB, files_budget=2_500_000_000,
                        random_size=4 * GiB * 300 // 4096)
    freeze_vmdr()
    from _tools import Vmdr

    sys.path.insert(0, Vmdr.code)
    base = WORK / "profile"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    repo, cache = base / "repo", base / "cache"
    exe, env = _cli(Vmdr.code, cache)
    loads = [os.getloadavg()[0]]
    timed([exe, "repo", "init", "-r", str(repo), "--json"], env)
    drop_caches()
    t_in = timed([exe, "image", "backup", str(image.path), "--name", "bench", "-r", str(repo),
                  "--json", "--no-progress"], env)
    loads.append(os.getloadavg()[0])
    drop_caches()
    out = base / "out.raw"
    t_re = timed([exe, "image", "restore", "bench", str(out), "-r", str(repo), "--format",
                  "raw", "--json", "--no-progress"], env)
    loads.append(os.getloadavg()[0])
    os.unlink(out)
    drop_caches()
    t_ver = timed([exe, "--version"], env)
    rs = stage_restore(repo, cache, out)
    loads.append(os.getloadavg()[0])
    ins, plain, stored = stage_ingest(image.path)
    loads.append(os.getloadavg()[0])
    rates = measure(image.path)
    body = report(started, rates, rs, ins, plain, stored, t_in.cpu, t_re.cpu, t_in.wall,
                  t_re.wall, t_ver.cpu, loads)
    print(body)
    if not a.no_doc:
        replace_section(a.doc, "profile", body, "vmdr benchmarks")
    shutil.rmtree(base, ignore_errors=True)
    return 0


def report(started: str, r: Rates, rs: dict[str, float], ins: dict[str, float], plain: int,
           stored: int, in_cpu: float, re_cpu: float, in_wall: float, re_wall: float,
           start_cpu: float, loads: list[float]) -> str:
    ncpu = os.cpu_count() or 1
    lim_r = {"AES-256-GCM": stored / r.aes_gcm, "zstd decompression": plain / r.zstd_decompress,
             "BLAKE3 ID check": plain / r.blake3}
    lim_i = {"AES-256-GCM": stored / r.aes_gcm, "zstd level 3": plain / r.zstd3_compress,
             "BLAKE3 ID": plain / r.blake3}

    def rows(st: dict[str, float], lim: dict[str, float], total: float) -> list[list[str]]:
        out = []
        for k, v in st.items():
            lv = lim.get(k)
            out.append([k, f"{v:.2f}", "–" if lv is None else f"{lv:.2f}",
                        "–" if lv is None else f"{v / lv:.2f}×"])
        s = sum(st.values())
        out.append(["**sum of the stages (one thread)**", f"**{s:.2f}**",
                    f"**{sum(lim.values()):.2f}**", ""])
        out.append(["start-up (`vmdr --version`, cold)", f"{start_cpu:.2f}", "–", ""])
        out.append(["**whole CLI command, GNU time (all threads)**", f"**{total:.2f}**",
                    f"**{sum(lim.values()):.2f}**", f"{total / sum(lim.values()):.2f}×"])
        return out

    h = ["stage", "CPU-s", "primitive limit, CPU-s", "stage / limit"]
    gb = 1e9
    return "\n".join([
        "## Profile: where restore and ingest CPU goes (issue 13)", "",
        f"*Generated by `bench/profile.py` on {started}; do not edit by hand.*", "",
        f"- **Machine:** {machine()}; 1-minute load average during the run "
        f"{min(loads):.1f}–{max(loads):.1f} (other helpers' tests shared the cores).",
        f"- **Data:** the 4 GiB benchmark image: {plain / gb:.2f} GB of allocated chunks read "
        f"and restored, {stored / gb:.2f} GB stored (zstd 3, AES-256-GCM, 4 MiB chunks).",
        f"- **Primitives:** {r.describe()}.",
        f"- **Whole commands** (cold cache, GNU time): ingest {in_wall:.1f} s wall, "
        f"{in_cpu:.1f} CPU-s; restore {re_wall:.1f} s wall, {re_cpu:.1f} CPU-s.",
        "- Stages are replayed in-process on one thread with the calls vmdr makes, each in "
        "CPU seconds; *read*, *write* and *fsync* are mostly system time (the kernel's copy "
        "and block layer). The whole command adds interpreter start-up, the argon2id key "
        "slot (t=3, 64 MiB, p=2: paid once per command), the manifest, and the thread "
        "pool.", "",
        "### Restore", "",
        markdown_table(h, rows(rs, lim_r, re_cpu)), "",
        "### Ingest", "",
        markdown_table(h, rows(ins, lim_i, in_cpu)), "",
        f"On {ncpu} cores the primitives alone allow a restore in "
        f"{sum(lim_r.values()) / ncpu:.1f} s and an ingest in "
        f"{sum(lim_i.values()) / ncpu:.1f} s of wall time.",
    ])


if __name__ == "__main__":
    sys.exit(main())
