"""The first hbd code the interpreter runs (``python3 -m hbd`` and the ``hbd`` console script).

Signals are caught here (hbd.early), before the heavy imports and before the configuration is
read.
"""

from __future__ import annotations

from collections.abc import Sequence

from hbd.early import catch_signals


def main(argv: Sequence[str] | None = None) -> int:
    catch_signals()
    from hbd.cli import main as cli_main  # the heavy imports (yaml, ssl, ...) come after

    return cli_main(argv)
