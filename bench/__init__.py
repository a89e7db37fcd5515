"""hbd benchmark harness: fixtures (floor, thread-per-client), a load generator and the runner.

Run with ``/usr/bin/python3 -m bench --mode quick|full`` from the repository root (``make bench``).
"""
