"""Which archives ``prune`` keeps: Borg's retention rules, with the rule that kept each.

Rules, applied in this order, each over the archives newest first:

- ``within``: every archive younger than an interval (``2d``, ``12H``, ``3w``, ``1m``
  = 31 days, ``1y`` = 365 days);
- ``secondly`` (= ``--keep-last``), ``minutely``, ``hourly``, ``daily``, ``weekly`` (ISO
  weeks), ``monthly``, ``yearly``: the newest archive of each of the last N periods
  (local time) that have an archive, skipping archives an earlier rule already kept.
  When fewer than N periods have archives, the oldest archive is kept too
  (``<rule>[oldest]``), so a young series is not thinned before it fills its quota.

Archives not kept by any rule are pruned. Only the archives passed in are considered:
the caller selects a series (``--glob-archives 'host1-sda-*'``).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime

from ..errors import UsageError
from ..repository.manifest import ArchiveRef

PERIODS = {
    "secondly": "%Y-%m-%d %H:%M:%S",
    "minutely": "%Y-%m-%d %H:%M",
    "hourly": "%Y-%m-%d %H",
    "daily": "%Y-%m-%d",
    "weekly": "%G-%V",
    "monthly": "%Y-%m",
    "yearly": "%Y",
}
_UNITS = {"S": 1, "M": 60, "H": 3600, "d": 86400, "w": 7 * 86400, "m": 31 * 86400,
          "y": 365 * 86400}


@dataclass
class Decision:
    ref: ArchiveRef
    keep: bool
    rule: str | None = None  # e.g. "daily", "within", "monthly[oldest]"
    number: int = 0  # the how-manieth archive that rule kept


def parse_interval(s: str) -> float:
    """``2d`` → seconds. Units: S M H (seconds, minutes, hours), d w m y."""
    m = re.fullmatch(r"(\d+)([SMHdwmy])", s.strip())
    if not m or int(m.group(1)) <= 0:
        raise UsageError(f"invalid interval {s!r}: a number and one of S M H d w m y, e.g. 7d")
    return int(m.group(1)) * _UNITS[m.group(2)]


def plan_prune(archives: list[ArchiveRef], keep: dict[str, int], within: float | None = None,
               now: float | None = None) -> list[Decision]:
    """Decisions for ``archives``, newest first. ``keep``: period rule → number to keep."""
    if not keep and within is None:
        raise UsageError("prune needs at least one --keep-* rule (or --keep-within)")
    for rule, n in keep.items():
        if rule not in PERIODS or n < 0:
            raise UsageError(f"invalid prune rule --keep-{rule} {n}")
    ordered = sorted(archives, key=lambda a: a.time, reverse=True)
    kept: dict[str, tuple[str, int]] = {}  # archive name → (rule, number)
    if within is not None:
        limit = (time.time() if now is None else now) - within
        for a in ordered:
            if a.time > limit:
                kept[a.name] = ("within", len(kept) + 1)
    for rule, fmt in PERIODS.items():
        if keep.get(rule):
            _keep_periods(ordered, rule, fmt, keep[rule], kept)
    return [Decision(a, a.name in kept, *kept.get(a.name, (None, 0))) for a in ordered]


def _keep_periods(ordered: list[ArchiveRef], rule: str, fmt: str, n: int,
                  kept: dict[str, tuple[str, int]]) -> None:
    last = None
    count = 0
    for a in ordered:
        period = datetime.fromtimestamp(a.time).strftime(fmt)
        if period == last:
            continue
        last = period
        if a.name not in kept:
            count += 1
            kept[a.name] = (rule, count)
            if count == n:
                return
    if ordered and count < n and ordered[-1].name not in kept:
        kept[ordered[-1].name] = (f"{rule}[oldest]", count + 1)
