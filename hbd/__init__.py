"""hbd: a heartbeat daemon (TCP ping/pong server and client) on one selectors event loop."""


def _version() -> str:
    """debian/changelog is the one place the version is set. The package build writes it into
    hbd/_version.py (debian/rules); a checkout reads the changelog's top entry."""
    try:
        from hbd._version import VERSION
    except ImportError:
        pass
    else:
        return VERSION
    import re
    from pathlib import Path

    try:
        with open(Path(__file__).resolve().parent.parent / "debian" / "changelog", encoding="utf-8") as f:
            top = f.readline()
    except OSError:
        return "unknown"
    # "hbd (EPOCH:UPSTREAM-REVISION) ...": the upstream part is hbd's own version
    m = re.match(r"\S+ \((?:\d+:)?([^)\s]+?)(?:-[^-)\s]+)?\)", top)
    return m.group(1) if m else "unknown"


__version__ = _version()
