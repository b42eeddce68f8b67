"""systemd calendar events: documented examples, bad input, and properties of next_after."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmdr.agent.calendar import CalendarError, parse
from vmdr.errors import UsageError

UTC = dt.UTC
# Sunday 6 December 2026, 01:50:13
NOW = dt.datetime(2026, 12, 6, 1, 50, 13, tzinfo=UTC)


@pytest.mark.parametrize(("event", "expected"), [
    ("minutely", "2026-12-06 01:51:00"),
    ("hourly", "2026-12-06 02:00:00"),
    ("daily", "2026-12-07 00:00:00"),
    ("daily 02:00", "2026-12-06 02:00:00"),
    ("weekly", "2026-12-07 00:00:00"),
    ("weekly 03:30", "2026-12-07 03:30:00"),
    ("monthly", "2027-01-01 00:00:00"),
    ("quarterly", "2027-01-01 00:00:00"),
    ("yearly", "2027-01-01 00:00:00"),
    ("mon..fri 02:00", "2026-12-07 02:00:00"),
    ("Sat,Sun 10:00", "2026-12-06 10:00:00"),
    ("fri..mon 01:00", "2026-12-07 01:00:00"),
    ("*:0/15", "2026-12-06 02:00:00"),
    ("*:5/15", "2026-12-06 02:05:00"),
    ("8..18:00/30", "2026-12-06 08:00:00"),
    ("*-*-01 00:00", "2027-01-01 00:00:00"),
    ("*-02-29", "2028-02-29 00:00:00"),
    ("12-24 18:00", "2026-12-24 18:00:00"),
    ("2027-03-01 04:05:06", "2027-03-01 04:05:06"),
    ("*:*:0/20", "2026-12-06 01:50:20"),
    ("01:50", "2026-12-07 01:50:00"),
    ("01:50:13", "2026-12-07 01:50:13"),  # strictly after now
])
def test_documented_examples(event: str, expected: str) -> None:
    nxt = parse(event).next_after(NOW)
    assert nxt is not None and nxt.strftime("%Y-%m-%d %H:%M:%S") == expected


@pytest.mark.parametrize("bad", ["", "sometimes", "daily 25:00", "*:61", "hourly 02:00",
                                 "mon..funday", "*-13-01", "*:0/0", "2027-02-29",
                                 "daily 02:00 extra", "1..2..3:00", "x:00"])
def test_bad_events_are_one_line_usage_errors(bad: str) -> None:
    with pytest.raises(CalendarError) as e:
        parse(bad)
    assert isinstance(e.value, UsageError) and e.value.exit_code == 2
    assert "\n" not in e.value.message


def test_keeps_the_time_zone_of_now() -> None:
    cet = dt.timezone(dt.timedelta(hours=1))
    nxt = parse("daily 02:00").next_after(dt.datetime(2026, 12, 6, 1, 0, tzinfo=cet))
    assert nxt == dt.datetime(2026, 12, 6, 2, 0, tzinfo=cet)
    with pytest.raises(ValueError):
        parse("daily").next_after(dt.datetime(2026, 1, 1))


def _field(lo: int, hi: int) -> st.SearchStrategy[str]:
    n = st.integers(lo, hi)
    return st.one_of(
        st.just("*"), n.map(str),
        st.tuples(n, n).map(lambda t: f"{min(t)}..{max(t)}"),
        st.tuples(n, st.integers(1, hi - lo + 1)).map(lambda t: f"{t[0]}/{t[1]}"),
        st.lists(n, min_size=1, max_size=3).map(lambda v: ",".join(map(str, v))),
    )


events = st.tuples(
    st.sampled_from(["", "mon..fri ", "sat,sun ", "wed "]),
    st.sampled_from(["", "*-*-* ", "*-*-1..15 ", "*-1/2-* "]),
    _field(0, 23), _field(0, 59),
).map(lambda t: f"{t[0]}{t[1]}{t[2]}:{t[3]}")
instants = st.datetimes(min_value=dt.datetime(2020, 1, 1), max_value=dt.datetime(2035, 1, 1),
                        timezones=st.just(UTC))


@settings(max_examples=150, deadline=None)
@given(events, instants)
def test_next_after_is_the_first_match_after_now(text: str, now: dt.datetime) -> None:
    ev = parse(text)
    nxt = ev.next_after(now)
    assert nxt is not None
    assert nxt > now and ev.matches(nxt) and nxt.tzinfo == now.tzinfo
    # nothing matches in between: walk every minute (bounded) from now to nxt
    t = now.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
    end = min(nxt, now + dt.timedelta(days=3))
    while t < end:
        assert not ev.matches(t), f"{text}: {t} matches before {nxt}"
        t += dt.timedelta(minutes=1)
    # stepping on from a match gives the next one, in order
    after = ev.next_after(nxt)
    assert after is None or after > nxt


@settings(max_examples=100, deadline=None)
@given(events, instants, st.integers(1, 59))
def test_next_after_is_stable_between_occurrences(text: str, now: dt.datetime,
                                                  back: int) -> None:
    ev = parse(text)
    nxt = ev.next_after(now)
    assert nxt is not None
    probe = max(now, nxt - dt.timedelta(seconds=back))
    assert ev.next_after(probe) == nxt or probe == nxt
