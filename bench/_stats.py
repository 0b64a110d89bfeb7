"""Percentile tables shared by every benchmark."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    name: str
    samples_ms: Sequence[float]
    target: str = ""

    def pct(self, p: float) -> float:
        data = sorted(self.samples_ms)
        if not data:
            return float("nan")
        k = (len(data) - 1) * p / 100
        lo, hi = int(k), min(int(k) + 1, len(data) - 1)
        return data[lo] + (data[hi] - data[lo]) * (k - lo)


def print_table(title: str, rows: Sequence[Row], unit: str = "ms") -> None:
    print(f"\n## {title}")
    header = f"| {'benchmark':<44} | {'n':>5} | {'p50':>9} | {'p95':>9} | {'p99':>9} | target"
    print(header)
    print("|" + "-" * 46 + "|-------|-----------|-----------|-----------|--------")
    for row in rows:
        print(
            f"| {row.name:<44} | {len(row.samples_ms):>5} | {row.pct(50):>9.3f} |"
            f" {row.pct(95):>9.3f} | {row.pct(99):>9.3f} | {row.target}"
        )
    print(f"(values in {unit})")


def print_values(title: str, values: Sequence[tuple[str, str, str]]) -> None:
    """A table of single measurements: (name, value, target)."""
    print(f"\n## {title}")
    print(f"| {'measure':<44} | {'value':>16} | target")
    print("|" + "-" * 46 + "|------------------|--------")
    for name, value, target in values:
        print(f"| {name:<44} | {value:>16} | {target}")


def mean(xs: Sequence[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def phase_medians(runs: Sequence[dict[str, float]]) -> str:
    """``name p50`` per phase of an engine's ``last_phases`` records (not ``total``)."""
    keys = [k for k in runs[0] if k != "total"] if runs else []
    out = []
    for key in keys:
        data = sorted(r.get(key, 0.0) for r in runs)
        out.append(f"{key} {data[len(data) // 2]:.0f}")
    return ", ".join(out)
