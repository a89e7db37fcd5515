"""The expected peers of the reload benchmarks (bench.reload_big, bench.reload_turns), with no import
of hbd: bench.reload_turns may measure another checkout's."""

from __future__ import annotations

from pathlib import Path


def fleet(path: Path, n: int, generation: int) -> None:
    """N expected peers (every other one with an address, every tenth with a label: 2.6 MB for
    100,000, under the 4 MB a peers_file may be); generation 1 adds a label to every tenth."""
    lines = []
    for i in range(n):
        if i % 2:
            lines.append(f"- host{i:05d}\n")
            continue
        a, b = divmod(i, 250)
        labels = ([f"site: s{i % 7}"] + ([f"rev: r{generation}"] if generation else [])) if i % 10 == 0 else []
        text = f", labels: {{{', '.join(labels)}}}" if labels else ""
        lines.append(f"- {{name: host{i:05d}, address: 10.{a // 250}.{a % 250}.{b}{text}}}\n")
    path.write_text("".join(lines))
