"""scripts/bench --quick: the benchmark runs end to end and prints every figure.

A smoke test only: it proves the script works (greyd and a sink started,
loaded and stopped; every section measured), never how fast anything is.
Postfix's smtp-source/smtp-sink are used when installed, else the script's
pure-Python client and sink.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench"
TITLES = ("Throughput and latency", "Memory (greyd's VmRSS)", "Store (10,000 triplets")
FIGURE_COLUMNS = {"greyd", "sink direct", "ratio", "value"}
NUMBER = r"[0-9][0-9,]*(?:\.[0-9]+)?"
FIGURE = re.compile(rf"({NUMBER})(?: \[({NUMBER})–({NUMBER})\])?")

pytestmark = pytest.mark.timeout(180)


def tables(text: str) -> dict[str, list[dict[str, str]]]:
    """Every Markdown table printed, by its '## ' title: rows as {heading: cell}."""
    found: dict[str, list[dict[str, str]]] = {}
    title, headings = None, None
    for line in text.splitlines():
        if line.startswith("## "):
            title, headings = line[3:], None
        elif line.startswith("|") and title is not None:
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            if headings is None:
                headings = cells
                found[title] = []
            elif not set(line) <= set("|-: "):
                found[title].append(dict(zip(headings, cells)))
    return found


def positive(cell: str) -> bool:
    match = FIGURE.fullmatch(cell)
    return match is not None and all(
        float(n.replace(",", "")) > 0 for n in match.groups() if n is not None)


def test_quick_bench_prints_every_figure_as_a_positive_number(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(tmp_path / "bench.json")],
        capture_output=True, text=True, timeout=170, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    printed = tables(result.stdout)
    for title in TITLES:
        assert any(t.startswith(title) for t in printed), (title, list(printed))
    for title, rows in printed.items():
        assert rows, title
        for row in rows:
            figures = {h: c for h, c in row.items() if h in FIGURE_COLUMNS}
            assert figures, (title, row)
            for heading, cell in figures.items():
                assert positive(cell), (title, row["figure"], heading, cell)
            assert row.get("", "") in ("", "ok", "MISS"), row

    throughput = printed["Throughput and latency"]
    measured = {(row["figure"], row["concurrency"]) for row in throughput}
    for concurrency in ("20", "100"):
        for figure in ("deferred sessions/s", "passed messages/s (1 KiB)",
                       "deferred session p50 ms (python client)",
                       "deferred session p99 ms (python client)",
                       "passed session p50 ms (python client)",
                       "passed session p99 ms (python client)"):
            assert (figure, concurrency) in measured, (figure, concurrency)

    summary = [line for line in result.stdout.splitlines() if line.startswith("summary:")]
    assert len(summary) == 1 and "FAILED" not in summary[0], summary
    assert re.match(r"summary: [0-9]+ of 7 targets met", summary[0]), summary[0]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["failures"] == [] and len(report["targets"]) == 7
