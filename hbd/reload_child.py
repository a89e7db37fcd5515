"""The loader process of a reload: ``python3 -m hbd.reload_child ROLE PATH OVERRIDES`` reads and
validates a daemon's configuration file (and its peers_file) exactly as at start-up and writes the
outcome to its stdout in hbd.config_wire's lines, valid or not; it exits 0 either way (anything else
is a crash, reported by the daemon with the end of this process's stderr).

It runs as the daemon's own user, with none of the daemon's descriptors (hbd.reload_process), and at
a lower priority: on a busy machine the daemon's loop comes first. It builds the parse's objects with
the garbage collector off (a short-lived process that makes no cycles: half of the time saved).
"""

from __future__ import annotations

import gc
import json
import os
import sys

NICE = 10  # the loader's priority below the daemon's


def main(argv: list[str]) -> int:
    gc.disable()
    try:
        os.nice(NICE)
    except OSError:
        pass  # (best effort)
    from hbd import config_wire
    from hbd.config import ConfigError, load_client_config, load_server_config

    role, path, overrides = argv[0], argv[1], json.loads(argv[2])
    load = load_server_config if role == "server" else load_client_config
    try:
        lines = config_wire.encode(load(path, overrides))
    except ConfigError as exc:
        lines = config_wire.encode_errors(exc.errors)
    out = sys.stdout.buffer
    for line in lines:
        out.write(line)
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
