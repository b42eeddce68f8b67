"""The event model (vmdr.events) and its renderers (vmdr.ui): order, throttling, the JSON
form of docs/events.md, and what the terminal shows."""

from __future__ import annotations

import io
import json
import threading
from datetime import UTC, datetime
from typing import Any, cast

from vmdr.events import (
    EVENT_TYPES,
    BytesProgress,
    FanOut,
    JobError,
    JobEvents,
    JobFinished,
    JobStarted,
    JobWarning,
    ListSink,
    PhaseStarted,
)
from vmdr.ui import make_sink
from vmdr.ui.jsonlines import JsonLinesRenderer, event_line
from vmdr.ui.terminal import TerminalRenderer, WarningPrinter

T = datetime(2026, 12, 6, 1, 2, 3, 456000, tzinfo=UTC)


def _job(sink: Any, interval: float = 0.25) -> JobEvents:
    return JobEvents(sink, job="j1", clock=lambda: T, interval=interval)


def test_a_job_frames_its_events_in_order() -> None:
    sink = ListSink()
    ev = _job(sink)
    ev.start("image backup", name="img")
    ev.start("again")  # ignored: one start per job
    ev.phase("read", item="img")
    ev.warning("slow disk", "img")
    p = ev.progress("img", 8)
    p.advance(8)
    p.finish()
    p.finish()  # once
    ev.finish("ok", 0, result={"snapshot": "abc"})
    ev.finish("failed", 1, "late")  # once
    kinds = [type(e) for e in sink.events]
    assert kinds == [JobStarted, PhaseStarted, JobWarning, BytesProgress, BytesProgress,
                     JobFinished]
    assert [e.seq for e in sink.events] == list(range(1, 7))
    assert {e.job for e in sink.events} == {"j1"}
    end = cast(JobFinished, sink.events[-1])
    assert end.outcome == "ok" and end.result == {"snapshot": "abc"} and end.message is None
    assert [e.final for e in sink.of(BytesProgress)] == [False, True]


def test_a_failure_always_has_an_error_before_the_end() -> None:
    sink = ListSink()
    ev = _job(sink)
    ev.start("restore")
    ev.finish("failed", 14, "no snapshot named 'x'")
    err, end = sink.events[-2:]
    assert isinstance(err, JobError) and err.exit_code == 14 and err.item is None
    assert isinstance(end, JobFinished) and end.exit_code == 14 and end.result is None
    # an item error does not stand in for the job's own
    sink = ListSink()
    ev = _job(sink)
    ev.error("vm1 failed", 5, "vm1")
    ev.finish("partial", 1, "1 of 2 VMs failed")
    assert [type(e) for e in sink.events] == [JobError, JobError, JobFinished]
    sink = ListSink()  # a command that returns its exit code without raising
    ev = _job(sink)
    ev.error("no domain 'web1'", 11, "web1")
    ev.finish("failed", 11)
    assert cast(JobFinished, sink.events[-1]).message == "web1: no domain 'web1'"
    assert [type(e) for e in sink.events] == [JobError, JobError, JobFinished]
    sink = ListSink()
    ev = _job(sink)
    ev.error("boom", 6)
    ev.finish("failed", 6, "boom")
    assert [type(e) for e in sink.events] == [JobError, JobFinished]


def test_progress_is_throttled_per_item_and_thread_safe() -> None:
    sink = ListSink()
    ev = _job(sink, interval=10.0)
    a, b = ev.progress("vm/vda", 4000 * 8), ev.progress("vm/vdb")

    def work(p: Any) -> None:
        for _ in range(4000):
            p.advance(1)

    threads = [threading.Thread(target=work, args=(p,)) for p in (a, a, b, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a.finish()
    b.finish()
    per_item = {i: [e for e in sink.of(BytesProgress) if e.item == i] for i in ("vm/vda",
                                                                          "vm/vdb")}
    # the first advance reports at once, then nothing within the interval, then the final
    assert [len(v) for v in per_item.values()] == [2, 2]
    assert per_item["vm/vda"][-1].done == 8000 and per_item["vm/vda"][-1].final
    assert per_item["vm/vdb"][-1].total is None
    assert [e.seq for e in sink.events] == sorted(e.seq for e in sink.events)


def test_update_sets_absolute_counts() -> None:
    sink = ListSink()
    p = _job(sink, interval=0).progress("x/vda")
    p.update(5, 10)
    p.update(10, 10)
    assert [(e.done, e.total) for e in sink.of(BytesProgress)] == [(5, 10), (10, 10)]


def test_json_lines_match_the_documented_schema() -> None:
    buf = io.StringIO()
    ev = _job(JsonLinesRenderer(buf))
    ev.start("backup", vms=["web1"])
    ev.phase("read", "web1: reading 1 disk", "web1", {"n": 1})
    ev.progress("web1/vda", 10).advance(4)
    ev.warning("guest agent not answering\nsecond line", "web1")
    ev.error("disk gone", 5, "web1")
    ev.finish("failed", 1, "1 of 1 VMs failed", {"results": []})
    lines = buf.getvalue().split("\n")
    assert lines[-1] == "" and all(ln.startswith("{") and ln.endswith("}")
                                   for ln in lines[:-1])
    docs = [json.loads(ln) for ln in lines[:-1]]
    common = {"type", "time", "job", "seq"}
    assert [d["type"] for d in docs] == ["start", "phase", "progress", "warning", "error",
                                         "error", "end"]
    assert all(common <= d.keys() and d["time"] == "2026-12-06T01:02:03.456000Z"
               and d["job"] == "j1" for d in docs)
    start, phase, prog, warn, err, _, end = docs
    assert start.keys() == common | {"kind", "args", "schema", "pid"}
    assert start["args"] == {"vms": ["web1"]} and start["schema"] == 1
    assert phase.keys() == common | {"phase", "item", "message", "detail"}
    assert prog.keys() == common | {"item", "done", "total", "elapsed_s", "final", "unit"}
    assert (prog["done"], prog["total"], prog["unit"]) == (4, 10, "bytes")
    assert warn == {**warn, "message": "guest agent not answering\nsecond line",
                    "item": "web1"}
    assert err.keys() == common | {"message", "exit_code", "item"}
    assert end.keys() == common | {"outcome", "exit_code", "message", "result", "duration_s"}
    assert (end["outcome"], end["exit_code"], end["result"]) == ("failed", 1, {"results": []})
    assert {t.type for t in EVENT_TYPES} == {"start", "phase", "progress", "warning", "error",
                                             "end"}


def test_event_line_survives_odd_results() -> None:
    ev = ListSink()
    _job(ev).finish("ok", 0, result={"ids": {b"\x01"}, "when": T})
    line = event_line(ev.events[0])
    doc = json.loads(line)
    assert line.count("\n") == 1 and doc["result"]["ids"] == ["01"]
    assert doc["result"]["when"].startswith("2026-12-06 01:02:03")


class _Tty(io.StringIO):
    encoding = "utf-8"

    def isatty(self) -> bool:
        return True


def test_terminal_draws_one_bar_per_item_and_cleans_up() -> None:
    out = _Tty()
    r = TerminalRenderer(out, unicode=True)
    ev = _job(r, interval=0)
    ev.start("backup")
    ev.phase("read", "web1: reading 2 disks (full, checkpoint, quiesced)", "web1")
    a, b = ev.progress("web1/vda", 8 << 20), ev.progress("web1/vdb", 4 << 20)
    a.advance(2 << 20)
    b.advance(1 << 20)
    ev.warning("guest agent not answering", "web1")
    a.advance(6 << 20)
    a.finish()
    b.advance(3 << 20)
    b.finish()
    ev.finish("ok", 0)
    text = out.getvalue()
    assert "vmdr: web1: reading 2 disks (full, checkpoint, quiesced)\n" in text
    assert "vmdr: warning: web1: guest agent not answering\n" in text
    assert "\x1b[2F\x1b[J" in text  # two bars redrawn in place
    plain = _strip(text)
    assert "web1/vda" in plain and " 25%" in plain and "2.0 MiB/8.0 MiB" in plain
    done = [ln for ln in plain.splitlines() if "100%" in ln and " in 0:0" in ln]
    assert {ln.split()[0] for ln in done} == {"web1/vda", "web1/vdb"}
    assert r.items == {} and r._drawn == 0


def test_terminal_keeps_the_bars_of_what_failed() -> None:
    out = _Tty()
    r = TerminalRenderer(out, unicode=True)
    ev = _job(r, interval=0)
    ev.progress("web1/vda", 100).advance(30)
    ev.progress("db1/vda", 100).advance(60)
    ev.error("disk gone", 5, "web1")
    assert list(r.items) == ["db1/vda"]
    ev.finish("interrupted", 130, "interrupted")
    plain = _strip(out.getvalue())
    assert "vmdr: web1: failed: disk gone" in plain
    tail = plain.rstrip("\n").splitlines()
    assert tail[-1].startswith("db1/vda") and " 60%" in tail[-1]  # left where it stopped
    assert any(ln.startswith("web1/vda") and " 30%" in ln for ln in tail)
    assert r._drawn == 0


def test_terminal_without_total_and_without_unicode() -> None:
    out = _Tty()
    r = TerminalRenderer(out, unicode=False)
    ev = _job(r, interval=0)
    p = ev.progress("check")
    p.advance(5 << 20)
    p.finish()
    plain = _strip(out.getvalue())
    assert "━" not in plain and "#" in plain and "5.0 MiB" in plain


def _strip(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)


def test_make_sink_picks_by_options_and_tty() -> None:
    assert isinstance(make_sink(json_events=True, stream=_Tty()), JsonLinesRenderer)
    assert isinstance(make_sink(bars=True, stream=_Tty()), TerminalRenderer)
    pipe = io.StringIO()
    sink = make_sink(bars=True, stream=pipe)
    assert isinstance(sink, WarningPrinter)
    ev = _job(sink, interval=0)
    ev.start("backup")
    ev.phase("read", "reading")
    ev.progress("x", 1).advance(1)
    ev.warning("careful", "web1")
    ev.finish("ok")
    assert pipe.getvalue() == "vmdr: warning: web1: careful\n"  # quiet but for warnings
    assert isinstance(make_sink(bars=False, stream=_Tty()), WarningPrinter)


def test_fan_out() -> None:
    a, b = ListSink(), ListSink()
    _job(FanOut([a, b])).warning("w")
    assert len(a.events) == len(b.events) == 1


def test_a_failed_vm_is_an_item_error_with_its_warnings(
        tmp_path: Any, monkeypatch: Any) -> None:
    """backup_many: each VM's warnings and failure are events of that VM; the job goes on."""
    from vmdr.errors import DomainNotFound
    from vmdr.jobs.vmbackup import VMBackupOptions, backup_many

    monkeypatch.setenv("VMDR_LOCK_DIR", str(tmp_path))

    class Repo:
        id = "r" * 32

    class Hv:
        uri = "test:///default"

        def cleanup_leftovers(self, name: str, prefix: str, scratch: str) -> list[str]:
            if name == "gone":
                raise DomainNotFound(f"no domain {name!r}")
            return ["a stale backup job"]

        def domain(self, name: str) -> Any:
            raise DomainNotFound(f"{name}: vanished")

    sink = ListSink()
    res = backup_many(Hv(), Repo(), ["gone", "web1"],  # type: ignore[arg-type]
                      lambda n: VMBackupOptions(), 2, _job(sink))
    assert [r.status for r in res] == ["failed", "failed"]
    errors = {e.item: e for e in sink.of(JobError)}
    assert errors["gone"].message == "no domain 'gone'" and errors["gone"].exit_code == 11
    (w,) = sink.of(JobWarning)
    assert (w.item, w.message) == ("web1", "cleaned up after an interrupted run: a stale "
                                           "backup job")
    assert [e.phase for e in sink.of(PhaseStarted) if e.item == "web1"] == ["prepare"]
