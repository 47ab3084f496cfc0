"""The test harness shared by the tests and the benchmarks: real brokers, real libvirt, agents
and consoles as processes, polling with deadlines. Not part of the product (never in the wheel)."""

import time


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; fail with ``what`` (or what it
    returns, when callable: it is read at the deadline) at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for "
                                 f"{what() if callable(what) else what}")
        time.sleep(interval)
