"""Fairness under abuse: each client's share of the decode workers (reliability 32).

The decode pool has two workers and gives each file up to ``DECODE_TIMEOUT_S`` (2 s). A client
that keeps sending files built to decode slowly would otherwise hold both workers and multiply
every other user's wait. Policy: each client (its IP address, as the server sees it) has a
bucket of ``CXR_DECODE_BUDGET_S`` seconds of worker time (default 6 s) that refills at that many
seconds per ``CXR_DECODE_WINDOW_S`` (default 60 s). Every decode is charged what it cost the
pool (:func:`cxr.imaging.sandbox.last_decode_seconds`: the worker's time, never the wait for a
free worker). A client whose bucket is empty is refused at once - without touching a worker -
until it refills. A chest film decodes in 0.01-0.3 s, so a person is never near the limit
(20 films a minute cost ~2 s); a client sending 2-second files is held to ~3 of them a minute.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager

from cxr.imaging.sandbox import last_decode_seconds

DECODE_BUDGET_S = 6.0
DECODE_WINDOW_S = 60.0
MAX_CLIENTS = 10_000      # buckets kept; the fullest (idle) ones are dropped first


class OverBudget(Exception):
    def __init__(self, retry_after: float):
        self.retry_after = retry_after
        super().__init__(f"This connection has used its share of image decoding for now (files that are slow "
                         f"to decode); please try again in {max(1, round(retry_after))} s.")


class DecodeBudget:
    """Token buckets of decode seconds, one per client key (thread-safe)."""

    def __init__(self, seconds: float | None = None, window: float | None = None, clock=time.monotonic):
        self.capacity = float(os.environ.get("CXR_DECODE_BUDGET_S", DECODE_BUDGET_S) if seconds is None else seconds)
        self.window = float(os.environ.get("CXR_DECODE_WINDOW_S", DECODE_WINDOW_S) if window is None else window)
        self.rate = self.capacity / self.window
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}    # key -> (seconds left, when)
        self._lock = threading.Lock()
        self.refused = 0

    def _level(self, key: str, now: float) -> float:
        left, when = self._buckets.get(key, (self.capacity, now))
        return min(self.capacity, left + (now - when) * self.rate)

    def left(self, key: str) -> float:
        """Decode seconds left in ``key``'s bucket now (the capacity for a client not seen yet;
        below 0 after a decode that cost more than was left)."""
        with self._lock:
            return self._level(key, self.clock())

    def check(self, key: str) -> None:
        """:class:`OverBudget` when ``key``'s bucket is empty."""
        with self._lock:
            now = self.clock()
            left = self._level(key, now)
            if left <= 0:
                self.refused += 1
                raise OverBudget(-left / self.rate + 1.0)

    def charge(self, key: str, seconds: float) -> None:
        with self._lock:
            now = self.clock()
            self._buckets[key] = (self._level(key, now) - max(0.0, seconds), now)
            if len(self._buckets) > MAX_CLIENTS:
                full = [k for k, (left, when) in self._buckets.items() if self._level(k, now) >= self.capacity]
                for k in full[: len(self._buckets) - MAX_CLIENTS] or list(self._buckets)[:1]:
                    self._buckets.pop(k, None)

    @contextmanager
    def spend(self, key: str):
        """Check ``key``'s bucket, run the decode, charge what it cost the pool (errors too)."""
        self.check(key)
        last_decode_seconds(reset=True)
        try:
            yield
        finally:
            self.charge(key, last_decode_seconds())


_BUDGET: DecodeBudget | None = None
_LOCK = threading.Lock()


def budget() -> DecodeBudget:
    """The process's :class:`DecodeBudget` (settings read from the environment once)."""
    global _BUDGET
    with _LOCK:
        if _BUDGET is None:
            _BUDGET = DecodeBudget()
        return _BUDGET


def client_key(request) -> str:
    """The client a request comes from: its IP address as the server sees it (a ``gr.Request``
    or a Starlette request). Behind a reverse proxy every client has the proxy's address: set
    ``CXR_TRUST_FORWARDED=1`` there (only there: the header is the client's to write otherwise)
    to key on the first address of ``X-Forwarded-For``. Requests without one (direct calls,
    tests) share the key "local"."""
    if os.environ.get("CXR_TRUST_FORWARDED") == "1":
        headers = getattr(request, "headers", None) or {}
        forwarded = headers.get("x-forwarded-for") if hasattr(headers, "get") else None
        if forwarded:
            return forwarded.split(",")[0].strip()[:64] or "local"
    client = getattr(request, "client", None)
    host = getattr(client, "host", None)
    return str(host) if host else "local"
