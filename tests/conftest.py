import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ helpers importable as plain modules

from daemons import HbdProcess


@pytest.fixture
def procs():
    """Processes started through this list are stopped (and reaped) after the test."""
    started: list[HbdProcess] = []
    yield started
    for p in started:
        p.stop()
