"""Progress lines: a sane rate and ETA from the start, log lines when not on a terminal.

The clock is injected: every figure below is exact, and no test sleeps.
"""

from __future__ import annotations

import io
import json

from diskvault.cli import progress as P
from diskvault.cli.progress import Progress, fmt_duration

MB = 1_000_000


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(mode: str) -> tuple[Progress, Clock, io.StringIO]:
    clock, out = Clock(), io.StringIO()
    p = Progress("create", log_json=mode == "json", out=out, clock=clock,
                 wall_clock=lambda: 1.7e9, is_tty=mode == "tty")
    return p, clock, out


def test_no_rate_or_eta_from_the_first_samples():
    p, clock, _ = make("tty")
    # the old display said "ETA 7777:25 575 B/s" here: a tiny first sample after a slow start
    p(575, 10_000 * MB)
    assert p.rate() is None and p.eta() is None
    clock.t += 0.5
    p(50 * MB, 10_000 * MB)
    assert p.rate() is None  # half a second of samples: too little to tell
    clock.t += 0.5
    p(100 * MB, 10_000 * MB)
    assert p.rate() == 100 * MB - 575  # over the second of samples
    assert p.eta() is None  # a rate, but no ETA before MIN_ETA_SPAN
    clock.t += 1.0
    p(200 * MB, 10_000 * MB)
    assert p.eta() == (10_000 - 200) * MB / p.rate()  # ~98 s, not hours
    assert 97 < p.eta() < 99
    assert p.message() == "create: 200.00 MB of 10.00 GB (2.0%), 100.00 MB/s, ETA 1:38"


def test_rate_follows_a_change_of_speed_within_the_window():
    p, clock, _ = make("plain")
    done = 0
    for _ in range(60):  # one minute at 10 MB/s
        clock.t += 1
        done += 10 * MB
        p(done, None)
    assert abs(p.rate() - 10 * MB) < 1
    for _ in range(60):  # then one minute at 1 MB/s: the window forgets the fast part
        clock.t += 1
        done += MB
        p(done, None)
    assert abs(p.rate() - MB) < 1
    assert len(p.samples) <= P.WINDOW + 2  # the window stays bounded


def test_plain_lines_every_interval_when_not_a_terminal():
    p, clock, out = make("plain")
    for i in range(1, 101):  # 100 s at 5 MB/s, a sample every second
        clock.t += 1
        p(i * 5 * MB, 500 * MB)
    p.done()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    # the first sample starts the clock; then one line per LOG_INTERVAL, and one at the end
    assert len(lines) == 99 // int(P.LOG_INTERVAL) + 1
    assert lines[0] == "create: 55.00 MB of 500.00 MB (11.0%), 5.00 MB/s, ETA 1:29"
    assert lines[-1] == "create: done, 500.00 MB in 1:39"


def test_json_lines_like_borgs_progress_percent():
    p, clock, out = make("json")
    for i in range(1, 31):
        clock.t += 1
        p(i * MB, 30 * MB)
    p.done()
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["finished"] for r in records] == [False, False, True]
    first = records[0]
    assert {k: first[k] for k in ("type", "msgid", "current", "total", "time")} == {
        "type": "progress_percent", "msgid": "create", "current": 11 * MB, "total": 30 * MB,
        "time": 1.7e9}
    assert first["rate"] == MB and first["eta"] == 19.0
    assert records[-1]["current"] == 30 * MB


def test_terminal_line_is_redrawn_and_cleared():
    p, clock, out = make("tty")
    for i in range(1, 11):
        clock.t += 0.1
        p(i * MB, None)
    p.done()
    text = out.getvalue()
    assert "\n" not in text and text.count("\r") == 1 + 5 + 1  # first, every 0.2 s, clear
    assert text.endswith("\r" + " " * 79 + "\r")


def test_durations():
    assert [fmt_duration(s) for s in (0, 59.4, 61, 3600, 7384)] == [
        "0:00", "0:59", "1:01", "1:00:00", "2:03:04"]
