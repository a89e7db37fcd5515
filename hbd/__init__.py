"""hbd: a heartbeat daemon (TCP ping/pong server and client) on one selectors event loop."""


def _version() -> str:
    """debian/changelog is the one place the version is set. The package build writes it into
    hbd/_version.py (debian/rules); a checkout reads the changelog's top entry. Only cheap imports:
    this runs before hbd.entry catches signals."""
    try:  # by name: the module exists only in a built package, and a type checker of the checkout must not miss it
        return str(__import__("hbd._version", fromlist=["VERSION"]).VERSION)
    except ImportError:
        pass
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "debian", "changelog")
    try:
        with open(path, encoding="utf-8") as f:
            top = f.readline()
    except OSError:
        return "unknown"
    # "hbd (EPOCH:UPSTREAM-REVISION) ...": the upstream part is hbd's own version
    version = top.partition("(")[2].partition(")")[0]
    version = version.partition(":")[2] or version
    return version.rpartition("-")[0] or version or "unknown"


__version__ = _version()
