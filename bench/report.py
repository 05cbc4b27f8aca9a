"""The report of one benchmark run: Markdown tables, targets, problems, failures.

Owns: printing tables to stdout and progress, problems and failures to
stderr; the targets and whether they are met; the figures kept for --json;
and the statistics the tables print (nearest-rank percentiles, significant
digits, median [min–max]). Must not: start anything or measure.
"""

from __future__ import annotations

import math
import statistics
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.daemon import Greyd


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def sig(value: float, digits: int = 3) -> str:
    """A positive figure with `digits` significant digits and thousands separators."""
    if value <= 0 or math.isnan(value):
        return f"{value:g}"
    decimals = max(0, digits - 1 - math.floor(math.log10(value)))
    return f"{value:,.{decimals}f}"


def spread(values: list[float], digits: int = 3) -> str:
    """Median [min–max] of several runs; one run is just its value."""
    if len(values) == 1:
        return sig(values[0], digits)
    return (f"{sig(statistics.median(values), digits)} "
            f"[{sig(min(values), digits)}–{sig(max(values), digits)}]")


@dataclass
class Target:
    name: str
    value: float
    bound: float
    at_most: bool

    @property
    def met(self) -> bool:
        return self.value <= self.bound if self.at_most else self.value >= self.bound

    @property
    def text(self) -> str:
        return ("≤ " if self.at_most else "≥ ") + f"{self.bound:g}"

    @property
    def verdict(self) -> str:
        return "ok" if self.met else "MISS"


class Report:
    """Tables (Markdown), targets and failures of one run of the benchmark."""

    def __init__(self):
        self.targets: list[Target] = []
        self.failures: list[str] = []        # a measurement could not be made
        self.anomalies: list[str] = []       # greyd answered or logged what it should not
        self.data: dict = {}

    def table(self, title: str, headings: list[str], rows: list[list[str]],
              legend: list[str] = ()) -> None:
        print(f"\n## {title}\n")
        for line in legend:
            print(line)
        if legend:
            print()
        print("| " + " | ".join(headings) + " |")
        print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(headings))) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        sys.stdout.flush()

    def target(self, name: str, value: float, bound: float, at_most: bool) -> Target:
        target = Target(name, value, bound, at_most)
        self.targets.append(target)
        return target

    def logged(self, greyd: Greyd, where: str) -> None:
        """Note what greyd logged at warning or error level (most frequent first)."""
        for line, count in greyd.problems().most_common(5):
            self.anomalies.append(f"greyd ({where}) logged {count}×: {line[:300]}")

    def anomaly(self, message: str) -> None:
        self.anomalies.append(message)
        print(f"PROBLEM: {message}", file=sys.stderr, flush=True)

    def fail(self, message: str) -> None:
        self.failures.append(message)
        print(f"FAILED: {message}", file=sys.stderr, flush=True)


def progress(text: str) -> None:
    print(f"  … {text}", file=sys.stderr, flush=True)
