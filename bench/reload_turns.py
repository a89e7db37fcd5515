"""A reload's cost to the loop itself, in-process: ``python3 -m bench.reload_turns [-n 100000]``.

A server (this checkout's) with a peers_file of N expected peers (bench.reload_big's fleet) is started
in this process without clients, with hbd.heap's freezes as in the daemon; the peers_file and
heartbeat_timeout then change (every entry) and a reload is asked. The loop is turned by hand until
the reload has been applied and what it replaced freed, and every turn's wall time and this thread's
CPU time are noted: the longest turns show what the reload does on the loop (CPU) apart from what
the machine does to it (wall minus CPU). Hold the bench lock (``flock /tmp/hbd-bench.lock``).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# --root DIR: that checkout's hbd (another version's, to compare); read before hbd is imported
_at = sys.argv.index("--root") + 1 if "--root" in sys.argv else 0
sys.path.insert(0, sys.argv[_at] if _at else str(ROOT))

from bench.fleet import fleet  # noqa: E402
from hbd.config import load_server_config  # noqa: E402
from hbd.heap import Heap  # noqa: E402
from hbd.logs import Logging  # noqa: E402
from hbd.loop import EventLoop  # noqa: E402
from hbd.notify import Notifier  # noqa: E402
from hbd.server import Server  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(n: int, directory: Path) -> dict[str, object]:
    peers, cfg = directory / "fleet.yaml", directory / "server.yaml"
    fleet(peers, n, 0)
    config = {
        "host": "127.0.0.1",
        "port": free_port(),
        "heartbeat_timeout": 60,
        "max_peers": n + 1000,
        "peers_file": str(peers),
    }
    config |= {"state_dir": None, "log_file": None, "control_socket": None}
    cfg.write_text(json.dumps(config))
    loop = EventLoop()
    srv = Server(load_server_config(cfg), loop=loop, notifier=Notifier({}), logs=Logging("hbd-bench", journald=False))
    srv.start()
    heap = Heap(loop).start()
    try:
        fleet(peers, n, 1)
        cfg.write_text(json.dumps({**config, "heartbeat_timeout": 61}))
        answers: list[list[str]] = []
        srv.request_reload(answers.append)
        turns: list[tuple[float, float, float]] = []  # (since the request, wall, CPU), seconds
        start = time.monotonic()
        assert srv.registry is not None
        while not answers or len(srv.registry.reload.retirer):
            t0, c0 = time.monotonic(), time.thread_time()
            loop.run_once(0.01)
            turns.append((t0 - start, time.monotonic() - t0, time.thread_time() - c0))
        took = time.monotonic() - start
    finally:
        heap.close()
        srv.shutdown()
        loop.close()
    by_wall = sorted(turns, key=lambda t: -t[1])[:5]
    by_cpu = sorted(turns, key=lambda t: -t[2])[:5]
    import hbd

    return {
        "hbd": str(Path(hbd.__file__).parent),
        "n": n,
        "answer": answers[0],
        "reload_s": round(took, 2),
        "turns": len(turns),
        "over_15ms_cpu": sum(1 for t in turns if t[2] > 0.015),
        "longest_wall": [(round(a, 2), round(w * 1000, 1), round(c * 1000, 1)) for a, w, c in by_wall],
        "longest_cpu": [(round(a, 2), round(w * 1000, 1), round(c * 1000, 1)) for a, w, c in by_cpu],
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("-n", type=int, default=100_000, help="expected peers in the peers_file (default 100000)")
    ap.add_argument("--root", default=str(ROOT), help="the hbd checkout whose server is measured")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(run(args.n, Path(d))))


if __name__ == "__main__":
    main()
