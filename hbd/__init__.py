"""hbd: a heartbeat daemon (TCP ping/pong server and client) on one selectors event loop."""

__version__ = "0.1.0"
