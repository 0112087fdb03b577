"""Prune rules (Borg's semantics), on hand-made archive series with known answers."""

from __future__ import annotations

import os
from datetime import datetime, timedelta

import pytest

from diskvault.archive.prune import parse_interval, plan_prune
from diskvault.errors import UsageError
from diskvault.repository.manifest import ArchiveRef


def refs(*stamps: str) -> list[ArchiveRef]:
    return [ArchiveRef(s, os.urandom(32), datetime.fromisoformat(s).timestamp()) for s in stamps]


def kept(decisions) -> dict[str, str]:
    return {d.ref.name: f"{d.rule} #{d.number}" for d in decisions if d.keep}


def test_keep_last():
    a = refs("2024-01-01 10:00", "2024-01-02 10:00", "2024-01-03 10:00", "2024-01-04 10:00")
    d = plan_prune(a, {"secondly": 2})
    assert kept(d) == {"2024-01-04 10:00": "secondly #1", "2024-01-03 10:00": "secondly #2"}
    assert [x.ref.name for x in d] == sorted((x.name for x in a), reverse=True)  # newest first


def test_daily_keeps_the_newest_of_each_day():
    a = refs("2024-01-01 10:00", "2024-01-01 20:00", "2024-01-02 10:00", "2024-01-03 09:00",
             "2024-01-03 11:00")
    assert kept(plan_prune(a, {"daily": 2})) == {"2024-01-03 11:00": "daily #1",
                                                 "2024-01-02 10:00": "daily #2"}


def test_too_few_periods_keep_the_oldest_too():
    a = refs("2024-01-01 10:00", "2024-01-01 20:00", "2024-01-02 10:00")
    assert kept(plan_prune(a, {"daily": 3})) == {
        "2024-01-02 10:00": "daily #1", "2024-01-01 20:00": "daily #2",
        "2024-01-01 10:00": "daily[oldest] #3"}


def test_later_rules_skip_archives_earlier_rules_kept():
    # Monday 2024-01-15 is ISO week 3; the 8th and 12th are week 2; the 3rd is week 1
    a = refs("2024-01-03 12:00", "2024-01-08 12:00", "2024-01-12 12:00", "2024-01-15 12:00",
             "2024-01-16 12:00")
    # daily takes the 16th; weekly: week 3's newest is taken already (but its period counts),
    # then week 2 (the 12th) and week 1 (the 3rd)
    assert kept(plan_prune(a, {"daily": 1, "weekly": 2})) == {
        "2024-01-16 12:00": "daily #1", "2024-01-12 12:00": "weekly #1",
        "2024-01-03 12:00": "weekly #2"}


def test_monthly_and_yearly():
    a = refs("2022-06-01 00:00", "2022-12-31 23:00", "2023-03-01 00:00", "2023-03-20 00:00",
             "2023-11-05 00:00")
    # yearly: 2023's newest is kept by monthly already; 2022 gives one; the quota of two
    # is not reached, so the oldest is kept as well
    assert kept(plan_prune(a, {"monthly": 2, "yearly": 2})) == {
        "2023-11-05 00:00": "monthly #1", "2023-03-20 00:00": "monthly #2",
        "2022-12-31 23:00": "yearly #1", "2022-06-01 00:00": "yearly[oldest] #2"}
    assert kept(plan_prune(a, {"monthly": 2, "yearly": 1})) == {
        "2023-11-05 00:00": "monthly #1", "2023-03-20 00:00": "monthly #2",
        "2022-12-31 23:00": "yearly #1"}


def test_within_keeps_everything_young():
    now = datetime(2024, 5, 10, 12, 0)
    stamps = [(now - timedelta(hours=h)).isoformat(sep=" ", timespec="minutes")
              for h in (1, 20, 47, 49, 100)]
    d = plan_prune(refs(*stamps), {}, within=parse_interval("2d"), now=now.timestamp())
    assert set(kept(d)) == set(stamps[:3])
    assert all(v.startswith("within") for v in kept(d).values())


def test_intervals_and_rule_errors():
    assert parse_interval("12H") == 12 * 3600 and parse_interval("1m") == 31 * 86400
    for bad in ("", "3", "2x", "0d", "-1d"):
        with pytest.raises(UsageError):
            parse_interval(bad)
    with pytest.raises(UsageError, match="at least one"):
        plan_prune(refs("2024-01-01 00:00"), {})
