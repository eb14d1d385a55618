"""Traffic helpers for the failover lab, run inside its network namespaces.

`python -m halab.labecho server|client|probe ...`

* ``server``: a TCP echo server (the lab's "internet" host).
* ``client``: one long-lived TCP connection through the firewall pair. It sends a numbered
  message every ``--interval`` seconds and checks that every echo comes back complete and in
  order. It keeps a small JSON status file up to date (so a test can see the stream is flowing)
  and, when told to stop (SIGTERM or SIGINT), waits up to ``--drain`` seconds for the echoes still
  outstanding, then prints a JSON summary: messages sent and echoed, whether the connection was
  reset, and the longest gap between two echoes (with its monotonic start and end, so it can be
  placed against a failover; CLOCK_MONOTONIC is one clock for all processes of the machine).
* ``probe``: ICMP echo to an address until the first reply; prints the monotonic time of it.

Only the standard library, so it starts fast and runs anywhere the lab runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

from hasync.core.fileio import atomic_write

MESSAGE_SIZE = 64


def _message(seq: int) -> bytes:
    body = f"{seq:012d} opnsense-ha lab stream ".encode()
    return body + b"." * (MESSAGE_SIZE - len(body) - 1) + b"\n"


# --- server ---------------------------------------------------------------------------------------


def _serve_one(conn: socket.socket) -> None:
    with conn:
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            try:
                conn.sendall(data)
            except OSError:
                return


def run_server(bind: str, port: int) -> int:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((bind, port))
    listener.listen(64)
    print(f"echo server on {bind}:{port}", flush=True)
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_serve_one, args=(conn,), daemon=True).start()


# --- client ---------------------------------------------------------------------------------------


class Stream:
    """One connection: numbered messages out, echoes checked in order."""

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.sent = 0
        self.echoed = 0
        self.buffer = b""
        self.error: str | None = None
        self.reset = False
        self.last_echo = now
        self.max_gap = 0.0
        self.gap_start = now
        self.gap_end = now

    @property
    def open(self) -> bool:
        return self.error is None

    def note_echo(self, now: float) -> None:
        gap = now - self.last_echo
        if gap > self.max_gap:
            self.max_gap, self.gap_start, self.gap_end = gap, self.last_echo, now
        self.last_echo = now

    def send_next(self) -> None:
        try:
            self.sock.send(_message(self.sent))
        except BlockingIOError:
            return  # send buffer full while the path is down: try again next tick
        except ConnectionResetError:
            self.reset, self.error = True, "connection reset"
            return
        except OSError as exc:
            self.error = f"send failed: {exc}"
            return
        self.sent += 1

    def receive(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except ConnectionResetError:
            self.reset, self.error = True, "connection reset"
            return
        except OSError as exc:
            self.error = f"recv failed: {exc}"
            return
        if not data:
            self.error = "connection closed by peer"
            return
        self.buffer += data
        while len(self.buffer) >= MESSAGE_SIZE:
            chunk, self.buffer = self.buffer[:MESSAGE_SIZE], self.buffer[MESSAGE_SIZE:]
            if chunk != _message(self.echoed):
                self.error = f"echo {self.echoed} came back wrong"
                return
            self.echoed += 1
            self.note_echo(time.monotonic())

    def summary(self) -> dict[str, Any]:
        return {"sent": self.sent, "echoed": self.echoed, "error": self.error, "reset": self.reset,
                "max_gap": round(self.max_gap, 4), "gap_start": self.gap_start, "gap_end": self.gap_end,
                "last_echo": self.last_echo}


class StreamClient:
    """`connections` long-lived connections, each sending at a steady pace and checking its echoes."""

    def __init__(self, host: str, port: int, interval: float, status_path: Path | None,
                 connections: int = 1, connect_timeout: float = 5.0) -> None:
        self.host = host
        self.port = port
        self.interval = interval
        self.status_path = status_path
        self.connections = connections
        self.connect_timeout = connect_timeout
        self.streams: list[Stream] = []
        self.started = 0.0
        self.stop_requested = False
        self.connect_error: str | None = None

    def _status(self, final: bool = False) -> dict[str, Any]:
        streams = self.streams
        worst = max(streams, key=lambda st: st.max_gap) if streams else None
        errors = [st.error for st in streams if st.error]
        return {
            "connections": len(streams),
            "sent": sum(st.sent for st in streams),
            "echoed": sum(st.echoed for st in streams),
            "survived": sum(1 for st in streams if st.error is None and (not final or st.echoed == st.sent)),
            "error": self.connect_error or (errors[0] if errors else None),
            "reset": any(st.reset for st in streams),
            "started": self.started,
            "last_echo": min((st.last_echo for st in streams), default=0.0),
            "max_gap": worst.max_gap if worst else 0.0,
            "gap_start": worst.gap_start if worst else 0.0,
            "gap_end": worst.gap_end if worst else 0.0,
            "interval": self.interval, "final": final, "pid": os.getpid(),
            "streams": [st.summary() for st in streams] if final else [],
        }

    def _write_status(self, final: bool = False) -> None:
        if self.status_path is None:
            return
        atomic_write(self.status_path, json.dumps(self._status(final)))

    def run(self, drain: float) -> dict[str, Any]:
        for _ in range(self.connections):
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            self.streams.append(Stream(sock, time.monotonic()))
        self.started = time.monotonic()
        next_send = self.started
        next_status = self.started
        stop_at: float | None = None
        try:
            while True:
                now = time.monotonic()
                live = [st for st in self.streams if st.open]
                if self.stop_requested and stop_at is None:
                    stop_at = now + drain
                if not live or (stop_at is not None and (all(st.echoed >= st.sent for st in live) or now >= stop_at)):
                    break
                if stop_at is None and now >= next_send:
                    for st in live:
                        st.send_next()
                    next_send += self.interval
                    if next_send < now:
                        next_send = now + self.interval
                if now >= next_status:
                    self._write_status()
                    next_status = now + 0.1
                wake = min(next_send if stop_at is None else now + 0.05, next_status)
                readable, _, _ = select.select([st.sock for st in live], [], [], max(0.0, wake - now))
                for st in live:
                    if st.sock in readable:
                        st.receive()
        finally:
            for st in self.streams:
                st.sock.close()
        end = time.monotonic()
        for st in self.streams:  # a stream that never recovered: its gap lasts until the end
            if st.echoed < st.sent or st.error:
                st.note_echo(end)
        self._write_status(final=True)
        return self._status(final=True)


def run_client(args: argparse.Namespace) -> int:
    host, _, port = args.connect.rpartition(":")
    client = StreamClient(host, int(port), args.interval, Path(args.status) if args.status else None,
                          connections=args.connections)

    def stop(_signum: int, _frame: object) -> None:
        client.stop_requested = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if args.duration:
        threading.Timer(args.duration, lambda: setattr(client, "stop_requested", True)).start()
    try:
        summary = client.run(args.drain)
    except OSError as exc:
        client.connect_error = f"connect failed: {exc}"
        summary = client._status(final=True)
    print(json.dumps(summary), flush=True)
    ok = not summary["error"] and summary["echoed"] == summary["sent"]
    return 0 if ok else 1


# --- ICMP probe -----------------------------------------------------------------------------------


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def run_probe(target: str, interval: float, timeout: float) -> int:
    """Ping `target` every `interval` until a reply; print {"ok", "time", "attempts"}."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    deadline = time.monotonic() + timeout
    seq = 0
    while time.monotonic() < deadline:
        seq = (seq + 1) & 0xFFFF
        header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
        payload = b"opnsense-ha-lab-probe"
        packet = struct.pack("!BBHHH", 8, 0, _checksum(header + payload), ident, seq) + payload
        with contextlib.suppress(OSError):  # no route / neighbour yet: keep trying
            sock.sendto(packet, (target, 0))
        wait_until = min(deadline, time.monotonic() + interval)
        while True:
            left = wait_until - time.monotonic()
            if left <= 0:
                break
            readable, _, _ = select.select([sock], [], [], left)
            if not readable:
                break
            data, (source, _) = sock.recvfrom(2048)
            ihl = (data[0] & 0x0F) * 4
            kind, _, _, rid, _ = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            if kind == 0 and rid == ident and source == target:
                print(json.dumps({"ok": True, "time": time.monotonic(), "attempts": seq}), flush=True)
                return 0
    print(json.dumps({"ok": False, "time": time.monotonic(), "attempts": seq}), flush=True)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m halab.labecho", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    server = sub.add_parser("server")
    server.add_argument("--bind", default="0.0.0.0")
    server.add_argument("--port", type=int, default=7777)
    client = sub.add_parser("client")
    client.add_argument("--connect", required=True, metavar="HOST:PORT")
    client.add_argument("--interval", type=float, default=0.02)
    client.add_argument("--connections", type=int, default=1, help="parallel connections (default 1)")
    client.add_argument("--drain", type=float, default=10.0, help="seconds to wait for outstanding echoes")
    client.add_argument("--duration", type=float, default=0.0, help="stop by itself after this long")
    client.add_argument("--status", default="", help="JSON status file, rewritten every 0.1 s")
    probe = sub.add_parser("probe")
    probe.add_argument("--target", required=True)
    probe.add_argument("--interval", type=float, default=0.05)
    probe.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    if args.mode == "server":
        return run_server(args.bind, args.port)
    if args.mode == "client":
        return run_client(args)
    return run_probe(args.target, args.interval, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
