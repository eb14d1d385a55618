"""A fault-injecting TCP proxy on loopback, for network-fault tests of the sync.

It sits between the primary's client and a backup agent and relays bytes unchanged (TLS passes
through end to end) until its mode says otherwise:

* ``pass``: relay both ways.
* ``down``: the listener is closed; connecting is refused (`down()`).
* ``stall``: accept, then never relay or answer anything (a peer that hangs after accept).
* ``reset_request``: on a connection whose client-to-backup bytes reach ``reset_after``, relay
  only that many bytes, then reset both sides (RST via SO_LINGER 0): the request is cut mid-way.
* ``reset_response``: on a connection that carried at least ``big`` request bytes, let the whole
  request through, then reset the client instead of relaying the reply.
* ``stall_response``: like ``reset_response`` but hold the reply forever instead of resetting.
* ``delay_reply``: like ``stall_response`` but relay the reply after ``delay`` seconds (a backup
  that is slow to answer, e.g. a long filter reload, but within the client's deadline).
* ``trickle``: relay both ways one byte every ``interval`` seconds.
* ``trickle_reply``: relay requests at full speed, replies (TLS handshake included) one byte every
  ``interval`` seconds: each read of the client gets a byte in time, only the whole is too slow.

Faults are applied by byte counts, not by connection order, so they hit the big request (the
merge) whatever calls the client makes around it. `events` records each fault applied.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

MODES = ("pass", "stall", "reset_request", "reset_response", "stall_response", "delay_reply", "trickle",
         "trickle_reply")


def reset(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN. SHUT_RD first wakes a relay thread blocked in recv on
    this socket (the kernel would otherwise keep the socket, and send nothing, until it returns)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)
    with contextlib.suppress(OSError):
        sock.close()


@dataclass
class _Link:
    client: socket.socket
    upstream: socket.socket | None = None
    sent_up: int = 0
    faulted: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class FaultProxy:
    def __init__(self, upstream_port: int, mode: str = "pass", *, reset_after: int = 50_000,
                 big: int = 100_000, interval: float = 0.1, delay: float = 3.0) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode}")
        self.upstream_port = upstream_port
        self.mode = mode
        self.reset_after = reset_after
        self.big = big
        self.interval = interval
        self.delay = delay
        self.events: list[str] = []
        self.connections = 0
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(32)
        self.listener.settimeout(0.1)
        self.port = int(self.listener.getsockname()[1])
        self._accepting = threading.Thread(target=self._accept_loop, daemon=True)
        self._accepting.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/"

    def down(self) -> None:
        """Stop listening: new connections are refused, as by a backup that is switched off."""
        self._stop.set()
        self._accepting.join(timeout=5)
        self.listener.close()

    def close(self) -> None:
        self.down()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def _track(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.append(sock)
        return sock

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            link = _Link(self._track(client))
            threading.Thread(target=self._serve, args=(link,), daemon=True).start()

    def _serve(self, link: _Link) -> None:
        if self.mode == "stall":
            self.events.append("stalled after accept")
            return  # the client socket stays open and silent until close()
        try:
            link.upstream = self._track(socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10))
        except OSError:
            reset(link.client)
            return
        link.upstream.settimeout(None)
        link.client.settimeout(None)
        threading.Thread(target=self._pump, args=(link, True), daemon=True).start()
        self._pump(link, False)

    def _pump(self, link: _Link, upward: bool) -> None:
        assert link.upstream is not None
        source, sink = (link.client, link.upstream) if upward else (link.upstream, link.client)
        try:
            while not self._stop.is_set():
                data = source.recv(65536)
                if not data:
                    with contextlib.suppress(OSError):
                        sink.shutdown(socket.SHUT_WR)
                    return
                if upward:
                    allowed = self._upward(link, data)
                    if allowed is None:
                        return
                    data = allowed
                elif not self._downward(link):
                    return
                if self.mode == "trickle" or (self.mode == "trickle_reply" and not upward):
                    for byte in range(len(data)):
                        if self._stop.wait(self.interval):
                            return
                        sink.sendall(data[byte:byte + 1])
                else:
                    sink.sendall(data)
        except OSError:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_RDWR)

    def _upward(self, link: _Link, data: bytes) -> bytes | None:
        """Count request bytes; cut the request when `reset_request` says so (None: stop)."""
        with link.lock:
            if self.mode == "reset_request" and not link.faulted and link.sent_up + len(data) >= self.reset_after:
                keep = self.reset_after - link.sent_up
                assert link.upstream is not None
                with contextlib.suppress(OSError):
                    link.upstream.sendall(data[:keep])
                time.sleep(0.2)  # let the agent read what it got before the reset arrives
                link.faulted = True
                self.events.append(f"reset after {self.reset_after} request bytes")
                reset(link.upstream)
                reset(link.client)
                return None
            link.sent_up += len(data)
        return data

    def _downward(self, link: _Link) -> bool:
        """False when the reply must not reach the client (`reset_response`, `stall_response`)."""
        with link.lock:
            if link.sent_up < self.big or self.mode not in ("reset_response", "stall_response", "delay_reply"):
                return True
            first = not link.faulted
            if first:
                link.faulted = True
                self.events.append(f"{self.mode} after {link.sent_up} request bytes")
        if self.mode == "delay_reply":
            if first:
                self._stop.wait(self.delay)
            return True
        if self.mode == "reset_response":
            reset(link.client)
        return False  # stall_response: swallow the reply and keep the client waiting
