"""What keeps one client from starving the others: a decoded-pixel budget, read timeouts, a Host check.

A small encoded image can decode to gigabytes (a 236 KB PNG of 9000x9000),
so memory is bounded by the pixels being decoded, not by body bytes: every
request holds its images' pixels from the budget until the model has run.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import threading
import time

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("tl_app.serve")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class Busy(Exception):
    """The pixel budget stayed full for too long: HTTP 503, retry later."""


class PixelBudget:
    """A counting semaphore in pixels, shared by threads and the event loop (acquire blocks a worker thread)."""

    def __init__(self, total: int):
        self.total = int(total)
        self.used = 0
        self.cond = threading.Condition()

    def acquire(self, pixels: int, timeout: float) -> None:
        """Take ``pixels`` (the caller checked ``pixels <= total``); Busy after ``timeout`` seconds of waiting."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.used + pixels > self.total:
                left = deadline - time.monotonic()
                if left <= 0 or not self.cond.wait(left):
                    if self.used + pixels <= self.total:
                        break
                    raise Busy(f"The server is decoding {self.used} pixels for other requests; retry shortly.")
            self.used += pixels

    def release(self, pixels: int) -> None:
        if not pixels:
            return
        with self.cond:
            self.used -= pixels
            idle = self.used == 0
            self.cond.notify_all()
        if idle and pixels >= 4_000_000:
            trim_heap()


def trim_heap() -> None:
    """Give freed decode buffers back to the OS (glibc keeps them otherwise: 1.0 -> 2.2 GB, never returned)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def allowed_hosts(configured: list, bound: str) -> frozenset | None:
    """The Host names to accept, or None for any: loopback names when bound to loopback (DNS rebinding)."""
    if configured:
        return frozenset(h.lower().strip("[]") for h in configured)
    try:
        loopback = bound == "localhost" or ipaddress.ip_address(bound).is_loopback
    except ValueError:
        loopback = False
    return frozenset(LOOPBACK_HOSTS) if loopback else None


def host_name(header: str) -> str:
    """'example.com:8501' -> 'example.com'; '[::1]:8501' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


LATE_TIMER_S = 0.25  # a header timer that fires this late was held up by the server, not the client


def timed_protocol(header_timeout: float):
    """uvicorn's h11 protocol that closes a connection whose request headers do not arrive in time."""

    class HeaderTimeoutProtocol(H11Protocol):
        header_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # headers are in: the app's body timeout takes over
            elif self.header_timer is None:
                self._arm()  # between requests on a kept-alive connection, a trickle of bytes is not a request

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self.due = self.loop.time() + header_timeout
            self.header_timer = self.loop.call_later(header_timeout, self._expire)

        def _disarm(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _expire(self) -> None:
            self.header_timer = None
            if self.loop.time() - self.due > LATE_TIMER_S:  # the loop itself was stalled (a model loading holds
                self.due = self.loop.time() + LATE_TIMER_S  # the GIL): bytes may be waiting unread; look again
                self.header_timer = self.loop.call_later(LATE_TIMER_S, self._expire)
                return
            if self.cycle is None or self.cycle.response_complete:
                log.info("closed a connection that sent no complete request headers in %.0fs", header_timeout)
                if not self.transport.is_closing():
                    self.transport.close()

    return HeaderTimeoutProtocol
