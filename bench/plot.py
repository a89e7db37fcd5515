"""PNG plot of CPU per ping/pong and RSS per connection against N, one line per server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLORS = {"floor": "tab:gray", "hbd": "tab:blue", "thread": "tab:red"}


def plot(recs: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Write the plot; False (and no file) when matplotlib is missing, so the run still succeeds."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = sorted(
        {r["server"] for r in recs if r.get("kind") == "open" and r.get("ok")},
        key=lambda s: list(COLORS).index(s) if s in COLORS else 99,
    )
    for name in names:
        rs = sorted(
            (r for r in recs if r.get("kind") == "open" and r.get("ok") and r["server"] == name), key=lambda r: r["n"]
        )
        ns = [r["n"] for r in rs]
        ax1.plot(ns, [r["cpu_us_per_ping"] for r in rs], "o-", label=name, color=COLORS.get(name))
        ax2.plot(ns, [r["rss_per_conn_b"] for r in rs], "o-", label=name, color=COLORS.get(name))
        for r in rs:  # a run that dropped clients is a failure, whatever it cost: mark it
            if r["errors"] > 0.01 * r["n"]:
                for ax, y in ((ax1, r["cpu_us_per_ping"]), (ax2, r["rss_per_conn_b"])):
                    ax.plot([r["n"]], [y], "x", ms=12, mew=2, color="black")
                    ax.annotate(
                        f"{r['errors']} errors", (r["n"], y), textcoords="offset points", xytext=(-20, -16), fontsize=7
                    )
    ax1.set(
        xscale="log",
        xlabel="concurrent clients N (1 ping/s each)",
        ylabel="server CPU per ping/pong (µs)",
        title="CPU per ping/pong",
    )
    ax2.set(
        xscale="log",
        yscale="log",
        xlabel="concurrent clients N",
        ylabel="RSS per connection (bytes)",
        title="RSS per connection (peak - idle) / N",
    )
    ax2.axhline(1024, color="tab:green", ls=":", lw=1, label="1 KB target")
    ax1.set_ylim(bottom=0)
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    """Redraw a plot from a results file: python3 -m bench.plot bench/results/full.jsonl"""
    import json
    import sys

    src = Path(sys.argv[1])
    recs = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    mach = next((r for r in recs if r.get("kind") == "machine"), {})
    title = (
        f"hbd bench ({src.stem}) {mach.get('date')}: {mach.get('nproc')} x {mach.get('cpu_model')}, "
        f"Linux {mach.get('kernel')}, Python {mach.get('python')}; server pinned to 1 core"
    )
    if not plot(recs, src.with_suffix(".png"), title):
        sys.exit("matplotlib missing: apt-get install python3-matplotlib")


if __name__ == "__main__":
    main()
