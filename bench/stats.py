"""Percentile helpers shared by the load generator and the runner."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def pct(sorted_vals: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values (None when empty)."""
    if not sorted_vals:
        return None
    i = min(len(sorted_vals) - 1, max(0, round(q / 100.0 * (len(sorted_vals) - 1))))
    return sorted_vals[i]


def summary(vals: Iterable[float], scale: float = 1.0, nd: int = 3) -> dict[str, float | int | None]:
    """n/p50/p90/p99/max/mean of vals, each multiplied by scale (e.g. 1000 for s -> ms)."""
    v = sorted(vals)
    if not v:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}

    def r(x: float | None) -> float | None:
        return None if x is None else round(x * scale, nd)

    return {
        "n": len(v),
        "p50": r(pct(v, 50)),
        "p90": r(pct(v, 90)),
        "p99": r(pct(v, 99)),
        "max": r(v[-1]),
        "mean": r(sum(v) / len(v)),
    }
